"""score: figures on a hand-made key and submission, the printed tables, score.json, and the missing-key error."""
import json

import numpy as np
import pytest

from pipeline import score
from pipeline.errors import UserError

# 10 test images: 8 correct; row 3 (true 2) predicted 7, row 8 (true 7) predicted 1.
KEY_LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
SUBMITTED = [0, 1, 7, 3, 4, 5, 6, 1, 8, 9]
OFFICIAL = [1, 1, 1, 1, 0, 0, 0, 1, 0, 0]  # official rows: 1..4 and 8 -> 3 of 5 correct


def write_key(path, labels=KEY_LABELS, official=OFFICIAL):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("ImageId,Label,mnist_test\n" + "".join(
        f"{i + 1},{label},{flag}\n" for i, (label, flag) in enumerate(zip(labels, official))))


def write_submission(path, labels=SUBMITTED):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("ImageId,Label\n" + "".join(f"{i + 1},{label}\n" for i, label in enumerate(labels)))


def write_source_record(raw, test_sha256="0" * 64):
    """The mnist fetch's record of which test.csv its key answers (no meta.json here records one to match)."""
    (raw / "source.json").write_text(json.dumps({"source": "mnist", "seed": 0, "test_sha256": test_sha256}))


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    write_key(tmp_path / "data" / "raw" / "test_labels.csv")
    write_source_record(tmp_path / "data" / "raw")
    write_submission(tmp_path / "submissions" / "submission.csv")
    return tmp_path


def test_confusion_matrix_and_per_class_by_hand():
    confusion = score.confusion_matrix([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 0, 1], num_classes=3)
    assert confusion.tolist() == [[1, 1, 0], [1, 2, 0], [0, 1, 0]]
    rows = score.per_class_scores(confusion)
    assert rows[0] == pytest.approx({"class": 0, "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert rows[1]["precision"] == pytest.approx(0.5) and rows[1]["recall"] == pytest.approx(2 / 3)
    assert rows[1]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert rows[2] == {"class": 2, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # never predicted


def test_score_main_figures_tables_and_json(project, capsys):
    assert score.main([]) == 0
    out = capsys.readouterr().out
    saved = json.loads((project / "submissions" / "score.json").read_text())
    assert (saved["rows"], saved["correct"], saved["accuracy"]) == (10, 8, 0.8)
    assert saved["official_mnist_test"] == {"rows": 5, "correct": 3, "accuracy": 0.6}
    confusion = np.array(saved["confusion"])
    expected = np.eye(10, dtype=int)
    expected[2, 2], expected[2, 7] = 0, 1
    expected[7, 7], expected[7, 1] = 0, 1
    assert confusion.tolist() == expected.tolist()
    per_class = {r["class"]: r for r in saved["per_class"]}
    assert per_class[1]["precision"] == pytest.approx(0.5) and per_class[1]["recall"] == 1.0
    assert per_class[2] == {"class": 2, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert per_class[7]["precision"] == 0.0 and per_class[7]["recall"] == 0.0
    assert saved["macro_f1"] == pytest.approx((7 * 1.0 + 2 / 3 + 0 + 0) / 10)  # 7 perfect classes, class 1 F1 2/3, 2 and 7 zero
    assert "80.00%" in out and "60.00%" in out and "(3/5)" in out
    assert "true\\pred" in out and "precision" in out


def test_missing_key_is_a_user_error(project, capsys):
    (project / "data" / "raw" / "test_labels.csv").unlink()
    assert score.main([]) == 2
    err = capsys.readouterr().err
    assert "offline answer key" in err and "SOURCE=mnist" in err
    assert not (project / "submissions" / "score.json").exists()


def test_missing_submission_is_a_user_error(project, capsys):
    (project / "submissions" / "submission.csv").unlink()
    assert score.main([]) == 2
    assert "make submit" in capsys.readouterr().err


def test_a_folder_given_as_the_submission_is_not_called_missing(project, capsys):
    assert score.main(["--submission", str(project / "submissions")]) == 2
    err = capsys.readouterr().err
    assert "submissions is not a file" in err and "does not exist" not in err and err.count("\n") == 1, err


def test_submission_of_wrong_length_is_refused(project, capsys):
    write_submission(project / "submissions" / "submission.csv", SUBMITTED[:9])
    assert score.main([]) == 2
    err = capsys.readouterr().err  # the user's file named, not the private copy scored (a deleted temp folder)
    assert f"{project / 'submissions' / 'submission.csv'}: 9 rows, expected one per test image (10)" in err, err


def test_a_truncated_key_is_blamed_not_the_submission(project, capsys):
    (project / "data" / "processed").mkdir(parents=True)
    (project / "data" / "processed" / "meta.json").write_text('{"test_rows": 10}')
    assert score.main([]) == 0  # key, submission and test.csv agree
    assert "no `make submit` record" in capsys.readouterr().err  # a CSV of one's own at the default path: said
    write_key(project / "data" / "raw" / "test_labels.csv", KEY_LABELS[:8], OFFICIAL[:8])
    assert score.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test_labels.csv has 8 rows but the prepared test.csv has 10" in err


def test_bad_key_is_refused(tmp_path):
    key = tmp_path / "key.csv"
    key.write_text("ImageId,Label\n1,0\n")
    with pytest.raises(UserError, match="header"):
        score.load_answer_key(key)
    write_key(key, official=[1, 1, 2, 1, 0, 0, 0, 1, 0, 0])
    with pytest.raises(UserError, match="mnist_test"):
        score.load_answer_key(key)


def test_explicit_paths_and_out(tmp_path, capsys):
    write_key(tmp_path / "k.csv")
    write_submission(tmp_path / "s.csv", KEY_LABELS)
    assert score.main(["--submission", str(tmp_path / "s.csv"), "--key", str(tmp_path / "k.csv"),
                       "--out", str(tmp_path / "o.json")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["accuracy"] == 1.0
