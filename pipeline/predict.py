"""Class probabilities of a trained run on the test set: runs/NAME/test_probs.npz.

    python -m pipeline.predict --run NAME [--device auto|cpu|gpu] [--batch-size 1000]

`predict_probs` (one run's model on any images) is kept apart from the writing so a blend of runs
(the ensemble) can average several of them and write through `write_test_probs` the same way.
"""
import sys
import time

import numpy as np

from pipeline import dataset, runs
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import load_npz, save_npz

TEST_PROBS = "test_probs.npz"


def predict_probs(folder, x, xp=np, batch_size=1000):
    """Probabilities of the run in `folder` on images x (N, 28, 28, 1) float32 in [0, 1].

    The model is built on `xp` (numpy or cupy); predict_proba runs it in eval mode (no dropout,
    batch-norm running statistics) and moves each batch to the device.
    Returns numpy float32 (N, 10), each row summing to 1.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    try:
        model = runs.load_model(folder, xp)
    except ValueError as exc:  # model.npz and config.toml disagree (edited config, foreign weights)
        raise UserError(f"{folder / 'model.npz'} does not fit the run's architecture: {exc}") from None
    probs = np.asarray(model.predict_proba(x, batch_size=batch_size), dtype=np.float32)
    check_probs(probs, len(x), what=f"{folder.name} predictions")
    return probs


def check_probs(probs, n_rows, what="probabilities"):
    """Raise UserError unless probs is (n_rows, 10), finite, non-negative, rows summing to 1."""
    if probs.ndim != 2 or probs.shape != (n_rows, dataset.NUM_CLASSES):
        raise UserError(f"{what}: expected shape ({n_rows}, {dataset.NUM_CLASSES}), got {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise UserError(f"{what}: {int(np.sum(~np.isfinite(probs)))} values are NaN or infinite")
    if np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise UserError(f"{what}: rows are not probability distributions (negative or not summing to 1)")


def write_test_probs(folder, probs):
    """Write folder/test_probs.npz: probs float32 (M, 10), atomically."""
    path = folder / TEST_PROBS
    save_npz(path, {"probs": np.asarray(probs, dtype=np.float32)})
    return path


def load_test_probs(folder):
    """probs float32 (M, 10) written by predict; UserError when predict has not run."""
    path = folder / TEST_PROBS
    if not path.is_file():
        raise UserError(f"{path} is missing: run `make predict RUN={folder.name}` first")
    data = load_npz(path)
    if "probs" not in data:
        raise UserError(f"{path} has no 'probs' array: rerun `make predict RUN={folder.name}`")
    return data["probs"]


def load_test_images():
    """x float32 (M, 28, 28, 1) from data/processed/test.npz, checked against meta.json."""
    x = dataset.load_test()
    if x.ndim != 4 or x.shape[1:] != dataset.IMAGE_SHAPE:
        raise UserError(f"test.npz: expected images (M, 28, 28, 1), got {x.shape}: rerun `make prepare`")
    test_rows = dataset.load_meta().get("test_rows")
    if test_rows is not None and test_rows != len(x):
        raise UserError(f"test.npz has {len(x)} rows but meta.json says {test_rows}: rerun `make prepare`")
    return x


def parse_args(argv):
    p = StageArgumentParser(prog="python -m pipeline.predict", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run name under runs/")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--batch-size", type=int, default=1000, help="images per forward pass")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    from pipeline.nn import select_device

    folder = runs.existing_run(args.run)
    xp = select_device(args.device)
    if (folder / "members").is_dir():  # an ensemble run: its prediction is the blend chosen by validation
        from pipeline import ensemble

        report = ensemble.build(folder, xp)
        print(f"{folder / TEST_PROBS}: {report['strategy']} of {len(report['weights'])} members, "
              f"validation estimate {report['estimate']['accuracy']:.5f}")
        return 0
    x = load_test_images()
    start = time.perf_counter()
    probs = predict_probs(folder, x, xp=xp, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    path = write_test_probs(folder, probs)
    counts = np.bincount(probs.argmax(axis=1), minlength=dataset.NUM_CLASSES)
    print(f"{path}: {len(probs)} test images in {seconds:.1f} s on {xp.__name__}; "
          f"predicted per class: {' '.join(str(int(c)) for c in counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
