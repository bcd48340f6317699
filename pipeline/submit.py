"""Write the Kaggle submission of a run and upload it when credentials exist.

    python -m pipeline.submit --run NAME [--upload 0|1] [--out submissions/submission.csv] [--message TEXT]
    python -m pipeline.submit --run NAME --upload-only [--upload 0|1] [--message TEXT]

The CSV is `ImageId,Label` with ImageId 1..M in test.csv order and Label the argmax of
runs/NAME/test_probs.npz (refused when they were made from other data or another model). It is validated
before it is written (atomically), so an invalid submission never replaces a good one. A failed upload
exits 2 but leaves the written CSV in place.

An upload that succeeded is recorded in .uploaded.json beside the CSV (its sha256): --upload-only uploads
the existing CSV unless that very file was uploaded already, so `make submit` retries a failed upload
and never repeats a successful one.
"""
import contextlib
import csv
import hashlib
import io
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import console, dataset, paths, runs
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import file_sha256, held_lock, json_loads, write_bytes, write_json, write_text

COLUMNS = ["ImageId", "Label"]
COMPETITION = "digit-recognizer"
UPLOAD_RECORD = ".uploaded.json"
UPLOAD_LOCK = ".upload.lock"  # held while one upload runs
# The run the default submission was written from: the Makefile rewrites the CSV when RUN names another.
RUN_RECORD = ".run"
SCORE_RECORD = "score.json"  # pipeline.score's, beside the submission: stale once the CSV is written anew
SUBMISSION_RECORD = ".submission.json"  # the run, predictions and bytes of the CSV written: what score names


def labels_from_probs(probs):
    """probs (M, 10) -> int64 labels (M,): the most probable class of each test image."""
    return np.asarray(probs).argmax(axis=1).astype(np.int64)


def build_submission(labels):
    """labels (M,) -> DataFrame ImageId 1..M, Label."""
    labels = np.asarray(labels, dtype=np.int64)
    return pd.DataFrame({"ImageId": np.arange(1, len(labels) + 1, dtype=np.int64), "Label": labels})


def _read_csv_strict(source, name):
    """Read a submission CSV as text cells, refusing rows with the wrong number of fields."""
    try:
        if isinstance(source, (str, Path)):
            with open(source, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.reader(fh))
        else:
            rows = list(csv.reader(source))
    except FileNotFoundError:
        raise UserError(f"{name} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{name}: cannot read it as CSV: {exc}") from None
    if not rows:
        raise UserError(f"{name} is empty: expected the header {','.join(COLUMNS)}")
    header, body = rows[0], rows[1:]
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise UserError(f"{name} line {line}: {len(row)} fields, expected {len(header)}")
    return pd.DataFrame(body, columns=header, dtype=object)


def validate_submission(submission, n_test, name=None):
    """Check a submission (DataFrame, CSV path, or text stream) for n_test test images.

    Rules: header exactly ImageId,Label; n_test rows; no missing values; integers only; ImageId is
    1..n_test in order; Label in 0..9. Raises UserError naming the first problem; returns the
    submission as a DataFrame of int64 columns.
    """
    if name is None:
        name = str(submission) if isinstance(submission, (str, Path)) else "submission"
    df = submission if isinstance(submission, pd.DataFrame) else _read_csv_strict(submission, name)

    if [str(c) for c in df.columns] != COLUMNS:
        raise UserError(f"{name}: header must be {','.join(COLUMNS)}, got {','.join(map(str, df.columns))}")
    if len(df) != n_test:
        raise UserError(f"{name}: {len(df)} rows, expected one per test image ({n_test})")

    parsed = {}
    for col in COLUMNS:
        values = df[col]
        if values.dtype == bool:
            raise UserError(f"{name}: {col} must be integers, got booleans")
        text = values.astype(str).str.strip()
        missing = values.isna().to_numpy() | (text == "").to_numpy()
        if missing.any():
            raise UserError(f"{name}: {int(missing.sum())} missing {col} values (first at row {_first(missing)})")
        integer = text.str.fullmatch(r"[+-]?\d{1,18}").to_numpy()  # 18 digits always fit in int64
        if not integer.all():
            row = _first(~integer)
            raise UserError(f"{name}: {col} must be integers, row {row} has {text.iloc[row - 1]!r}")
        parsed[col] = text.astype(np.int64).to_numpy()

    expected_ids = np.arange(1, n_test + 1, dtype=np.int64)
    wrong_id = parsed["ImageId"] != expected_ids
    if wrong_id.any():
        row = _first(wrong_id)
        raise UserError(f"{name}: ImageId must be 1..{n_test} in order, row {row} has {parsed['ImageId'][row - 1]}")
    labels = parsed["Label"]
    bad_label = (labels < 0) | (labels >= dataset.NUM_CLASSES)
    if bad_label.any():
        row = _first(bad_label)
        raise UserError(f"{name}: Label must be 0..{dataset.NUM_CLASSES - 1}, row {row} has {labels[row - 1]}")
    return pd.DataFrame(parsed)


def _first(mask):
    """1-based row number of the first True in mask (data rows, header not counted)."""
    return int(np.flatnonzero(mask)[0]) + 1


def write_submission(df, path, n_test):
    """Validate the exact CSV text, then write it atomically; an invalid one leaves `path` untouched. Returns the
    sha256 of the bytes written (what is on disk a moment later may be another submit's)."""
    text = df.to_csv(index=False, lineterminator="\n")
    validate_submission(io.StringIO(text), n_test, name=f"{path} (not written)")
    data = text.encode("utf-8")
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def upload_message(run_name, summary, extra=""):
    """Kaggle submission message naming the run, its architecture and its validation accuracy."""
    acc = console.finite(summary.get("best_val_acc"))
    acc_text = "val acc unknown" if acc is None else f"val acc {100 * acc:.2f}%"
    arch = summary.get("arch")
    head = f"run {run_name}" + (f" ({arch})" if arch else "") + f", {acc_text}"
    return f"{extra.strip()} | {head}" if extra and extra.strip() else head


def parse_args(argv):
    p = StageArgumentParser(prog="python -m pipeline.submit", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run name under runs/ (its test_probs.npz is used)")
    p.add_argument("--upload", type=int, choices=[0, 1], default=1,
                   help="1: upload when Kaggle credentials exist (default); 0: only write the CSV")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV path (default submissions/submission.csv; never under runs/, data/ or configs/)")
    p.add_argument("--message", default="", help="text added to the submission message")
    p.add_argument("--force", action="store_true",
                   help="submit a run that did not learn (validation accuracy near chance) all the same")
    p.add_argument("--upload-only", action="store_true",
                   help="do not write the CSV: upload the existing one unless it was uploaded already")
    return p.parse_args(argv)


def records():
    """The files beside the default submission that make and score read (never an --out)."""
    return [paths.submissions() / name for name in (RUN_RECORD, SUBMISSION_RECORD, UPLOAD_RECORD, UPLOAD_LOCK)]


def upload_record(path):
    return Path(path).parent / UPLOAD_RECORD


def already_uploaded(path, sha):
    """The record beside `path` of an upload of the bytes whose sha256 is `sha`, or None."""
    try:
        record = json_loads(upload_record(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("sha256") == sha else None


@contextlib.contextmanager
def private_copy(path):
    """A copy of `path`, under its own name, in a temporary folder of this process: the bytes checked are the
    bytes sent and recorded, even if another `make submit` replaces the CSV meanwhile."""
    with tempfile.TemporaryDirectory(prefix="pipeline-upload-") as folder:
        copy = Path(folder) / Path(path).name
        shutil.copyfile(path, copy)
        yield copy


def upload_if_current(path, run, message, upload_wanted, n_test, probs, just_written=False):
    """Upload the CSV at `path` under the run's name (once: a success is recorded), if it holds the labels of
    `probs`, the run's predictions of now; returns the exit code. The CSV on disk may be another run's
    (`python -m pipeline.submit --run other`), older than the predictions, or replaced by another submit since
    it was written: the check is made on a private copy, and that copy is what is sent and recorded. A CSV not
    to be uploaded is checked too (it is called ready), unless this process has `just_written` it."""
    if just_written and not upload_wanted:
        print(f"{console.next_step('upload')}; {path} is ready")
        return 0
    with private_copy(path) as copy:
        labels = validate_submission(copy, n_test, name=str(path))["Label"].to_numpy()  # the user's file named
        if not np.array_equal(labels, labels_from_probs(probs)):  # checked even when it is not to be uploaded:
            raise UserError(f"{path} does not hold the labels of runs/{run.name}'s current predictions (written "
                            f"from another run, or before they changed), so it is not "
                            f"{'uploaded' if upload_wanted else 'ready'}: remove it, then "
                            f"`make submit RUN={run.name}` writes it again")
        if not upload_wanted:  # it is called ready below, and a user uploads it by hand
            print(f"{console.next_step('upload')}; {path} is ready")
            return 0
        return upload(path, run.name, message, copy)


@contextlib.contextmanager
def upload_lock(path):
    """Hold .upload.lock beside the CSV while one upload checks its record, uploads and writes it: two
    `make submit` at once each found no record and uploaded the same file twice (two of the day's submissions).
    Never waits: the second is refused in one line."""
    note = f"pid {os.getpid()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    with held_lock(Path(path).parent / UPLOAD_LOCK, note, lambda holder: (
            f"{path} is being uploaded by {holder}: wait until it ends (a second upload would spend another of "
            f"the day's submissions)")):
        yield


def upload(path, run_name, message, copy):
    """Upload `copy`, the checked private copy of the CSV at `path`, unless the record beside `path` says these
    bytes went up already; returns the exit code."""
    with upload_lock(path):
        return _upload(path, run_name, message, copy)


def _upload(path, run_name, message, copy):
    sha = file_sha256(copy)
    done = already_uploaded(path, sha)
    if done:
        print(f"{path} was uploaded already ({done.get('time')}: {done.get('answer')}); nothing to do")
        return 0
    from pipeline import kaggle_api

    if answers_offline_test_csv():  # Kaggle would grade it against its own test.csv: about 10 %, a day's try spent
        said = f"{path} answers the offline copy's test.csv (`make fetch` without credentials), not Kaggle's, " \
               f"so it is not uploaded: `make score` scores it here (`UPLOAD=0` keeps it local without this " \
               f"refusal); for Kaggle, `make fetch SOURCE=kaggle` then `make train submit`"
        if kaggle_api.has_credentials():
            raise UserError(said)
        print(said)
        return 0
    if not kaggle_api.has_credentials():
        print(f"{path} is ready; no Kaggle credentials found, so it was not uploaded. Upload it with "
              f"`kaggle competitions submit -c {COMPETITION} -f {shlex.quote(str(path))} -m {shlex.quote(message)}` "
              f"or set credentials and rerun `make submit RUN={run_name}`")
        return 0
    answer = kaggle_api.submit(copy, message)  # UserError on failure: exit 2, the CSV stays, the next try uploads
    try:
        write_json(upload_record(path), {"sha256": sha, "run": run_name, "message": message, "answer": answer,
                                         "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    except OSError as exc:  # a disk full now: without the record the next `make submit` would send it again
        raise UserError(f"uploaded {path} ({answer}), but its record {upload_record(path)} could not be written "
                        f"({exc.strerror}), so a plain `make submit` would send it again: it is on Kaggle already, use "
                        f"`make submit UPLOAD=0` for this file") from None
    print(f"uploaded {path} ({message}): {answer}")
    return 0


def answers_offline_test_csv():
    """Whether the test.csv prepared is the one an mnist fetch wrote (its record names it), not Kaggle's."""
    sha = dataset.answer_key_test_sha256(paths.data_raw())
    return sha is not None and dataset.load_meta().get("test_sha256") == sha


def check_learnt(run, force):
    """Refuse a run whose delivered model did not learn (a diverged loss: every image one digit), unless forced:
    `make train submit LR=50` replaced a good submission with one of about 10 %, and uploaded it."""
    accuracy = delivered_summary(run).get("best_val_acc")
    if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and not accuracy >= runs.CHANCE_LEVEL:
        # NaN too; unknown (a run delivered so far, an old record): not judged
        if not force:
            raise UserError(f"runs/{run.name} did not learn (validation accuracy {accuracy:.4f}; chance is 0.10), "
                            f"so its submission is neither written nor uploaded: retrain it (a smaller LR?), or "
                            f"FORCE=1 submits it all the same")
        print(f"warning: runs/{run.name} did not learn (validation accuracy {accuracy:.4f}; chance is 0.10): "
              f"submitted all the same (FORCE)", file=sys.stderr)


def delivered_summary(run):
    """The run's summary of what it delivers: a single net's, or for an ensemble its blend ("arch") and the
    blend's validation estimate ("best_val_acc")."""
    summary = run.summary()
    blend = run.ensemble_report() if run.is_ensemble else None
    if blend:
        summary = {"arch": f"{blend['strategy']} of {len(blend['weights'])} {summary.get('arch', '')}".strip(),
                   "best_val_acc": blend["estimate"].get("accuracy")}
    return summary


def run_message(run, extra):
    """The upload message of a run: its name, its model (or blend) and its validation accuracy."""
    return upload_message(run.name, delivered_summary(run), extra)


def default_out():
    return paths.submissions() / "submission.csv"


def count_test_rows(run):
    """The number of test images, from meta.json; refused when data/raw/test.csv is not the test.csv prepared (new
    CSVs unzipped with old dates: make cannot tell, and the run's predictions of the old ones would be submitted)."""
    meta = dataset.load_meta()
    n_test = meta.get("test_rows")
    if not isinstance(n_test, int):
        raise UserError(f"{paths.data_processed() / 'meta.json'} has no test_rows: rerun `make prepare`")
    if test_csv_replaced(meta):
        raise UserError(f"{paths.data_raw() / 'test.csv'} changed since it was prepared, so the predictions answer "
                        f"another test.csv: `make prepare`, then `make submit RUN={run.name}` predicts it anew")
    return n_test


def test_csv_replaced(meta):
    """Whether data/raw/test.csv is not the one prepared into `meta` (new CSVs unzipped with their old dates:
    make cannot tell). Without the CSV (a Kaggle kernel, a test.csv of one's own) there is nothing to compare."""
    raw = paths.data_raw() / "test.csv"
    return "test_sha256" in meta and raw.is_file() and file_sha256(raw) != meta["test_sha256"]


@cli_main
def main(argv=None):
    args = parse_args(argv)
    run = runs.Run.existing(args.run)
    out = args.out or default_out()
    if args.out and not args.upload_only:  # (with --upload-only, --out names the CSV to send: read, not written)
        paths.check_out(out, records())
    if args.upload_only:
        if not out.is_file():  # a folder in its place: make takes it as written, so the advice must remove it
            raise UserError(f"{out} is not a file: remove it, then `make submit RUN={run.name}` writes it"
                            if out.exists() or out.is_symlink() else
                            f"{out} does not exist: `make submit RUN={run.name}` writes it")
        n_test = count_test_rows(run)
        with run.lock("submit", shared=True):
            check_learnt(run, args.force)
            message = run_message(run, args.message)
            probs = run.test_probs(n_test)
        return upload_if_current(out, run, message, args.upload, n_test, probs)

    n_test = count_test_rows(run)
    with run.lock("submit", shared=True):
        check_learnt(run, args.force)
        message = run_message(run, args.message)
        made_from = run.made_from()
        meta = dataset.load_meta()
        test_sha = meta.get("test_sha256")  # the test.csv they answer, which score checks
        learnt = run.learnt_train_sha256()  # the train.csv it learnt, which score checks against the key's
        probs = run.test_probs(n_test)  # made from the data and model of now, finite, one row per test image
    if learnt and meta.get("train_sha256") and learnt != meta["train_sha256"]:
        print(f"warning: runs/{run.name} learnt another train.csv than the one prepared now (the data was fetched "
              f"or prepared since): the test images may include images it learnt from", file=sys.stderr)
    labels = labels_from_probs(probs)
    default = paths.same_file(out, default_out())  # however it is spelled: `--out ./submissions/submission.csv`
    if default and out.parent.is_dir():  # a write cut short leaves no record naming a run: make writes it again
        for record in (RUN_RECORD, SUBMISSION_RECORD, SCORE_RECORD):  # the score too: it names the CSV it scored
            (out.parent / record).unlink(missing_ok=True)
    sha = write_submission(build_submission(labels), out, n_test)
    if default:  # the record first: make writes the CSV again unless both are there (a kill between them)
        write_json(out.parent / SUBMISSION_RECORD, {"run": run.name, "sha256": sha, "made_from": made_from,
                                                    "test_sha256": test_sha, "train_sha256": learnt,
                                                    "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        write_text(out.parent / RUN_RECORD, f"{run.name}\n")
    counts = np.bincount(labels, minlength=dataset.NUM_CLASSES)
    print(f"{out}: {n_test} rows from run {args.run}; labels per class: {' '.join(str(int(c)) for c in counts)}")
    return upload_if_current(out, run, message, args.upload, n_test, probs, just_written=True)


if __name__ == "__main__":
    sys.exit(main())
