"""report: every file written for a fake run, report.md written last and linking them, and its helpers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import report
from pipeline.config import TrainConfig, to_toml
from pipeline.errors import UserError
from pipeline.fileio import save_npz

FIGURES = ["curves.png", "lr.png", "confusion.png", "worst.png", "per_class.png", "filters.png"]
N_TRAIN = 40
REPO = Path(__file__).resolve().parent.parent


def make_fake_run(root, name="r1", epochs=3, bag=1.0):
    """A finished run under root/runs/NAME plus root/data/processed/train.npz, built by hand (no training)."""
    from pipeline.nn import build_model

    rng = np.random.default_rng(0)
    processed = root / "data" / "processed"
    processed.mkdir(parents=True, exist_ok=True)
    y_train = np.arange(N_TRAIN) % 10
    save_npz(processed / "train.npz", {"x": rng.random((N_TRAIN, 28, 28, 1), dtype=np.float32), "y": y_train})

    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(to_toml(TrainConfig(arch="seed_small", epochs=epochs, bag=bag).to_dict()))
    save_npz(folder / "model.npz", build_model("seed_small", seed=0, dtype=np.float32).state_dict())
    records = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 1 - 0.1 / e, "val_loss": 1.2 / e,
                "val_acc": 1 - 0.12 / e, "lr": 1e-3 * 0.5 ** (e - 1), "images_per_s": 500.0,
                "wall_time_s": 10.0 * e} for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({
        "arch": "seed_small", "best_val_acc": 0.9375, "best_val_loss": 0.4, "best_epoch": epochs,
        "epochs_done": epochs, "wall_time_s": 3725.0, "finished": True}))

    val_idx = np.arange(20, N_TRAIN)  # 20 rows, two of each class
    y_val = y_train[val_idx]
    predicted = y_val.copy()
    predicted[[1, 5, 7]] = [7, 0, 9]  # three mistakes
    probs = np.full((len(val_idx), 10), 0.02, np.float32)
    probs[np.arange(len(val_idx)), predicted] = 0.82
    save_npz(folder / "val_predictions.npz", {"idx": val_idx, "y": y_val, "probs": probs})
    return folder


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    return make_fake_run(tmp_path)


def test_report_writes_every_file_and_report_md_last(run, capsys):
    assert report.main(["--run", "r1"]) == 0
    out = run / "report"
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    md = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in md
    assert os.stat(out / "report.md").st_mtime_ns >= max(os.stat(out / n).st_mtime_ns for n in FIGURES)
    assert "93.75%" in md and "1h 02m 05s" in md and "3 of 3" in md
    assert "17 images" not in md and "20 images, 3 misclassified" in md
    assert "bag" not in md
    assert "| 1 | 1.0000 | 0.5000 | 0.6667 | 2 |" in md  # class 1: one of two found, never predicted wrongly
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES + ["report.md"])  # no temp files
    assert "report.md" in capsys.readouterr().out


def test_report_says_a_net_trained_on_a_bag(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    make_fake_run(tmp_path, "bagged", bag=0.9)
    assert report.main(["--run", "bagged"]) == 0
    assert "on a bag of 90% of the training rows" in (tmp_path / "runs" / "bagged" / "report" / "report.md").read_text()


def test_report_of_a_run_stopped_by_max_time_says_what_was_delivered(run):
    """No summary.json: training stopped at MAX_TIME and a checkpoint was delivered (the notebook's report)."""
    (run / "summary.json").unlink()
    assert report.main(["--run", "r1"]) == 0
    md = (run / "report" / "report.md").read_text()
    assert "validation accuracy of the delivered model: 85.00%** (the checkpoint delivered so far)" in md  # 17 of 20
    assert "3 of 3 (unfinished)" in md and "epoch ?" not in md and "unknown" not in md
    assert "wall time: 0m 30s (to the end of epoch 3)" in md  # the last epoch's record: no summary says it


def test_report_leaves_pyplot_and_its_backend_alone(run, tmp_path):
    """A notebook that writes the report still plots inline in its later cells: no backend switch, no pyplot."""
    code = ("import sys, matplotlib\n"
            "matplotlib.rcParams['backend'] = 'module://matplotlib_inline.backend_inline'\n"
            "from pipeline import report\n"
            "report.main(['--run', 'r1'])\n"
            "assert matplotlib.rcParams['backend'] == 'module://matplotlib_inline.backend_inline'\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_report_missing_run_and_missing_inputs(run, capsys):
    assert report.main(["--run", "nope"]) == 2
    assert "run 'nope' not found" in capsys.readouterr().err
    (run / "val_predictions.npz").unlink()
    assert report.main(["--run", "r1"]) == 2
    assert "val_predictions.npz is missing" in capsys.readouterr().err
    assert not (run / "report" / "report.md").exists()


def test_load_metrics_keeps_last_record_of_a_repeated_epoch(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "val_acc": 0.5}\n{"epoch": 2, "val_acc": 0.6}\n'
                                            '\n{"epoch": 2, "val_acc": 0.7}\n')
    assert [m["val_acc"] for m in report.load_metrics(tmp_path)] == [0.5, 0.7]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(UserError, match="line 2"):
        report.load_metrics(tmp_path)
    # valid JSON of the wrong types: each was a TypeError (in the sort, or in the figures)
    for bad, words in [('{"epoch": [1]}', "epoch \\[1\\] is not"), ('{"epoch": 1.5}', "epoch 1.5 is not"),
                       ('{"epoch": true}', "epoch true is not"), ('{"epoch": 2, "val_acc": "0.9"}', 'val_acc is "0.9"')]:
        (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n' + bad + "\n")
        with pytest.raises(UserError, match=f"line 2: {words}"):
            report.load_metrics(tmp_path)


def test_worst_misclassified_orders_by_true_class_probability():
    y = np.array([0, 1, 2, 3])
    probs = np.array([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], [0.1, 0.85, 0.05, 0], [0, 0, 0, 1.0]])
    assert report.worst_misclassified(y, probs).tolist() == [2, 1]
    assert report.worst_misclassified(y, probs, limit=1).tolist() == [2]


def test_first_conv_kernel_prefers_layer_0_then_lowest_layer():
    w0 = np.zeros((3, 3, 1, 4))
    assert report.first_conv_kernel({"0.w": w0, "1.w": np.ones((3, 3, 4, 8))}) is w0
    w2 = np.zeros((5, 5, 1, 2))
    assert report.first_conv_kernel({"10.w": np.ones((3, 3, 2, 2)), "2.w": w2, "1.g": np.ones(3)}) is w2
    with pytest.raises(UserError):
        report.first_conv_kernel({"0.w": np.ones((4, 10))})


def test_format_duration():
    assert report.format_duration(59.6) == "1m 00s"
    assert report.format_duration(3725) == "1h 02m 05s"
    assert report.format_duration(None) == "unknown"
    assert report.format_duration(float("nan")) == report.format_duration(float("inf")) == "unknown"  # a traceback
    assert report.format_duration(10 ** 400) == "unknown"


def test_a_run_of_another_train_csv_is_refused_not_drawn_with_other_images(run, tmp_path, capsys):
    # `make fetch SOURCE=kaggle && make prepare` after practising offline: worst.png showed other digits under the
    # old run's labels and confidences
    processed = tmp_path / "data" / "processed"
    d = dict(np.load(processed / "train.npz"))
    save_npz(processed / "train.npz", {"x": d["x"], "y": (d["y"] + 1) % 10})  # same row count, other data
    assert report.main(["--run", "r1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another train.csv" in err, err
    save_npz(processed / "train.npz", d)  # labels as they were, but the run recorded another train.csv's hash
    (processed / "meta.json").write_text(json.dumps({"train_sha256": "0" * 64}))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "train_sha256": "1" * 64}))
    assert report.main(["--run", "r1"]) == 2 and "another train.csv" in capsys.readouterr().err
    (run / "summary.json").write_text(json.dumps({**summary, "train_sha256": "0" * 64}))
    assert report.main(["--run", "r1"]) == 0, capsys.readouterr().err


def test_an_ensemble_says_which_members_to_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    make_fake_run(tmp_path, "night/members/0")
    (tmp_path / "runs" / "night" / "members" / "1").mkdir()  # unfinished
    assert report.main(["--run", "night"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RUN=night/members/K` (K: 0)" in err, err
    assert report.main(["--run", "night/members/0"]) == 0
    title = (tmp_path / "runs" / "night" / "members" / "0" / "report" / "report.md").read_text().splitlines()[0]
    assert "night/members/0" in title, title  # it was titled "Run `0`"
