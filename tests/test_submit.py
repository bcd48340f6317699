"""submit: validate_submission's rules, the CSV written from a run, and the upload paths (no network)."""
import hashlib
import io
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline
from pipeline import runs, submit
from pipeline.errors import UserError

N_TEST = 6


def good_csv(n=N_TEST, labels=None):
    labels = labels if labels is not None else [i % 10 for i in range(n)]
    return "ImageId,Label\n" + "".join(f"{i + 1},{labels[i]}\n" for i in range(n))


def test_validate_accepts_good_csv_dataframe_and_path(tmp_path):
    df = submit.validate_submission(io.StringIO(good_csv()), N_TEST)
    assert df["ImageId"].tolist() == [1, 2, 3, 4, 5, 6]
    assert df["Label"].tolist() == [0, 1, 2, 3, 4, 5]
    path = tmp_path / "s.csv"
    path.write_text(good_csv())
    assert submit.validate_submission(path, N_TEST).equals(df)
    frame = pd.DataFrame({"ImageId": np.arange(1, 7), "Label": [9, 8, 7, 0, 0, 1]})
    assert submit.validate_submission(frame, N_TEST)["Label"].tolist() == [9, 8, 7, 0, 0, 1]


@pytest.mark.parametrize("text, problem", [
    ("imageid,label\n1,0\n2,1\n3,2\n4,3\n5,4\n6,5\n", "header"),
    ("ImageId,Label,Extra\n1,0,0\n2,1,0\n3,2,0\n4,3,0\n5,4,0\n6,5,0\n", "header"),
    ("Label,ImageId\n0,1\n1,2\n2,3\n3,4\n4,5\n5,6\n", "header"),
    ("", "empty"),
    ("ImageId,Label\n1,0\n2,1\n3,2\n4,3\n5,4\n", "rows"),
    ("ImageId,Label\n1,0\n2,1\n3,2\n4,3\n5,4\n6,5\n7,6\n", "rows"),
    ("ImageId,Label\n1,0\n3,1\n2,2\n4,3\n5,4\n6,5\n", "ImageId"),
    ("ImageId,Label\n0,0\n1,1\n2,2\n3,3\n4,4\n5,5\n", "ImageId"),
    ("ImageId,Label\n1,0\n2,1\n3,2\n4,3\n5,4\n5,5\n", "ImageId"),
    ("ImageId,Label\n1,0\n2,1\n3,10\n4,3\n5,4\n6,5\n", "Label must be 0..9"),
    ("ImageId,Label\n1,0\n2,-1\n3,2\n4,3\n5,4\n6,5\n", "Label must be 0..9"),
    ("ImageId,Label\n1,0\n2,1.0\n3,2\n4,3\n5,4\n6,5\n", "integers"),
    ("ImageId,Label\n1,0\n2,seven\n3,2\n4,3\n5,4\n6,5\n", "integers"),
    ("ImageId,Label\n1,0\n2.5,1\n3,2\n4,3\n5,4\n6,5\n", "integers"),
    ("ImageId,Label\n1,0\n2,\n3,2\n4,3\n5,4\n6,5\n", "missing"),
    ("ImageId,Label\n1,0\n,1\n3,2\n4,3\n5,4\n6,5\n", "missing"),
    ("ImageId,Label\n1,0\n2\n3,2\n4,3\n5,4\n6,5\n", "fields"),
    ("ImageId,Label\n1,0\n2,1,1\n3,2\n4,3\n5,4\n6,5\n", "fields"),
])
def test_validate_rejects_bad_csv(text, problem):
    with pytest.raises(UserError, match=problem):
        submit.validate_submission(io.StringIO(text), N_TEST)


@pytest.mark.parametrize("frame, problem", [
    (pd.DataFrame({"ImageId": [1, 2, 3], "Label": [0.0, 1.5, 2.0]}), "integers"),
    (pd.DataFrame({"ImageId": [1, 2, 3], "Label": [0.0, np.nan, 2.0]}), "missing"),
    (pd.DataFrame({"ImageId": [1, 2, 3], "Label": [True, False, True]}), "integers"),
    (pd.DataFrame({"ImageId": [1, 2, 3], "Label": [0, 1, 2], "x": [0, 0, 0]}), "header"),
    (pd.DataFrame({"ImageId": [3, 2, 1], "Label": [0, 1, 2]}), "ImageId"),
])
def test_validate_rejects_bad_dataframe(frame, problem):
    with pytest.raises(UserError, match=problem):
        submit.validate_submission(frame, 3)


def test_validate_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        submit.validate_submission(tmp_path / "nope.csv", 3)


# ---------------------------------------------------------------- the stage on a fake run

@pytest.fixture
def project(tmp_path, monkeypatch):
    """PIPELINE_ROOT with meta.json (N_TEST test rows) and runs/r1 holding test_probs.npz and summary.json."""
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    for var in [v for v in os.environ if v.startswith("KAGGLE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "home" / ".kaggle"))
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    (processed / "meta.json").write_text(json.dumps({"train_rows": 20, "test_rows": N_TEST}))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.array([3, 1, 4, 1, 5, 9])
    probs = rng.random((N_TEST, 10)).astype(np.float32) * 0.1
    probs[np.arange(N_TEST), labels] = 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    runs.Run("r1").write_probs(probs)  # with the record of the data and model they come from
    (run / "summary.json").write_text(json.dumps({"arch": "seed_small", "best_val_acc": 0.98765}))
    return types.SimpleNamespace(root=tmp_path, run=run, labels=labels,
                                 csv=tmp_path / "submissions" / "submission.csv")


def fake_kaggle_api(monkeypatch, credentials=True, answer="Successfully submitted", error=None):
    """Replace pipeline.kaggle_api (whether or not it exists yet); returns the list of submit calls."""
    calls = []
    module = types.ModuleType("pipeline.kaggle_api")
    module.has_credentials = lambda: credentials

    def fake_submit(csv_path, message):
        calls.append((str(csv_path), message))
        if error:
            raise UserError(error)
        return answer

    module.submit = fake_submit
    monkeypatch.setitem(sys.modules, "pipeline.kaggle_api", module)
    monkeypatch.setattr(pipeline, "kaggle_api", module, raising=False)
    return calls


def test_submit_writes_valid_csv_from_run(project, capsys, monkeypatch):
    calls = fake_kaggle_api(monkeypatch)
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    df = submit.validate_submission(project.csv, N_TEST)
    assert df["Label"].tolist() == project.labels.tolist()
    assert project.csv.read_text().splitlines()[:2] == ["ImageId,Label", "1,3"]
    assert calls == []
    assert "upload skipped" in capsys.readouterr().out


def test_submit_rejects_probs_of_wrong_length_and_keeps_old_file(project, capsys):
    project.csv.parent.mkdir(parents=True)
    project.csv.write_text("previous good submission\n")
    runs.Run("r1").write_probs(np.full((N_TEST - 1, 10), 0.1, np.float32))
    assert submit.main(["--run", "r1", "--upload", "0"]) == 2
    assert "rerun `make predict" in capsys.readouterr().err
    assert project.csv.read_text() == "previous good submission\n"
    assert [p.name for p in project.csv.parent.iterdir()] == ["submission.csv"]  # no temp file left


def test_a_folder_where_the_submission_goes_is_one_line(project, capsys):
    project.csv.mkdir(parents=True)  # a traceback (IsADirectoryError from os.replace) before
    assert submit.main(["--run", "r1", "--upload", "0"]) == 2
    assert capsys.readouterr().err == f"error: {project.csv}: Is a directory\n"
    assert project.csv.is_dir() and [p.name for p in project.csv.parent.iterdir()] == ["submission.csv"]


def test_a_file_where_the_submissions_folder_goes_or_a_name_too_long_is_one_line(project, capsys):
    # both were tracebacks: mkdir's FileExistsError, and mkstemp's OSError for a name past the limit
    long = project.csv.parent / ("a" * 300 + ".csv")
    assert submit.main(["--run", "r1", "--upload", "0", "--out", str(long)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "File name too long" in err and err.count("\n") == 1, err
    project.csv.parent.mkdir(parents=True, exist_ok=True)
    project.csv.parent.rmdir()
    project.csv.parent.write_text("a file")
    assert submit.main(["--run", "r1", "--upload", "0"]) == 2
    assert capsys.readouterr().err == f"error: {project.csv.parent}: File exists\n"
    assert project.csv.parent.read_text() == "a file"


def test_write_submission_never_overwrites_with_invalid(tmp_path):
    path = tmp_path / "submission.csv"
    path.write_text(good_csv())
    bad = pd.DataFrame({"ImageId": np.arange(1, N_TEST + 1), "Label": [0, 1, 2, 3, 4, 11]})
    with pytest.raises(UserError, match="not written"):
        submit.write_submission(bad, path, N_TEST)
    assert path.read_text() == good_csv()
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def test_submit_missing_run_or_probs(project, capsys):
    assert submit.main(["--run", "nope", "--upload", "0"]) == 2
    assert "run 'nope' not found" in capsys.readouterr().err
    (project.run / "test_probs.npz").unlink()
    assert submit.main(["--run", "r1", "--upload", "0"]) == 2
    assert "make predict RUN=r1" in capsys.readouterr().err
    assert not project.csv.exists()


def test_upload_success_message_names_run_and_accuracy(project, capsys, monkeypatch):
    calls = fake_kaggle_api(monkeypatch, answer="Successfully submitted to Digit Recognizer")
    assert submit.main(["--run", "r1", "--upload", "1", "--message", "try 3"]) == 0
    assert len(calls) == 1
    path, message = calls[0]
    assert Path(path).name == project.csv.name  # a private copy, under the CSV's own name
    assert "r1" in message and "98.77%" in message and "seed_small" in message and "try 3" in message
    assert "Successfully submitted to Digit Recognizer" in capsys.readouterr().out


def test_upload_failure_exits_2_and_keeps_csv(project, capsys, monkeypatch):
    calls = fake_kaggle_api(monkeypatch, error="upload refused: daily limit reached")
    assert submit.main(["--run", "r1"]) == 2
    assert len(calls) == 1
    assert "daily limit reached" in capsys.readouterr().err
    submit.validate_submission(project.csv, N_TEST)


def test_no_credentials_prints_how_to_upload(project, capsys, monkeypatch):
    calls = fake_kaggle_api(monkeypatch, credentials=False)
    assert submit.main(["--run", "r1"]) == 0
    out = capsys.readouterr().out
    assert calls == []
    assert "kaggle competitions submit -c digit-recognizer -f" in out and str(project.csv) in out
    assert "98.77%" in out


@pytest.mark.parametrize("credentials", [True, False])
def test_predictions_of_the_offline_test_csv_are_never_uploaded(project, capsys, monkeypatch, credentials):
    """An mnist fetch's test.csv is its own shuffle of MNIST: Kaggle would grade the CSV against its test.csv
    (about 10 %) and count the day's try. Credentials set after an offline fetch: refused in one line."""
    meta = project.root / "data" / "processed" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "test_sha256": "ab" * 32}))
    runs.Run("r1").write_probs(np.load(project.run / "test_probs.npz")["probs"])  # made from this meta.json
    raw = project.root / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "source.json").write_text(json.dumps({"source": "kaggle"}))
    calls = fake_kaggle_api(monkeypatch, credentials=credentials)
    assert submit.main(["--run", "r1", "--upload", "1"]) == 0 and len(calls) == int(credentials)  # Kaggle's data
    project.csv.unlink()
    submit.upload_record(project.csv).unlink(missing_ok=True)
    calls.clear()
    (raw / "source.json").write_text(json.dumps({"source": "mnist", "seed": 0, "test_sha256": "ab" * 32}))
    capsys.readouterr()
    assert submit.main(["--run", "r1", "--upload", "1"]) == (2 if credentials else 0)
    out, err = capsys.readouterr()
    said = err if credentials else out
    assert calls == [] and "offline copy's test.csv" in said and "make fetch SOURCE=kaggle" in said
    assert not credentials or (err.count("\n") == 1 and err.startswith("error: "))
    submit.validate_submission(project.csv, N_TEST)  # written, for `make score`


@pytest.mark.parametrize("accuracy", [0.1020, float("nan")])
def test_a_run_that_did_not_learn_is_neither_written_nor_uploaded_unless_forced(project, capsys, monkeypatch,
                                                                                accuracy):
    """`make train submit LR=50`: a diverged run replaced the good submission with one digit for every image."""
    calls = fake_kaggle_api(monkeypatch)
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    good = project.csv.read_bytes()
    (project.run / "summary.json").write_text(json.dumps({"arch": "seed_small", "best_val_acc": accuracy}))
    capsys.readouterr()
    for extra in ([], ["--upload-only"]):
        assert submit.main(["--run", "r1", "--upload", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "runs/r1 did not learn" in err and "FORCE=1" in err, err
    assert project.csv.read_bytes() == good and calls == []
    capsys.readouterr()
    assert submit.main(["--run", "r1", "--upload", "1", "--force"]) == 0 and len(calls) == 1
    err = capsys.readouterr().err
    assert "warning: runs/r1 did not learn" in err and "submitted all the same" in err, err


def test_an_upload_whose_record_cannot_be_written_says_it_went_up(project, capsys, monkeypatch):
    """A disk full after Kaggle took the file: `error: No space left on device` named nothing, and each rerun
    uploaded it again."""
    import errno

    calls = fake_kaggle_api(monkeypatch)
    real = submit.write_json

    def full(path, obj):
        if Path(path).name == submit.UPLOAD_RECORD:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, obj)

    monkeypatch.setattr(submit, "write_json", full)
    assert submit.main(["--run", "r1", "--upload", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uploaded" in err and "on Kaggle already" in err and "UPLOAD=0" in err, err
    assert len(calls) == 1


def test_upload_message_without_accuracy():
    assert submit.upload_message("r9", {}) == "run r9, val acc unknown"


def test_submit_refuses_nan_probabilities(project, capsys):
    probs = np.full((N_TEST, 10), 0.1, np.float32)
    probs[2] = np.nan
    runs.Run("r1").write_probs(probs)
    assert submit.main(["--run", "r1", "--upload", "0"]) == 2
    assert "NaN" in capsys.readouterr().err
    assert not project.csv.exists()


# ---------------------------------------------------------------- the upload step (issue 12)

def test_a_failed_upload_is_retried_and_a_successful_one_never_repeated(project, capsys, monkeypatch):
    answers = [UserError("Kaggle answered HTTP 503 while submitting"), "Successfully submitted"]
    sent = []
    calls = fake_kaggle_api(monkeypatch)

    def flaky_submit(csv_path, message):
        sent.append(message)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    sys.modules["pipeline.kaggle_api"].submit = flaky_submit
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0  # what `make submit` runs first: the CSV
    upload = ["--run", "r1", "--upload-only", "--message", 'v2 "best" $HOME']
    assert submit.main(upload) == 2  # the upload failed: exit 2, the CSV stays
    assert "HTTP 503" in capsys.readouterr().err
    assert submit.main(upload) == 0  # the next `make submit`: tried again
    assert "Successfully submitted" in capsys.readouterr().out
    assert submit.main(upload) == 0  # and never again for this very file
    assert "uploaded already" in capsys.readouterr().out
    assert len(sent) == 2 and sent[-1].startswith('v2 "best" $HOME | run r1') and calls == []
    record = json.loads((project.csv.parent / submit.UPLOAD_RECORD).read_text())
    assert record["answer"] == "Successfully submitted"


def test_the_bytes_checked_are_the_bytes_uploaded_and_recorded(project, capsys, monkeypatch):
    # a second `make submit RUN=r2` replacing submission.csv between the label check and the upload: r2's labels
    # went up under r1's message, and the record said r1's file was uploaded
    fake_kaggle_api(monkeypatch)
    sent = []
    sys.modules["pipeline.kaggle_api"].submit = lambda path, message: sent.append(Path(path).read_bytes()) or "ok"
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    checked = project.csv.read_bytes()
    other = "ImageId,Label\n" + "".join(f"{i},7\n" for i in range(1, N_TEST + 1))
    real = submit.validate_submission

    def check_then_replaced(path, n_rows, name=None):
        frame = real(path, n_rows, name)
        project.csv.write_text(other)  # the other submit wins the race right after the check
        return frame

    monkeypatch.setattr(submit, "validate_submission", check_then_replaced)
    assert submit.main(["--run", "r1", "--upload-only"]) == 0
    record = json.loads((project.csv.parent / submit.UPLOAD_RECORD).read_text())
    assert sent == [checked] and record["sha256"] == hashlib.sha256(checked).hexdigest()
    monkeypatch.setattr(submit, "validate_submission", real)
    capsys.readouterr()
    assert submit.main(["--run", "r1", "--upload-only"]) == 2  # r2's CSV is never sent as r1's
    assert "not uploaded" in capsys.readouterr().err and len(sent) == 1
    # the same race in one call that writes and uploads: the other submit replaces the CSV just written
    write = submit.write_submission

    def written_then_replaced(frame, path, n_rows):
        out = write(frame, path, n_rows)
        project.csv.write_text(other)
        return out

    monkeypatch.setattr(submit, "write_submission", written_then_replaced)
    assert submit.main(["--run", "r1", "--upload", "1"]) == 2
    assert "not uploaded" in capsys.readouterr().err and len(sent) == 1


def test_upload_only_without_a_csv_says_how_to_write_it(project, capsys, monkeypatch):
    fake_kaggle_api(monkeypatch)
    assert submit.main(["--run", "r1", "--upload-only"]) == 2
    assert "make submit RUN=r1" in capsys.readouterr().err
    # a folder in its place: make takes it as written, so "make submit writes it" went round in a loop
    project.csv.mkdir(parents=True)
    assert submit.main(["--run", "r1", "--upload-only"]) == 2
    assert "submission.csv is not a file: remove it" in capsys.readouterr().err
    project.csv.rmdir()  # a CSV cut short: the refusal names it, not the private copy checked (deleted since)
    project.csv.write_text("ImageId,Label\n1,0\n")
    assert submit.main(["--run", "r1", "--upload-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {project.csv}: 1 rows, expected one per test image") and err.count("\n") == 1, err


def test_a_folder_in_place_of_the_test_probabilities_is_said_so(project, capsys):
    (project.run / "test_probs.npz").unlink()
    (project.run / "test_probs.npz").mkdir()
    assert submit.main(["--run", "r1", "--upload", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test_probs.npz is not a file: remove it" in err, err


def test_make_submit_never_uploads_a_csv_written_from_another_run(project, capsys, monkeypatch):
    # `python -m pipeline.submit --run r2` after `make submit RUN=r1`: the Makefile saw r1's CSV up to date and
    # uploaded r2's labels under r1's name
    calls = fake_kaggle_api(monkeypatch)
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    assert (project.csv.parent / submit.RUN_RECORD).read_text() == "r1\n"  # what the Makefile compares RUN with
    shutil.copytree(project.run, project.root / "runs" / "r2")
    probs = np.full((N_TEST, 10), 0.05, np.float32)
    probs[:, 7] = 0.55
    runs.Run("r2").write_probs(probs)
    assert submit.main(["--run", "r2", "--upload", "0"]) == 0
    assert (project.csv.parent / submit.RUN_RECORD).read_text() == "r2\n"  # so `make submit RUN=r1` rewrites it
    capsys.readouterr()
    assert submit.main(["--run", "r1", "--upload-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not uploaded" in err and "make submit RUN=r1" in err, err
    assert calls == []
    assert submit.main(["--run", "r2", "--upload-only"]) == 0 and len(calls) == 1
    assert submit.main(["--run", "r1", "--upload-only", "--upload", "0"]) == 2  # nor calls it ready (UPLOAD=0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not ready" in err and "make submit RUN=r1" in err, err


def test_a_csv_write_cut_short_leaves_no_record_that_names_a_run(project, monkeypatch):
    # Ctrl-C between the CSV and submissions/.run: the CSV held r2's labels, .run still said r1, and
    # `make submit RUN=r1 UPLOAD=0` called r2's file ready
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    shutil.copytree(project.run, project.root / "runs" / "r2")

    def cut_short(*args, **kwargs):
        project.csv.write_text("half a CSV")
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "write_submission", cut_short)
    assert submit.main(["--run", "r2", "--upload", "0"]) != 0
    for record in (submit.RUN_RECORD, submit.SUBMISSION_RECORD):
        assert not (project.csv.parent / record).exists(), record  # the Makefile rewrites a CSV without them


# ---------------------------------------------------------------- score: the submission of which run

def scored(project, capsys, *args, fetched=True):
    """pipeline.score on the default submission against a key that matches r1's labels: (code, out, err).
    fetched: the key comes with an mnist fetch's record of the test.csv in data/raw now (False: the test's own)."""
    from pipeline import score

    key = project.root / "data" / "raw" / "test_labels.csv"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("ImageId,Label,mnist_test\n" + "".join(f"{i + 1},{y},1\n" for i, y in enumerate(project.labels)))
    if fetched:
        test_csv = key.parent / "test.csv"
        sha = hashlib.sha256(test_csv.read_bytes()).hexdigest() if test_csv.is_file() else "0" * 64
        (key.parent / "source.json").write_text(json.dumps({"source": "mnist", "seed": 0, "test_sha256": sha}))
    capsys.readouterr()
    code = score.main(["--submission", str(project.csv), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_score_names_the_run_even_while_it_trains_and_says_when_it_changed_since(project, capsys):
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    with runs.Run("r1").lock("train"):  # `make train RUN=r1` resumed after the submit: the CSV is still r1's
        code, out, err = scored(project, capsys)
    assert code == 0, err
    saved = json.loads((project.csv.parent / submit.SCORE_RECORD).read_text())
    assert saved["run"] == "r1" and saved["accuracy"] == 1.0 and "(run r1)" in out and "note" not in out
    assert saved["submission_sha256"] == hashlib.sha256(project.csv.read_bytes()).hexdigest()

    (project.run / "model.npz").write_bytes(b"trained on since")  # r1 delivered another model
    code, out, err = scored(project, capsys)
    assert code == 0 and "(run r1)" in out and "runs/r1 changed since" in out and "make submit RUN=r1" in out, err

    shutil.copytree(project.run, project.root / "runs" / "r2")
    code, _, err = scored(project, capsys, "--run", "r2")  # `make score RUN=r2`: the CSV is r1's
    assert code == 2 and err.count("\n") == 1 and "written from runs/r1, not runs/r2" in err, err
    assert scored(project, capsys, "--run", "r1")[0] == 0

    project.csv.write_text(project.csv.read_text().replace("1,3", "1,8"))  # edited by hand
    code, _, err = scored(project, capsys, "--run", "r1")
    assert code == 2 and err.count("\n") == 1 and "edited, replaced or written by hand" in err, err
    assert "remove it, then `make submit RUN=r1`" in err
    code, out, err = scored(project, capsys)
    assert code == 0 and "changed since `make submit` wrote it from runs/r1" in err and "of no known run" in out


def test_a_new_submission_drops_the_old_score_and_a_run_gone_since_is_said(project, capsys):
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    assert scored(project, capsys)[0] == 0
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0  # the CSV written anew: its score is not known yet
    assert not (project.csv.parent / submit.SCORE_RECORD).exists()
    shutil.rmtree(project.run)
    code, out, err = scored(project, capsys)
    assert code == 0 and "(run r1)" in out and "runs/r1 is gone since" in out, err
    assert json.loads((project.csv.parent / submit.SCORE_RECORD).read_text())["run"] == "r1"


@pytest.mark.parametrize("target", ["submission", "key"])
def test_score_never_writes_its_json_over_the_submission_or_the_key(project, capsys, target):
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    path = project.csv if target == "submission" else project.root / "data" / "raw" / "test_labels.csv"
    scored(project, capsys)
    before = path.read_bytes()
    code, _, err = scored(project, capsys, "--out", str(path))
    assert code == 2 and err.count("\n") == 1 and f"is the {target} itself" in err, err
    assert path.read_bytes() == before


def test_a_test_csv_replaced_since_it_was_prepared_is_never_answered(project, capsys):
    # new CSVs unzipped with their old dates: make saw data/processed up to date and submitted the old predictions
    raw = project.root / "data" / "raw" / "test.csv"
    raw.parent.mkdir(parents=True)
    raw.write_text("pixel0\n0\n")
    meta = project.root / "data" / "processed" / "meta.json"
    meta.write_text(json.dumps({"train_rows": 20, "test_rows": N_TEST,
                                "test_sha256": hashlib.sha256(raw.read_bytes()).hexdigest()}))
    runs.Run("r1").write_probs(np.load(project.run / "test_probs.npz")["probs"])  # made from the data of now
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    raw.write_text("pixel0\n1\n")
    capsys.readouterr()
    for args in (["--upload", "0"], ["--upload-only"]):
        assert submit.main(["--run", "r1", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "changed since it was prepared" in err and "submit RUN=r1" in err, err
    code, _, err = scored(project, capsys)  # the key answers the new test.csv, the CSV the old one
    assert code == 2 and err.count("\n") == 1 and "the key answers another test.csv" in err, err


def test_the_record_holds_the_bytes_this_submit_wrote_however_out_is_spelled(project, capsys, monkeypatch):
    monkeypatch.chdir(project.root)
    written = {}
    real = submit.write_bytes

    def write_then_swap(path, data):  # another submit replaces the CSV right after this one wrote it
        real(path, data)
        written["sha"] = hashlib.sha256(data).hexdigest()
        Path(path).write_text("ImageId,Label\n" + "".join(f"{i + 1},7\n" for i in range(N_TEST)))

    monkeypatch.setattr(submit, "write_bytes", write_then_swap)
    assert submit.main(["--run", "r1", "--upload", "0", "--out", "./submissions/submission.csv"]) == 0
    record = json.loads((project.csv.parent / submit.SUBMISSION_RECORD).read_text())
    assert record["run"] == "r1" and record["sha256"] == written["sha"]
    assert (project.csv.parent / submit.RUN_RECORD).read_text() == "r1\n"
    code, out, err = scored(project, capsys)  # the swapped CSV is nobody's as far as anyone knows
    assert code == 0 and "of no known run" in out and "changed since `make submit` wrote it" in err, err


def test_a_damaged_record_or_unreadable_data_never_stops_a_score(project, capsys):
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    record_path = project.csv.parent / submit.SUBMISSION_RECORD
    record = json.loads(record_path.read_text())
    (project.root / "data" / "processed" / "meta.json").unlink()  # mid-prepare: the run's data cannot be told
    code, out, err = scored(project, capsys)
    assert code == 0 and "(run r1)" in out and "cannot be told" in out, err
    for bad in ("", "../x", ["r1"]):
        record_path.write_text(json.dumps({**record, "run": bad}))
        code, out, err = scored(project, capsys)
        assert code == 0 and "of no known run" in out, err


def prepared_test_csv(project, text):
    """data/raw/test.csv holding `text`, prepared: meta.json names it by its sha256."""
    raw = project.root / "data" / "raw" / "test.csv"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(text)
    sha = hashlib.sha256(raw.read_bytes()).hexdigest()
    (project.root / "data" / "processed" / "meta.json").write_text(
        json.dumps({"train_rows": 20, "test_rows": N_TEST, "test_sha256": sha}))
    return sha


def test_a_submission_of_an_earlier_test_csv_is_not_scored_against_the_key_of_now(project, capsys):
    # a Kaggle fetch, `make submit`, then `make fetch SOURCE=mnist` and `make prepare`: the CSV answering Kaggle's
    # test.csv was scored against the mnist key (about 10 %, exit 0), with a note that the run "changed since"
    prepared_test_csv(project, "pixel0\n0\n")
    runs.Run("r1").write_probs(np.load(project.run / "test_probs.npz")["probs"])
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    assert scored(project, capsys)[0] == 0
    prepared_test_csv(project, "pixel0\n1\n")
    code, _, err = scored(project, capsys)
    assert code == 2 and err.count("\n") == 1 and "answers the test.csv of when it was written" in err, err
    assert "make submit RUN=r1" in err


def test_a_key_is_never_used_for_another_test_csv_than_the_one_its_fetch_wrote(project, capsys):
    # `make fetch SOURCE=mnist`, then Kaggle's CSVs unzipped over data/raw: the mnist key stayed, and scored the
    # submissions of Kaggle's test.csv without a word
    from pipeline import fetch

    sha = prepared_test_csv(project, "pixel0\n0\n")
    record = project.root / "data" / "raw" / fetch.SOURCE_RECORD
    record.write_text(json.dumps({"source": "mnist", "test_sha256": sha}))
    runs.Run("r1").write_probs(np.load(project.run / "test_probs.npz")["probs"])
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    assert scored(project, capsys, fetched=False)[0] == 0
    prepared_test_csv(project, "pixel0\n2\n")  # unzipped over it, and prepared
    runs.Run("r1").write_probs(np.load(project.run / "test_probs.npz")["probs"])  # predicted again
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    code, _, err = scored(project, capsys, fetched=False)
    assert code == 2 and err.count("\n") == 1 and "answers the test.csv the mnist fetch wrote" in err, err
    # fetched before the record kept the hash (or a key put there by hand): cannot be told, so not used
    for text in (json.dumps({"source": "mnist"}), None):
        record.write_text(text) if text else record.unlink()
        code, _, err = scored(project, capsys, fetched=False)
        assert code == 2 and err.count("\n") == 1 and "no fetch record says which test.csv" in err, err
        assert "make fetch SOURCE=mnist" in err


def test_a_run_that_learnt_another_train_csv_is_warned_at_submit_and_not_scored(project, capsys):
    # a run trained, then `python -m pipeline.fetch --seed 1` and `make prepare`: about 12 600 rows of the new key
    # were images the run learnt, and `make score` graded its submission (flattered, exit 0) without a word
    summary = json.loads((project.run / "summary.json").read_text())
    (project.run / "summary.json").write_text(json.dumps({**summary, "train_sha256": "a" * 64}))
    meta = project.root / "data" / "processed" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "train_sha256": "a" * 64}))
    runs.Run("r1").write_probs(np.load(project.run / "test_probs.npz")["probs"])
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    assert "learnt another train.csv" not in capsys.readouterr().err
    assert json.loads((project.csv.parent / submit.SUBMISSION_RECORD).read_text())["train_sha256"] == "a" * 64
    assert scored(project, capsys)[0] == 0
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "train_sha256": "b" * 64}))  # prepared anew
    runs.Run("r1").write_probs(np.load(project.run / "test_probs.npz")["probs"])  # predicted on the new test.csv
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: runs/r1 learnt another train.csv than the one prepared now" in err, err
    code, _, err = scored(project, capsys)
    assert code == 2 and err.count("\n") == 1 and "learnt another train.csv than the one prepared now" in err, err
    assert not (project.csv.parent / submit.SCORE_RECORD).exists()


def test_a_second_upload_while_one_runs_is_refused_not_sent_twice(project, capsys, monkeypatch):
    # two `make submit UPLOAD=1` at once each found no record of an upload and sent the file: two of the day's
    # submissions for one CSV
    sent = []
    fake_kaggle_api(monkeypatch)
    assert submit.main(["--run", "r1", "--upload", "0"]) == 0
    upload = ["--run", "r1", "--upload-only"]

    def submit_while_another_starts(csv_path, message):
        capsys.readouterr()
        assert submit.main(upload) == 2  # the other `make submit`, meanwhile
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is being uploaded by pid" in err, err
        sent.append(message)
        return "Successfully submitted"

    sys.modules["pipeline.kaggle_api"].submit = submit_while_another_starts
    assert submit.main(upload) == 0
    assert len(sent) == 1
    assert submit.main(upload) == 0 and "uploaded already" in capsys.readouterr().out  # after it: nothing to do
