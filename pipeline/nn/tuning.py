"""Every tuning choice of the engine in one table: the thresholds that pick a route or a size.

Each entry says which measurement justified it. Unless an entry says otherwise, they were taken on the
project's 2-core machine (AMD EPYC, OpenBLAS 0.3.31 with Haswell or SkylakeX kernels, one BLAS thread
per call), and the full runs are in docs/PERFORMANCE.md ("change N" there).

On another machine, re-measure with `make bench` (and the A/B runs that PERFORMANCE.md describes), then
change the numbers here. The op files read them at call time (`tuning.NAME`), so a test or an experiment
can patch this module. tests/test_nn_tuning.py checks that every entry is used somewhere.
"""

# -- threads (threads.py) ------------------------------------------------------------------------------
# Default cap of num_threads() when $PIPELINE_NN_THREADS is unset: not recorded; re-measure with make bench.
MAX_THREADS = 8
# Passes over less than this run on one thread. 1 / 3 / 8 MiB gave lenet5 11.7 / 12.4 / 12.4 ms and deotte
# 145 / 142 / 146 ms per step: noise (PERFORMANCE.md, "Tried").
PARALLEL_MIN_BYTES = 1 << 20
# Row blocks of about this size keep a pass's temporaries in cache. 0.5-4 MiB gave BatchNorm 7.0-7.8 ms,
# flat (PERFORMANCE.md, "Tried").
BLOCK_BYTES = 1 << 21
# GEMMs of fewer multiply-adds are not split among threads (a thread hand-off costs more): not recorded;
# re-measure with make bench.
GEMM_MIN_FLOPS = 4e6

# -- convolution columns (im2col.py) -------------------------------------------------------------------
# Each thread walks its images in chunks of about this much column matrix, so columns, products and dx
# scratch stay in cache. 2 / 4 / 8 MB chunks: 153.5 / 141.4 / 140.8 ms per deotte step, 2 threads (change 1).
COLUMN_CHUNK_BYTES = 4 << 20
# Column matrices up to this size are kept from forward to backward; bigger ones are rebuilt. Deotte's
# 5x5 stride-2 layer (59 MB) fwd + bwd 31.8 -> 30.6 ms kept, its 3x3 layer at 26x26 (85 MB) 41.0 -> 43.1 ms
# kept; whole step 24 vs 64 MiB: 143.4 -> 141.0 ms (change 5).
KEEP_COLUMNS_BYTES = 64 << 20
# From this many channels the columns are filled one kernel row at a time (runs of kw*C values, "3-5x
# fewer inner loops" than the kh*kw loop); below, the kh*kw loop of strided slices. The timing is not
# recorded; re-measure with make bench.
FILL_ROWS_MIN_CHANNELS = 2

# -- convolution backward (conv.py's dispatch) ---------------------------------------------------------
# Weight-gradient GEMMs whose output has a side below this run on one thread when only they are left
# (columns kept, no dx): (6 x 40k) @ (40k x 26) x5 took 2.3 ms alone, 4.7 ms on each of two threads;
# (16 x 40k) @ (40k x 32) 3.2 vs 3.5 ms; lenet5 conv0 backward 1.59 -> 1.47 ms (change 4).
SMALL_GEMM_SIDE = 16
# Up to this many filters the weight gradient is computed as (dout.T @ col).T, "~10 % faster, 1 thread" by
# a code comment of c86a9c2; the timing is not recorded; re-measure with make bench.
DW_TRANSPOSED_MAX_FILTERS = 32
# The 'correlation' backward (dx and dw from one column matrix of the padded output gradient) needs at
# least this many input channels; fewer take the banded rows. Measured on deotte's 32-channel 3x3 layer:
# 3.4 -> 3.1 ms per chunk of 6 images, 1 thread (change 8); narrower layers were not timed on this route.
CORRELATION_MIN_CHANNELS = 16
# ... and an input of at most this many times the output's pixels (the full correlation runs over the
# input). Deotte's 3x3 layer at 26x26 (1.17x), 6 images, 1 thread: 3.4 -> 3.1 ms per chunk; step CPU time
# 341 -> 334 ms (change 8).
CORRELATION_MAX_INPUT_RATIO = 1.25
# The banded-row input gradient ('rows') is taken below this many input channels: lenet5's 5x5 6->16 layer
# at 14x14 4.45 -> 2.34 ms (64 images, 1 thread); lenet5 step 16.7 -> 14.6 ms A/B (change 7).
ROWS_MAX_CHANNELS = 16
# ... and for a padded width of at most this many kernel widths (its extra multiplies are the band's
# zeros). lenet5's 5x5 6->16 layer at 14x14: 4.45 -> 2.34 ms; a 3x3 8->16 layer at width 16 (5.3 kernels):
# 2.59 -> 3.84 ms (change 7).
ROWS_MAX_WIDTH_KERNELS = 3

# -- pooling (pool.py) ---------------------------------------------------------------------------------
# Below this many channels, 2x2 max pooling on NumPy compares whole rows with themselves shifted by one pixel:
# C-long inner loops cost more than the doubled work (lenet's 6 channels: 3.1 -> 1.9 ms forward, 1 thread).
NARROW_CHANNELS = 16
