"""The processed data set: what `prepare` writes and every later stage reads.

data/processed/
  train.npz  x float32 (N, 28, 28, 1) in [0, 1] (NHWC), y int64 (N,)  -- all rows of train.csv, in order
  test.npz   x float32 (M, 28, 28, 1) in [0, 1]                         -- all rows of test.csv, in order
  split.npz  train_idx, val_idx int64 (sorted row indices into train.npz), stratified, seeded
  meta.json  row counts, class counts, input sha256s, split seed and fraction
Only train.csv ever reaches training or model selection; the offline answer key is read by `score` alone.
"""
import json

import numpy as np

from pipeline import paths
from pipeline.errors import UserError
from pipeline.fileio import load_npz

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _load(name, folder=None):
    path = (folder or paths.data_processed()) / name
    if not path.is_file():
        raise UserError(f"{path} is missing: run `make prepare` first")
    return load_npz(path)


def load_train(folder=None):
    """(x, y): every row of train.csv."""
    d = _load("train.npz", folder)
    return d["x"], d["y"]


def load_test(folder=None):
    """x: every row of test.csv, in file order (ImageId = index + 1)."""
    return _load("test.npz", folder)["x"]


def load_split(folder=None):
    """(train_idx, val_idx) written by prepare."""
    d = _load("split.npz", folder)
    return d["train_idx"], d["val_idx"]


def load_meta(folder=None):
    path = (folder or paths.data_processed()) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: run `make prepare` first")
    return json.loads(path.read_text())


def stratified_split(y, val_fraction, seed):
    """Seeded stratified split of row indices: about `val_fraction` of each class goes to validation.

    Every class with at least 2 rows keeps at least one row on each side. Returns sorted
    (train_idx, val_idx) int64 arrays.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        rows = rows[rng.permutation(len(rows))]
        k = int(round(len(rows) * val_fraction))
        if len(rows) >= 2:
            k = min(max(k, 1), len(rows) - 1)
        else:
            k = 0
        val.append(rows[:k])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask).astype(np.int64), val_idx
