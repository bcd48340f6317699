"""A training run killed with SIGKILL anywhere and resumed ends with byte-identical weights."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import stratified_split
from pipeline.fileio import load_npz, save_npz

REPO = Path(__file__).resolve().parent.parent
# deotte on a few dozen images: BatchNorm, dropout (model RNG), augmentation and Adam state all in play.
SETTINGS = ["ARCH=deotte", "EPOCHS=2", "BATCH_SIZE=16", "CKPT_EVERY=1", "AUGMENT=1", "SEED=3", "DEVICE=cpu",
            "SCHEDULE=exponential", "LR_DECAY=0.5"]


def write_processed(root, n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.random((n, 28, 28, 1), dtype=np.float32) * 0.2
    for i, label in enumerate(y):  # a class-dependent bar so the loss moves
        x[i, 2 + 2 * label:4 + 2 * label, 4:24] = 1.0
    folder = root / "data" / "processed"
    train_idx, val_idx = stratified_split(y, 0.2, 0)
    save_npz(folder / "train.npz", {"x": x, "y": y.astype(np.int64)})
    save_npz(folder / "test.npz", {"x": x[:20]})
    save_npz(folder / "split.npz", {"train_idx": train_idx, "val_idx": val_idx})
    (folder / "meta.json").write_text(json.dumps({"train_rows": n, "test_rows": 20}))


def env_for(root):
    env = dict(os.environ, PIPELINE_ROOT=str(root), PYTHONPATH=str(REPO))
    env.pop("KAGGLE_USERNAME", None)
    return env


def train(root, run, extra=(), wrapper=None, threads=None):
    code = wrapper or "import sys; from pipeline.train import main; sys.exit(main())"
    env = env_for(root)
    env.pop("PIPELINE_NN_THREADS", None)
    if threads:
        env["PIPELINE_NN_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "-c", code, "--preset", "quick", "--run", run, *SETTINGS, *extra],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    write_processed(root)
    code, out, err = finish(train(root, "ref"))
    assert code == 0, err
    return root, load_npz(root / "runs" / "ref" / "model.npz"), (root / "runs" / "ref" / "metrics.jsonl")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def history(path):
    return [{k: v for k, v in json.loads(l).items() if k not in ("images_per_s", "wall_time_s")}
            for l in path.read_text().splitlines()]


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(reference, tmp_path):
    root, ref_weights, ref_metrics = reference
    write_processed(root=tmp_path)
    latest = tmp_path / "runs" / "killed" / "checkpoints" / "latest.npz"
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(30):
        before = latest.stat().st_mtime_ns if latest.exists() else 0
        proc = train(tmp_path, "killed")
        # Kill a random moment after this attempt made progress (a new checkpoint), so every attempt moves on.
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and \
                (not latest.exists() or latest.stat().st_mtime_ns == before):
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.3)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        code, out, err = finish(proc)
        if code == 0:
            break
        assert code == -signal.SIGKILL, err
    else:
        pytest.fail("the run never finished")
    assert kills >= 2
    assert_same_weights(load_npz(tmp_path / "runs" / "killed" / "model.npz"), ref_weights)
    assert history(tmp_path / "runs" / "killed" / "metrics.jsonl") == history(ref_metrics)


SIGNAL_AT_A_RENAME = """
import os, signal, sys
from pipeline import checkpoint, train
calls = {{"n": 0}}
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if str(dst).endswith("{renamed_to}"):
        calls["n"] += 1
        if calls["n"] == int(os.environ["SIGNAL_AT"]):
            os.kill(os.getpid(), signal.{signal})
checkpoint.os.replace = replace
sys.exit(train.main())
"""
# a kill between 'latest -> previous' and 'incoming -> latest' of the SIGNAL_AT-th checkpoint
KILL_IN_CHECKPOINT = SIGNAL_AT_A_RENAME.format(renamed_to="previous.npz", signal="SIGKILL")
# `kill PID` right after the SIGNAL_AT-th checkpoint, in the middle of an epoch
TERM_AFTER_CHECKPOINT = SIGNAL_AT_A_RENAME.format(renamed_to="latest.npz", signal="SIGTERM")


@pytest.mark.parametrize("kill_at", [4, 7])  # mid-epoch 1 and epoch 2 (6 steps per epoch)
def test_sigkill_inside_a_checkpoint_write_then_resume(reference, tmp_path, kill_at, monkeypatch):
    root, ref_weights, _ = reference
    write_processed(tmp_path)
    monkeypatch.setenv("SIGNAL_AT", str(kill_at))
    code, _, err = finish(train(tmp_path, "ckpt", wrapper=KILL_IN_CHECKPOINT))
    assert code == -signal.SIGKILL, err
    assert not (tmp_path / "runs" / "ckpt" / "checkpoints" / "latest.npz").exists()
    code, out, err = finish(train(tmp_path, "ckpt"))
    assert code == 0, err
    assert_same_weights(load_npz(tmp_path / "runs" / "ckpt" / "model.npz"), ref_weights)


def test_corrupt_latest_is_skipped_with_a_warning(reference, tmp_path):
    root, ref_weights, _ = reference
    write_processed(tmp_path)
    proc = train(tmp_path, "corrupt", extra=["MAX_TIME=0.5s"])
    code, _, err = finish(proc)
    assert code == 3, err
    latest = tmp_path / "runs" / "corrupt" / "checkpoints" / "latest.npz"
    latest.write_bytes(latest.read_bytes()[:100])
    code, out, err = finish(train(tmp_path, "corrupt"))
    assert code == 0, err
    assert err.count("older checkpoint") == 1, err  # said once, though train reads the checkpoint twice
    assert_same_weights(load_npz(tmp_path / "runs" / "corrupt" / "model.npz"), ref_weights)


def test_sigterm_checkpoints_exits_143_and_resumes_to_the_same_weights(reference, tmp_path, monkeypatch):
    root, ref_weights, ref_metrics = reference
    write_processed(tmp_path)
    monkeypatch.setenv("SIGNAL_AT", "3")  # epoch 1 of 2, step 3 of 6
    code, out, err = finish(train(tmp_path, "term", wrapper=TERM_AFTER_CHECKPOINT))
    assert code == 143, err
    assert "stopped by signal 15: checkpoint saved at epoch 1" in err, err  # train's own stop, not cli_main's
    assert not (tmp_path / "runs" / "term" / "model.npz").exists()
    code, out, err = finish(train(tmp_path, "term"))
    assert code == 0, err
    assert_same_weights(load_npz(tmp_path / "runs" / "term" / "model.npz"), ref_weights)
    assert history(tmp_path / "runs" / "term" / "metrics.jsonl") == history(ref_metrics)


def test_changed_config_on_resume_is_refused_unless_forced(reference, tmp_path):
    write_processed(tmp_path)
    code, _, err = finish(train(tmp_path, "cfg", extra=["MAX_TIME=0.5s"]))
    assert code == 3, err
    code, _, err = finish(train(tmp_path, "cfg", extra=["LR=0.5"]))
    assert code == 2 and "FORCE=1" in err and err.count("\n") == 1 and "Traceback" not in err
    code, _, err = finish(train(tmp_path, "cfg", extra=["LR=0.5", "FORCE=1"]))
    assert code == 0, err


def default_threads():
    code = "import os; os.environ.pop('PIPELINE_NN_THREADS', None); from pipeline.nn import threads; " \
           "print(threads.num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).stdout)


def test_a_run_resumes_with_the_threads_it_started_with(tmp_path):
    # The thread count decides the last bits (how a batch and its sums are split), so a run started with
    # another count, e.g. on another machine, is continued with that count and ends with the same weights.
    started = 1 if default_threads() != 1 else 2
    ref = tmp_path / "ref"
    write_processed(ref)
    assert finish(train(ref, "whole", threads=started))[0] == 0
    write_processed(tmp_path)
    code, _, err = finish(train(tmp_path, "moved", extra=["MAX_TIME=0.5s"], threads=started))
    assert code == 3, err
    code, out, err = finish(train(tmp_path, "moved"))  # no PIPELINE_NN_THREADS: this machine's default
    assert code == 0, err
    assert f"using the {started} engine threads" in out
    assert_same_weights(load_npz(tmp_path / "runs" / "moved" / "model.npz"),
                        load_npz(ref / "runs" / "whole" / "model.npz"))


def test_threads_asked_for_explicitly_win_with_a_warning(tmp_path):
    write_processed(tmp_path)
    code, _, err = finish(train(tmp_path, "asked", extra=["MAX_TIME=0.5s"], threads=1))
    assert code == 3, err
    code, out, err = finish(train(tmp_path, "asked", threads=3))
    assert code == 0, err
    assert err.count("\n") == 1 and "started with 1 engine threads and PIPELINE_NN_THREADS asks for 3" in err
