"""Stage `prepare`: validate the raw CSVs, then write the processed arrays and the split.

    python -m pipeline.prepare [--raw DIR] [--out DIR] [--val-fraction 0.1] [--split-seed 0]

Both files are read and checked completely before anything is written, so a bad file leaves
data/processed as it was. The checks: the exact Kaggle header, 785 (train) / 784 (test) values on
every row, every value an integer 0..255 written in digits, labels 0..9, each label present. Accepted
as well: CRLF line endings, a UTF-8 BOM, quoted numbers ("12"), no final newline.

An error is one line naming the file, the data row (1-based, the header not counted) with its line
number in the file, and the column:  data/raw/train.csv: row 17 (line 18), column pixel301: value 256
is outside 0..255.

Outputs follow the layout in pipeline.dataset; meta.json is written last: present means complete,
and its date is what later stages compare with (`make submit` predicts again after a prepare).
"""
import argparse
import csv
import hashlib
import io
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import dataset, paths
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import file_sha256, held_lock, save_npz, write_json

PIXELS = 784
TEST_HEADER = tuple(f"pixel{i}" for i in range(PIXELS))
TRAIN_HEADER = ("label",) + TEST_HEADER
BOM = b"\xef\xbb\xbf"
QUOTED_NUMBER = re.compile(rb'(?<![^,\n])"([0-9]*)"(?![^,\n])')   # a whole field "123", quotes dropped
NOT_CSV_DIGITS = re.compile(rb"[^0-9,\n]")
# A cell of four or more significant digits (leading zeros aside): 1000 or more, outside every column's range.
FOUR_DIGITS = re.compile(rb"(?<![0-9])0*[1-9][0-9]{3,}")
MAX_SHOWN = 24                                                     # characters of a bad value to quote
VAL_FRACTION = 0.1                                                 # share of each digit held out, by default
SPLIT_SEED = 0


def shown(path) -> str:
    """The path as the user would type it: relative to the working directory when inside it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path) if relative.startswith("..") else relative


class CsvChecker:
    """Error lines for one file: `fail` builds the UserError, `at` finds the cell at a byte offset."""

    def __init__(self, path, columns):
        self.path, self.columns = path, columns

    def fail(self, where, message):
        return UserError(f"{shown(self.path)}: {where}: {message}")

    def cell(self, row, col, message):
        return self.fail(f"row {row + 1} (line {row + 2}), column {self.columns[col]}", message)

    def at(self, body, pos):
        """(row, column, text) of the cell holding byte `pos` of the body (the lines after the header)."""
        row = body.count(b"\n", 0, pos)
        line_start = body.rfind(b"\n", 0, pos) + 1
        col = body.count(b",", line_start, pos)
        start = max(line_start, body.rfind(b",", line_start, pos) + 1)
        ends = [i for i in (body.find(b",", pos), body.find(b"\n", pos)) if i >= 0]
        text = body[start:min(ends) if ends else len(body)].decode("utf-8", "replace")
        return row, col, text


def _describe_bad_value(text, column):
    quoted = repr(text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "...")
    if re.fullmatch(r"-[0-9]+", text):
        return f"value {text} is outside {_limit(column)}"
    if re.fullmatch(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?", text):
        return f"value {quoted} is not an integer"
    return f"value {quoted} is not a whole number written in digits"


def _check_header(check, header_bytes, expected):
    try:
        header_text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise check.fail("line 1 (header)", "not UTF-8 text") from None
    try:
        got = next(csv.reader([header_text]), [])
    except csv.Error:  # a field over csv's limit (128 KiB): a file of NUL bytes left by a cut-short copy, say
        raise check.fail("line 1 (header)", "not the competition's header (a field of more than 128 KiB)") from None
    for j in range(max(len(got), len(expected))):
        if j >= len(got):
            raise check.fail("line 1 (header)", f"{len(got)} columns where {len(expected)} were expected "
                                                f"('{expected[j]}' is missing)")
        if j >= len(expected):
            raise check.fail("line 1 (header)", f"{len(got)} columns where {len(expected)} were expected "
                                                f"(extra column '{got[j][:MAX_SHOWN]}')")
        if got[j] != expected[j]:
            again = f", a duplicate of column {got.index(got[j]) + 1}" if got.index(got[j]) < j else ""
            raise check.fail(f"line 1 (header), column {j + 1}",
                             f"'{got[j][:MAX_SHOWN]}' where '{expected[j]}' was expected{again}")


def _limit(column):
    return "0..9 (a digit label)" if column == "label" else "0..255"


def _first_empty_field(body):
    """Byte offset of the first empty field (',,' or a row that starts or ends with ','), or -1."""
    hits = [0] if body.startswith(b",") else []
    hits += [i + 1 for i in (body.find(b",,"), body.find(b",\n"), body.find(b"\n,")) if i >= 0]
    return min(hits) if hits else -1


def read_digit_csv(path, header):
    """Validate a Kaggle digit CSV and return (values, sha256): values uint8 (N, len(header)).

    Raises UserError with one line for the first problem found.
    """
    path = Path(path)
    check = CsvChecker(path, header)
    problem = dataset.raw_csv_problem(path)
    if problem == "missing":
        raise UserError(f"{shown(path)}: missing: run `make fetch` first")
    if problem:
        raise UserError(f"{shown(path)}: {problem}, so not the competition's file: `make fetch` replaces it")
    rows = _count_lines(path)
    if rows > dataset.MAX_CSV_ROWS + 1:
        raise UserError(f"{shown(path)}: {rows} lines, more than a digit CSV of at most {dataset.MAX_CSV_ROWS} rows: "
                        f"not the competition's file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{shown(path)}: cannot be read: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if data.startswith(BOM):
        data = data[len(BOM):]
    if not data.strip():
        raise UserError(f"{shown(path)}: the file is empty")
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
        stray = data.find(b"\r")
        if stray >= 0:
            line = data.count(b"\n", 0, stray) + 1
            raise check.fail(f"line {line}", "carriage return not followed by a newline")
    if not data.endswith(b"\n"):
        data += b"\n"
    header_end = data.find(b"\n")
    _check_header(check, data[:header_end], header)
    body = data[header_end + 1:]
    if not body:
        raise UserError(f"{shown(path)}: has a header but no data rows")

    if b'"' in body:
        body = QUOTED_NUMBER.sub(rb"\1", body)
    lines = body.split(b"\n")[:-1]
    commas = np.fromiter((line.count(b",") for line in lines), dtype=np.int64, count=len(lines))
    wrong = np.flatnonzero(commas != len(header) - 1)
    if wrong.size:
        row = int(wrong[0])
        where = f"row {row + 1} (line {row + 2})"
        if not lines[row].strip():
            raise check.fail(where, "empty line")
        raise check.fail(where, f"{commas[row] + 1} values where {len(header)} were expected")
    del lines
    bad = NOT_CSV_DIGITS.search(body) if body.translate(None, b"0123456789,\n") else None
    if bad:
        row, col, text = check.at(body, bad.start())
        raise check.cell(row, col, _describe_bad_value(text, header[col]))
    empty = _first_empty_field(body)
    if empty >= 0:
        row, col, _ = check.at(body, empty)
        raise check.cell(row, col, "missing value")

    # Only digits and separators remain, every row the right width: the C parser can take it.
    frame = pd.read_csv(io.BytesIO(body), header=None, names=range(len(header)), na_filter=False, engine="c")
    if not all(isinstance(t, np.dtype) and np.issubdtype(t, np.signedinteger) for t in frame.dtypes):
        # too many digits for int64: pandas read the column as uint64, float or text
        big = FOUR_DIGITS.search(body)  # the first cell of 1000 or more, however long
        row, col, text = check.at(body, big.start())
        raise check.cell(row, col, f"value {text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + '...'} is "
                                   f"outside {_limit(header[col])}")
    values = frame.to_numpy(dtype=np.int64)
    del frame
    out_of_range = values > 255
    if header[0] == "label":
        out_of_range[:, 0] = values[:, 0] > 9
    if out_of_range.any():
        row, col = np.unravel_index(np.argmax(out_of_range), out_of_range.shape)
        raise check.cell(int(row), int(col), f"value {values[row, col]} is outside {_limit(header[col])}")
    return values.astype(np.uint8), digest


def _count_lines(path, block=1 << 22):
    """Lines of a file, counted in blocks before anything is held whole."""
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(block), b""))


def to_images(pixels):
    """(N, 784) integers 0..255 -> float32 (N, 28, 28, 1) in [0, 1]."""
    return (pixels.reshape((-1,) + dataset.IMAGE_SHAPE).astype(np.float32) / np.float32(255.0))


def check_against_sample_submission(path, test_rows, test_path):
    """Kaggle's sample_submission.csv has one row per test image: a test.csv with another count (a row lost
    or added in an edit, a partial download) would give a submission Kaggle refuses, after the whole night's
    training. Without the file (a test.csv of one's own) there is nothing to compare."""
    if not path.is_file():
        return
    try:
        with open(path, "rb") as f:
            rows = sum(1 for line in f if line.strip()) - 1  # minus the header
    except OSError as exc:
        raise UserError(f"{shown(path)}: cannot read it ({exc.strerror})") from None
    if rows != test_rows:
        raise UserError(f"{shown(test_path)} has {test_rows} rows but {shown(path)} has {rows}: a submission needs "
                        f"one row per test image; fetch the data again (`make fetch`), or remove "
                        f"sample_submission.csv if this test.csv is your own")


def build_parser():
    p = StageArgumentParser(prog="python -m pipeline.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, default=None, help="folder with train.csv and test.csv (default: data/raw)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: data/processed)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"share of each class held out (default: {VAL_FRACTION}; with --if-needed, the prepared one)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the stratified split (default: 0; with --if-needed, the prepared one)")
    p.add_argument("--if-needed", action="store_true",
                   help="do nothing when the output already holds these CSVs (by sha256), split this way")
    return p


def prepared_meta(out_dir):
    """meta.json of an earlier prepare into out_dir, or None."""
    try:
        return dataset.load_meta(out_dir)
    except UserError:
        return None


def arrays_present(out_dir):
    """Whether out_dir holds every file a prepare writes (their contents are up_to_date's question)."""
    return all((Path(out_dir) / name).is_file() for name in ("meta.json", "train.npz", "test.npz", "split.npz"))


def up_to_date(meta, raw_dir, out_dir, val_fraction, split_seed):
    """Whether out_dir, prepared into `meta`, already holds train.csv and test.csv as they are now, split as asked
    (None: as it was). By content, not by date: an unzip, `cp -p` or `rsync -a` gives new CSVs old dates."""
    if not arrays_present(out_dir):
        return False
    if split_seed not in (None, meta.get("split_seed")) or val_fraction not in (None, meta.get("val_fraction")):
        return False
    try:  # split.npz of the split meta.json names (two prepares at once, before the lock, mixed them)
        if len(dataset.load_split(out_dir)[1]) != meta.get("n_val"):
            return False
    except UserError:
        return False  # a damaged split.npz: prepared again
    if any(dataset.raw_csv_problem(raw_dir / f"{name}.csv") for name in ("train", "test")):
        return False  # a FIFO or a device would be hashed forever: preparing says what is wrong, in one line
    try:
        return all(meta.get(f"{name}_sha256") == file_sha256(raw_dir / f"{name}.csv") for name in ("train", "test"))
    except OSError:
        return False  # a CSV missing or unreadable: preparing says which, in one line


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    raw_dir = args.raw or paths.data_raw()
    out_dir = args.out or paths.data_processed()
    # two prepares at once (`make train RUN=a` beside `make train RUN=b VAL_FRACTION=0.5`) mixed their files:
    # meta.json of one, split.npz of the other, and every later prepare said "nothing to do"
    lock = out_dir.parent / f".{out_dir.name}.lock"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    note = f"pid {os.getpid()} (prepare, since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    with held_lock(lock, note, lambda holder: f"waiting for {holder}, which is preparing {shown(out_dir)}",
                   wait=True):  # (a prepare takes seconds; `make train` beside `make train` both ask for one)
        return prepare(args, raw_dir, out_dir)


def prepare(args, raw_dir, out_dir):
    if (raw_dir / dataset.FETCH_INCOMPLETE).exists():
        raise UserError(f"{raw_dir} holds a fetch that was cut short (some CSVs new, some old): `make fetch` "
                        f"fetches it again (or, if you put the CSVs there yourself since, delete "
                        f"{raw_dir / dataset.FETCH_INCOMPLETE})")
    recorded = (prepared_meta(out_dir) or {}) if args.if_needed else {}
    if recorded and up_to_date(recorded, raw_dir, out_dir, args.val_fraction, args.split_seed):
        print(f"{shown(out_dir)} already holds {shown(raw_dir)}'s train.csv and test.csv (by sha256); nothing to do")
        return 0
    # with --if-needed, new CSVs keep the split asked for before
    if args.val_fraction is None:
        fraction = recorded.get("val_fraction")
        args.val_fraction = fraction if isinstance(fraction, float) and 0 < fraction < 1 else VAL_FRACTION
    if args.split_seed is None:
        seed = recorded.get("split_seed")
        args.split_seed = seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else SPLIT_SEED
    train_path, test_path = raw_dir / "train.csv", raw_dir / "test.csv"
    print(f"reading {shown(train_path)}")
    train, train_sha = read_digit_csv(train_path, TRAIN_HEADER)
    print(f"reading {shown(test_path)}")
    test, test_sha = read_digit_csv(test_path, TEST_HEADER)
    check_against_sample_submission(raw_dir / "sample_submission.csv", len(test), test_path)
    y = train[:, 0].astype(np.int64)
    class_counts = np.bincount(y, minlength=dataset.NUM_CLASSES)
    absent = [str(k) for k in range(dataset.NUM_CLASSES) if class_counts[k] == 0]
    if absent:
        raise UserError(f"{shown(train_path)}: no row has label {', '.join(absent)}: every digit needs a training row")
    train_idx, val_idx = dataset.stratified_split(y, args.val_fraction, args.split_seed)

    # Everything is valid: now write. meta.json is removed first, written last: present means complete.
    (out_dir / "meta.json").unlink(missing_ok=True)
    save_npz(out_dir / "train.npz", {"x": to_images(train[:, 1:]), "y": y})
    test_images = to_images(test)
    save_npz(out_dir / "test.npz", {"x": test_images})
    save_npz(out_dir / "split.npz", {"train_idx": train_idx, "val_idx": val_idx})
    write_json(out_dir / "meta.json", {
        "train_rows": int(len(train)),
        "test_rows": int(len(test)),
        "class_counts": class_counts.tolist(),
        "val_class_counts": np.bincount(y[val_idx], minlength=dataset.NUM_CLASSES).tolist(),
        "train_sha256": train_sha,
        "test_sha256": test_sha,
        "test_array_sha256": hashlib.sha256(test_images.tobytes()).hexdigest(),
        "split_seed": args.split_seed,
        "val_fraction": args.val_fraction,
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
    })
    print(f"wrote {shown(out_dir)}: {len(train)} training rows ({len(train_idx)} train / {len(val_idx)} val, "
          f"split seed {args.split_seed}), {len(test)} test rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
