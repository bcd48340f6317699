"""The processed data set: what `prepare` writes and every later stage reads.

data/processed/
  train.npz  x float32 (N, 28, 28, 1) in [0, 1] (NHWC), y int64 (N,)  -- all rows of train.csv, in order
  test.npz   x float32 (M, 28, 28, 1) in [0, 1]                         -- all rows of test.csv, in order
  split.npz  train_idx, val_idx int64 (sorted row indices into train.npz), stratified, seeded
  meta.json  row counts, class counts, input sha256s, split seed and fraction
Only train.csv ever reaches training or model selection; the offline answer key is read by `score` alone.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.errors import UserError
from pipeline.fileio import json_loads, load_npz, read_json_object

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
# in data/raw from the first rename of a fetch to its last: a fetch cut short there left some CSVs new, some old
FETCH_INCOMPLETE = ".fetch-incomplete"
# Beside the raw CSVs: the source they came from and the sha256 of the test.csv written with them (fetch).
SOURCE_RECORD = "source.json"
# Far above the competition (train.csv 42 000 rows, 73 MB): a bigger file is not a digit CSV, and reading it
# whole would exhaust memory before any row could be judged.
MAX_CSV_ROWS = 200_000
MAX_CSV_BYTES = 512 * 2**20


def raw_csv_problem(path):
    """Why data/raw's CSV at `path` cannot be the competition's (missing, not a regular file, far too big),
    or None. `make fetch` replaces a file with any of these problems."""
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else "not a plain file"
        return f"not a regular file ({kind})"
    if st.st_size > MAX_CSV_BYTES:
        return (f"{st.st_size / 2**30:.1f} GB, far more than a digit CSV of at most {MAX_CSV_ROWS} rows "
                f"({MAX_CSV_BYTES // 2**20} MB)")
    return None


def _rebuild_advice(folder=None):
    """How to rebuild data/processed: `make prepare` alone sees meta.json up to date and does nothing."""
    return f"remove {(folder or paths.data_processed()) / 'meta.json'}, then `make prepare` writes data/processed again"


def _load(name, keys, folder=None):
    """The arrays `keys` of data/processed/name; a missing, damaged or incomplete file is a UserError."""
    path = (folder or paths.data_processed()) / name
    if not path.is_file():
        raise UserError(f"{path} is missing: run `make prepare` first")
    try:
        d = load_npz(path)
    except Exception as exc:  # noqa: BLE001 (BadZipFile, EOFError, ValueError, ...: all mean damaged)
        raise UserError(f"{path} is damaged ({type(exc).__name__}): {_rebuild_advice(folder)}") from None
    missing = [k for k in keys if k not in d]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: {_rebuild_advice(folder)}")
    return d


def load_train(folder=None):
    """(x, y): every row of train.csv, images float32 (N, 28, 28, 1) and labels 0..9 (checked: prepare writes them
    so, and anything else is a file replaced by hand, which training would meet as a traceback)."""
    d = _load("train.npz", ("x", "y"), folder)
    x, y = d["x"], d["y"]
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise UserError(f"train.npz: expected float32 images (N, 28, 28, 1), got {x.dtype} {x.shape}: "
                        f"{_rebuild_advice(folder)}")
    if y.dtype.kind not in "iu" or y.shape != (len(x),) or (len(y) and not 0 <= y.min() <= y.max() < NUM_CLASSES):
        raise UserError(f"train.npz: expected one label 0..9 per image ({len(x)}), got {y.dtype} {y.shape}: "
                        f"{_rebuild_advice(folder)}")
    return x, y


def load_test(folder=None):
    """x: every row of test.csv, in file order (ImageId = index + 1)."""
    return _load("test.npz", ("x",), folder)["x"]


def load_test_images(folder=None):
    """x float32 (M, 28, 28, 1) from test.npz, checked against meta.json."""
    x = load_test(folder)
    if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
        raise UserError(f"test.npz: expected images (M, 28, 28, 1), got {x.shape}: rerun `make prepare`")
    meta = load_meta(folder)
    test_rows = meta.get("test_rows")
    if test_rows is not None and test_rows != len(x):
        raise UserError(f"test.npz has {len(x)} rows but meta.json says {test_rows}: rerun `make prepare`")
    sha = meta.get("test_array_sha256")  # a test.npz copied or restored by hand is not the one prepared
    if sha is not None and hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() != sha:
        raise UserError(f"test.npz holds other images than the test.csv meta.json names (copied or restored by "
                        f"hand?): `python -m pipeline.prepare` writes data/processed anew")
    return x


def load_split(folder=None):
    """(train_idx, val_idx) written by prepare."""
    d = _load("split.npz", ("train_idx", "val_idx"), folder)
    rows = load_meta(folder).get("train_rows")
    for name in ("train_idx", "val_idx"):
        idx = d[name]
        if idx.dtype.kind not in "iu" or idx.ndim != 1 or (
                len(idx) and not (0 <= idx.min() and (not isinstance(rows, int) or idx.max() < rows))):
            raise UserError(f"split.npz: {name} is not a list of train.csv rows ({idx.dtype} {idx.shape}): "
                            f"{_rebuild_advice(folder)}")
    return d["train_idx"], d["val_idx"]


def load_meta(folder=None):
    path = (folder or paths.data_processed()) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: run `make prepare` first")
    return read_json_object(path, _rebuild_advice(folder))


def stratified_split(y, val_fraction, seed):
    """Seeded stratified split of row indices: about `val_fraction` of each class goes to validation.

    Every class with at least 2 rows keeps at least one row on each side. Returns sorted
    (train_idx, val_idx) int64 arrays.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if seed < 0:  # numpy's generators take no negative seed: a traceback otherwise
        raise UserError(f"the split seed must be 0 or more, got {seed}")
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
    if len(y) and not len(val_idx):
        raise UserError("no digit has 2 rows in train.csv, so the validation split would be empty: "
                        "every digit needs at least 2 rows")
    mask = np.ones(len(y), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask).astype(np.int64), val_idx


def source_record(raw_dir):
    """The fetch's record beside the raw CSVs as a dict ({} when missing or damaged): source, test_sha256, seed."""
    try:
        record = json_loads((Path(raw_dir) / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def answer_key_test_sha256(raw_dir):
    """The sha256 of the test.csv the answer key in raw_dir was written with (an mnist fetch), or None when no
    record says (a copy fetched before the record kept it, or none)."""
    record = source_record(raw_dir)
    sha = record.get("test_sha256") if record.get("source") == "mnist" else None
    return sha if isinstance(sha, str) else None
