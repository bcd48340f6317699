"""Benchmarks of the engine against PyTorch CPU (`make bench`); not part of the pipeline's stages."""
