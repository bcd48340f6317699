"""Score a submission against the offline answer key (SOURCE=mnist only).

    python -m pipeline.score [--submission submissions/submission.csv] [--key data/raw/test_labels.csv]

The key `ImageId,Label,mnist_test` is written by the offline mnist source; real Kaggle data has none.
This is the ONLY module that reads it: training and model selection never see the test labels.
Prints accuracy (all rows and the official MNIST test rows), per-class precision/recall/F1 and the
confusion matrix, and saves them as score.json beside the submission, naming the run `make submit` wrote it
from (RUN=, when given, must be that run).
"""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import dataset, paths, runs, submit
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import file_sha256, read_json_object, write_json
from pipeline.submit import validate_submission

KEY_COLUMNS = ["ImageId", "Label", "mnist_test"]


def confusion_matrix(y_true, y_pred, num_classes=dataset.NUM_CLASSES):
    """int64 (C, C): entry [t, p] counts images of true class t predicted as p."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def per_class_scores(confusion):
    """Per-class precision, recall, F1 and support from a (C, C) confusion matrix (0 where undefined)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    hits = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    rows = []
    for c in range(len(confusion)):
        precision = hits[c] / predicted[c] if predicted[c] else 0.0
        recall = hits[c] / actual[c] if actual[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": c, "precision": float(precision), "recall": float(recall), "f1": float(f1),
                     "support": int(actual[c])})
    return rows


def _accuracy(y_true, y_pred):
    n = len(y_true)
    correct = int(np.sum(y_true == y_pred))
    return {"rows": n, "correct": correct, "accuracy": correct / n if n else None}


def score_predictions(y_true, y_pred, official):
    """Every figure of score.json from true labels, predicted labels and the official-row mask (all (M,)).

    {accuracy, correct, rows, official_mnist_test: {accuracy, correct, rows}, macro_f1,
     per_class: [{class, precision, recall, f1, support}], confusion: (10, 10) rows true, columns predicted}
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    official = np.asarray(official, dtype=bool)
    confusion = confusion_matrix(y_true, y_pred)
    per_class = per_class_scores(confusion)
    return {
        **_accuracy(y_true, y_pred),  # accuracy, correct, rows over every test row: the headline
        "official_mnist_test": _accuracy(y_true[official], y_pred[official]),
        "macro_f1": float(np.mean([r["f1"] for r in per_class])),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def load_answer_key(path):
    """(labels int64 (M,), official bool (M,)) ordered by ImageId 1..M."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no answer key at {path}: scoring needs the offline answer key, which only the "
                        f"mnist source writes (`make fetch SOURCE=mnist`); real Kaggle test labels are hidden")
    try:
        key = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the answer key: {exc}") from None
    if list(key.columns) != KEY_COLUMNS:
        raise UserError(f"{path}: header must be {','.join(KEY_COLUMNS)}, got {','.join(map(str, key.columns))}")
    if key.isna().any().any() or not all(pd.api.types.is_integer_dtype(key[c]) for c in KEY_COLUMNS):
        raise UserError(f"{path}: every value must be an integer")
    if not np.array_equal(key["ImageId"].to_numpy(), np.arange(1, len(key) + 1)):
        raise UserError(f"{path}: ImageId must be 1..{len(key)} in order")
    labels = key["Label"].to_numpy(dtype=np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= dataset.NUM_CLASSES:
        raise UserError(f"{path}: Label must be 0..{dataset.NUM_CLASSES - 1}")
    if not key["mnist_test"].isin([0, 1]).all():
        raise UserError(f"{path}: mnist_test must be 0 or 1")
    return labels, key["mnist_test"].to_numpy() == 1


def prepared_test():
    """prepare's record of test.csv (meta.json), or {} before any prepare, once the default key is known to answer
    it. The key answers data/raw/test.csv as the mnist fetch wrote it: one replaced since it was prepared, or
    since the fetch (Kaggle's CSVs unzipped over it), is another than the submission answers."""
    try:
        meta = dataset.load_meta()
    except UserError:
        return {}
    if submit.test_csv_replaced(meta):
        raise UserError(f"{paths.data_raw() / 'test.csv'} changed since it was prepared, so the key answers another "
                        f"test.csv than the submission: `make prepare`, then `make submit RUN=...` and `make score`")
    answered = dataset.answer_key_test_sha256(paths.data_raw())
    key = paths.data_raw() / "test_labels.csv"
    if answered is None and key.is_file():  # Kaggle's CSVs unzipped over such a copy were graded, ~10 %, exit 0
        raise UserError(f"no fetch record says which test.csv {key} answers (a copy fetched before fetches kept "
                        f"one, or a key put there by hand): `make fetch SOURCE=mnist` writes both anew (a key of "
                        f"your own: `python -m pipeline.score --key FILE`)")
    if answered and meta.get("test_sha256") and answered != meta["test_sha256"]:
        raise UserError(f"{paths.data_raw() / 'test_labels.csv'} answers the test.csv the mnist fetch wrote, not the "
                        f"one in {paths.data_raw()} now (replaced since): `make fetch SOURCE=mnist` writes both anew")
    return meta


def score_submission(submission_path, key_path, test_rows=None, name=None):
    """Validate the submission against the key's row count and score it; returns the score dict. test_rows:
    the prepared test.csv's, which the key must have too (None: not checked); name: the submission's in
    messages (default: its path; a private copy's is the user's file's)."""
    labels, official = load_answer_key(key_path)
    if test_rows is not None and len(labels) != test_rows:  # blame the key, not a submission that fits test.csv
        raise UserError(f"{key_path} has {len(labels)} rows but the prepared test.csv has {test_rows}: the key is "
                        f"damaged or of other data (`make fetch SOURCE=mnist` writes both anew)")
    submission = validate_submission(submission_path, len(labels), name=name)
    score = score_predictions(labels, submission["Label"].to_numpy(), official)
    return {"submission": str(submission_path), "key": str(key_path), **score}


def submission_origin(submission, sha, run_name, prepared):
    """(run name or None, a note, a warning) for the CSV at `submission` whose bytes have `sha`: the run `make submit`
    wrote it from, by the record it keeps beside the default submission, which must answer the test.csv of
    `prepared` (meta.json; {}: not checked). RUN= given (run_name) must be that run:
    a score read as one run's would be another's. A run changed since (trained on, blended, data prepared again)
    is said, not refused: the CSV holds its predictions of then, perhaps the ones uploaded."""
    record = None
    if paths.same_file(submission, submit.default_out()):
        try:
            record = read_json_object(submission.parent / submit.SUBMISSION_RECORD, "")
        except (OSError, UserError):
            record = None
    if record and not runs.RUN_NAME.fullmatch(str(record.get("run"))):
        record = None  # damaged: as if there were none
    written_from = record["run"] if record and record.get("sha256") == sha else None
    answered, now = (record or {}).get("test_sha256"), prepared.get("test_sha256")
    if written_from and answered and now and answered != now:  # made before test.csv changed: graded, ~10 %
        raise UserError(f"{submission} answers the test.csv of when it was written from runs/{written_from} "
                        f"({record.get('time')}), not the one prepared now: `make submit RUN={written_from}` "
                        f"writes its predictions of this one")
    learnt, prepared_train = (record or {}).get("train_sha256"), prepared.get("train_sha256")
    # the key's test rows may be rows the run learnt (a fetch with another seed or source since)
    if written_from and isinstance(learnt, str) and prepared_train and learnt != prepared_train:
        raise UserError(f"{submission} comes from runs/{written_from}, which learnt another train.csv than the one "
                        f"prepared now: the key's rows may be images it learnt from, and its score would flatter "
                        f"it; train a run on this data (`make train RUN=...`), or prepare the data it learnt")
    if run_name and written_from != run_name:
        if written_from:  # `make submit RUN=run_name` writes the CSV anew: .run names another run
            raise UserError(f"{submission} was written from runs/{written_from}, not runs/{run_name}: "
                            f"`make submit RUN={run_name}` writes that run's, then `make score RUN={run_name}`")
        how = "it was edited, replaced or written by hand since" if record else "no `make submit` recorded it"
        raise UserError(f"{submission} is not a CSV `make submit` wrote from runs/{run_name} ({how}): remove it, "
                        f"then `make submit RUN={run_name}` writes that run's")
    if written_from is None:
        if record:
            return None, "", (f"{submission} changed since `make submit` wrote it from runs/{record['run']}: "
                              f"scored as it is")
        if paths.same_file(submission, submit.default_out()):  # a submit killed while it wrote
            return None, "", (f"no `make submit` record of {submission} (a submit cut short?): scored as it is, "
                              f"unchecked; `make submit RUN=...` writes it anew")
        return None, "", ""
    run = runs.Run(written_from)
    if not run.folder.is_dir():
        return written_from, f"runs/{written_from} is gone since", ""
    try:
        now = run.made_from()
    except UserError as exc:  # the data or the run cannot be read now: the CSV is still the one recorded
        return written_from, f"whether runs/{written_from} changed since cannot be told ({exc})", ""
    if json.dumps(now, sort_keys=True) != json.dumps(record.get("made_from"), sort_keys=True):
        return written_from, (f"runs/{written_from} changed since (trained on, blended, or its data prepared "
                              f"again): this is its score as of {record.get('time')}; `make submit "
                              f"RUN={written_from}` writes its predictions of now"), ""
    return written_from, "", ""


def format_accuracy(score):
    lines = []
    for title, part in (("accuracy, all test rows", score), ("accuracy, official MNIST", score["official_mnist_test"])):
        acc = "n/a" if part["accuracy"] is None else f"{100 * part['accuracy']:.2f}%"
        lines.append(f"{title:<26} {acc:>8}  ({part['correct']}/{part['rows']})")
    lines.append(f"{'macro F1':<26} {score['macro_f1']:>8.4f}")
    return "\n".join(lines)


def format_per_class(per_class):
    lines = ["class  precision  recall      F1  support"]
    lines += [f"{r['class']:>5}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}  {r['support']:>7}"
              for r in per_class]
    return "\n".join(lines)


def format_confusion(confusion):
    """Rows: true class; columns: predicted class."""
    confusion = np.asarray(confusion)
    width = max(5, len(str(int(confusion.max(initial=0)))) + 1)
    lines = ["true\\pred" + "".join(f"{p:>{width}}" for p in range(len(confusion)))]
    lines += [f"{t:>9}" + "".join(f"{v:>{width}}" for v in row) for t, row in enumerate(confusion)]
    return "\n".join(lines)


def parse_args(argv):
    p = StageArgumentParser(prog="python -m pipeline.score", description=__doc__.splitlines()[0])
    p.add_argument("--submission", type=Path, default=None, help="default submissions/submission.csv")
    p.add_argument("--key", type=Path, default=None, help="default data/raw/test_labels.csv")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default score.json beside the submission; never under runs/, data/ or configs/)")
    p.add_argument("--run", default=None, help="the run the submission must come from (default: the one "
                   "`make submit` recorded; none for another CSV)")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    submission = args.submission or paths.submissions() / "submission.csv"
    key = args.key or paths.data_raw() / "test_labels.csv"
    if not submission.is_file():
        what = "is not a file" if submission.exists() else "does not exist"  # a folder: not "missing"
        raise UserError(f"{submission} {what}: `make submit` writes submissions/submission.csv")
    out = args.out or submission.parent / submit.SCORE_RECORD
    if paths.same_file(out, submission) or paths.same_file(out, key):
        raise UserError(f"--out {out} is the {'submission' if paths.same_file(out, submission) else 'key'} "
                        f"itself: give another path for the JSON")
    if args.out:
        paths.check_out(out, submit.records())
    with submit.private_copy(submission) as copy:  # one CSV scored, hashed and named, whatever a submit does
        sha = file_sha256(copy)
        prepared = prepared_test() if args.key is None else {}
        name, note, warning = submission_origin(submission, sha, args.run, prepared)
        score = score_submission(copy, key, prepared.get("test_rows"), name=str(submission))
    score = {**score, "submission": str(submission), "run": name, "submission_sha256": sha}
    write_json(out, score)
    print(f"score of {submission} ({f'run {name}' if name else 'of no known run'}) against {key}")
    if warning:  # said after the score: a refusal stays one line
        print(f"warning: {warning}", file=sys.stderr)
    if note:
        print(f"note: {note}")
    print(format_accuracy(score))
    print()
    print(format_per_class(score["per_class"]))
    print()
    print("confusion matrix (rows: true class, columns: predicted class)")
    print(format_confusion(score["confusion"]))
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
