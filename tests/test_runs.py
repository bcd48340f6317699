"""The run model under misuse: its lock, the config its checkpoint carries, damaged artifacts said in one line
with advice that works, and predictions never reused for other data (issue 12)."""
import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import checkpoint, paths, predict, report, runs, submit, train
from pipeline.config import to_toml
from pipeline.dataset import stratified_split
from pipeline.errors import UserError
from pipeline.fileio import load_npz, save_npz
from pipeline.nn import build_model
from tests.test_resume import env_for, finish, train as run_train, write_processed

REPO = Path(__file__).resolve().parent.parent
FAST = ["ARCH=seed_small", "EPOCHS=1", "BATCH_SIZE=32", "AUGMENT=0", "DEVICE=cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A root with data/processed and a finished run 'base' (seed_small, one epoch)."""
    root = tmp_path_factory.mktemp("trained")
    write_processed(root)
    code, _, err = finish(run_train(root, "base", extra=FAST))
    assert code == 0, err
    return root


@pytest.fixture
def root(trained, tmp_path, monkeypatch):
    """A copy of the trained root of this test's own, as PIPELINE_ROOT."""
    copy = tmp_path / "root"
    shutil.copytree(trained, copy)
    monkeypatch.setenv("PIPELINE_ROOT", str(copy))
    return copy


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def predict_main(*args):
    return predict.main(["--device", "cpu", *args])


# ---------------------------------------------------------------- the lock

HOLD = """
import sys, time
from pipeline import runs
with runs.Run(sys.argv[1]).lock("train"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_lock(root, name):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, name], env=env_for(root), cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_at_once_naming_the_holder_and_kill_9_frees_the_run(root):
    holder = hold_lock(root, "base")
    try:
        code, _, err = finish(run_train(root, "base", extra=FAST))
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"runs/base is in use by pid {holder.pid} (train" in err
        r = subprocess.run([sys.executable, "-m", "pipeline.predict", "--run", "base", "--device", "cpu"],
                           env=env_for(root), cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr and r.stderr.count("\n") == 1  # readers too
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runs.Run("base").lock("train"):  # the kernel dropped the dead holder's lock
        pass


def test_a_new_run_refused_before_it_began_leaves_no_folder(root, capsys):
    assert train.main(["--preset", "quick", "--run", "typo", "EPOCHS=abc"]) == 2
    one_error_line(capsys, "EPOCHS")
    assert not (root / "runs" / "typo").exists()
    assert train.main(["--preset", "quick", "--run", "base", "EPOCHS=abc"]) == 2  # an existing run keeps its lock
    assert (root / "runs" / "base" / ".lock").is_file()


def test_two_trainings_of_one_run_never_mix(trained, tmp_path):
    write_processed(tmp_path)
    first = run_train(tmp_path, "same", extra=[*FAST, "EPOCHS=3"])
    lock = tmp_path / "runs" / "same" / runs.LOCK
    while not (lock.exists() and lock.read_text().startswith(f"pid {first.pid}")):
        assert first.poll() is None, first.communicate()
    code, _, err = finish(run_train(tmp_path, "same", extra=[*FAST, "LR=0.5"]))
    assert code == 2 and "in use by" in err and err.count("\n") == 1, err
    code, _, err = finish(first)
    assert code == 0, err
    assert "lr = 0.004" in (tmp_path / "runs" / "same" / "config.toml").read_text()  # the quick preset's, not 0.5


# ---------------------------------------------------------------- the config the checkpoint carries

@contextlib.contextmanager
def signal_while_judged(sig=signal.SIGINT):
    """train.evaluate patched for the block: `sig` (Ctrl-C, a scheduler's SIGTERM) arrives while the first epoch
    is judged; the loop reads it at its next step, or right after the last epoch."""
    real, sent = train.evaluate, []

    def judged(*args, **kwargs):
        if not sent:
            sent.append(sig)
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "evaluate", judged)
        yield


def stopped_run(root, name, extra=()):
    """A run stopped mid-training with a checkpoint (MAX_TIME after the first step or so)."""
    code, _, err = finish(run_train(root, name, extra=[*FAST, "EPOCHS=3", "CKPT_EVERY=1", "MAX_TIME=0.001s", *extra]))
    assert code == 3, err
    return root / "runs" / name


def test_the_checkpoint_carries_its_config_and_an_edited_config_toml_is_refused(root):
    folder = stopped_run(root, "edit")
    state = checkpoint.unpack(checkpoint.read(folder / "checkpoints" / checkpoint.LATEST))[3]
    assert state["config"]["lr"] == 0.004 and state["config"]["arch"] == "seed_small"
    text = (folder / "config.toml").read_text()
    (folder / "config.toml").write_text(text.replace("lr = 0.004", "lr = 0.5"))
    code, _, err = finish(run_train(root, "edit", extra=[*FAST, "EPOCHS=3"]))
    assert code == 2 and err.count("\n") == 1 and "lr 0.004 -> 0.5" in err and "FORCE=1" in err, err
    # as `make train RUN=edit FORCE=1` runs it: no preset on the command line, the run's own config
    assert train.main(["--run", "edit", "FORCE=1", "MAX_TIME=0.001s"]) == 3
    state = checkpoint.unpack(checkpoint.read(folder / "checkpoints" / checkpoint.LATEST))[3]
    assert state["config"]["lr"] == 0.5  # adopted on purpose, and recorded


def test_force_on_a_finished_run_with_another_config_is_refused_not_ignored(root, capsys):
    # `make train RUN=base EPOCHS=3 FORCE=1` said "FORCE: continuing", then "finished; nothing to do", exit 0
    assert train.main(["--run", "base", "EPOCHS=3", "FORCE=1"]) == 2
    one_error_line(capsys, "runs/base has finished training", "epochs", "another RUN=")
    assert runs.Run("base").config().epochs == 1
    assert train.main(["--run", "base", "FORCE=1"]) == 0  # the same config: nothing to do, as before


def test_a_finished_run_says_when_its_presets_file_changed_since(root, capsys, monkeypatch, tmp_path):
    # configs/standard.toml edited, then `make train submit`: "nothing to do", and the old model was submitted as
    # if it were the edited preset's
    configs = tmp_path / "configs"
    configs.mkdir()
    monkeypatch.setattr(paths, "configs", lambda: configs)
    preset = configs / "quick.toml"
    shutil.copy(REPO / "configs" / "quick.toml", preset)  # base was started with settings of its own (FAST)
    started = (root / "runs" / "base" / "config.toml").stat().st_mtime
    os.utime(preset, (started - 60, started - 60))
    capsys.readouterr()
    assert train.main(["--run", "base"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "note:" not in out, out  # its own settings are no edit of the preset
    preset.write_text(to_toml(runs.Run("base").config().to_dict()))  # edited since, to what the run has
    assert train.main(["--run", "base"]) == 0
    assert "note:" not in capsys.readouterr().out
    preset.write_text(to_toml({**runs.Run("base").config().to_dict(), "epochs": 7}))
    assert train.main(["--run", "base"]) == 0
    out = capsys.readouterr().out
    assert "note: configs/quick.toml was edited since runs/base started, and differs from its config in epochs" \
        in out, out
    assert "make train PRESET=quick RUN=NEW" in out and runs.Run("base").config().epochs == 1
    assert train.main(["--run", "base", "--preset", "quick"]) == 2  # asked for: the config change is refused
    one_error_line(capsys, "another config", "epochs")


def test_a_damaged_config_toml_is_restored_from_the_checkpoint(root):
    folder = stopped_run(root, "binary")
    (folder / "config.toml").write_bytes(bytes(range(256)))
    code, _, err = finish(run_train(root, "binary", extra=[*FAST, "EPOCHS=3"]))
    assert code == 0, err
    assert "restoring it from the checkpoint" in err and "Traceback" not in err
    assert "arch = \"seed_small\"" in (folder / "config.toml").read_text()


def test_a_checkpoint_of_another_architecture_is_one_line(root):
    other = stopped_run(root, "other", extra=["ARCH=small_bn"])
    mine = stopped_run(root, "mine")
    shutil.copy(other / "checkpoints" / checkpoint.LATEST, mine / "checkpoints" / checkpoint.LATEST)
    (mine / "checkpoints" / checkpoint.PREVIOUS).unlink(missing_ok=True)
    code, _, err = finish(run_train(root, "mine", extra=[*FAST, "EPOCHS=3"]))
    assert code == 2 and err.count("\n") == 1 and "arch 'small_bn' -> 'seed_small'" in err, err
    code, _, err = finish(run_train(root, "mine", extra=[*FAST, "EPOCHS=3", "FORCE=1"]))
    note, error = err.splitlines()  # the forced change is said, as every forced change is; then why it cannot be
    assert note == "FORCE: continuing runs/mine with changed arch", err
    assert code == 2 and "does not fit seed_small" in error and "remove" in error, err
    shutil.rmtree(mine / "checkpoints")  # what the line says to do
    code, _, err = finish(run_train(root, "mine", extra=[*FAST, "EPOCHS=3"]))
    assert code == 0, err


def test_predict_after_an_edit_of_config_toml_says_undo_it_not_remove_the_model(root, capsys):
    # arch edited in config.toml: predict advised removing the trained model and training it again
    path = root / "runs" / "base" / "config.toml"
    original = path.read_text()
    path.write_text(original.replace('arch = "seed_small"', 'arch = "lenet5"'))
    capsys.readouterr()
    assert predict_main("--run", "base") == 2
    err = one_error_line(capsys, "says arch lenet5, but the run trained seed_small", "undo the edit")
    assert "remove" not in err
    assert (root / "runs" / "base" / "model.npz").is_file()
    path.write_text(original)
    assert predict_main("--run", "base") == 0


@pytest.mark.parametrize("damage", ["garbage", "foreign"])
def test_a_damaged_or_foreign_best_checkpoint_falls_back_to_the_last_epoch(root, damage):
    folder = root / "runs" / "base"
    best = folder / "checkpoints" / checkpoint.BEST
    if damage == "garbage":
        best.write_bytes(best.read_bytes()[:200])
    else:
        other = stopped_run(root, "foreign", extra=["ARCH=small_bn"])
        shutil.copy(other / "checkpoints" / checkpoint.LATEST, best)
    (folder / "summary.json").unlink()  # the run is delivered again from its checkpoints
    code, out, err = finish(run_train(root, "base", extra=FAST))
    assert code == 0, err
    assert "Traceback" not in err and "delivering the last epoch's weights instead" in err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    live = checkpoint.unpack(checkpoint.read(folder / "checkpoints" / checkpoint.LATEST))[0]
    delivered = load_npz(folder / "model.npz")
    assert all(np.array_equal(delivered[k], live[k]) for k in live)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(root, monkeypatch, capsys):
    write_processed(root)
    real_save = checkpoint.save_npz
    saves = []

    def save(path, arrays, compressed=False):
        saves.append(path)
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(path, arrays, compressed)

    monkeypatch.setattr(checkpoint, "save_npz", save)
    code = train.main(["--preset", "quick", "--run", "full", *FAST, "EPOCHS=2", "CKPT_EVERY=1"])
    assert code == 2
    one_error_line(capsys, "No space left on device", "previous checkpoint is kept", "make train RUN=full")
    ckpt = root / "runs" / "full" / "checkpoints"
    assert checkpoint.load_newest(ckpt) is not None and not (ckpt / ".incoming.npz").exists()
    monkeypatch.setattr(checkpoint, "save_npz", real_save)
    assert train.main(["--preset", "quick", "--run", "full", *FAST, "EPOCHS=2", "CKPT_EVERY=1"]) == 0


def test_a_full_disk_at_the_first_checkpoint_does_not_claim_one_was_kept(root, monkeypatch, capsys):
    write_processed(root)

    def save(path, arrays, compressed=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "save_npz", save)
    assert train.main(["--preset", "quick", "--run", "empty", *FAST, "EPOCHS=2", "CKPT_EVERY=1"]) == 2
    one_error_line(capsys, "No space left on device", "no checkpoint was written yet", "make train RUN=empty")


# ---------------------------------------------------------------- damaged artifacts: one line, and advice that works

def garbage(path):
    path.write_bytes(b"\x00garbage\xff" * 10)


def truncated(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def label_ten(path):
    """A readable val_predictions.npz with a label no digit has (report's confusion matrix raised on it)."""
    d = load_npz(path)
    d["y"] = d["y"].copy()
    d["y"][0] = 10
    save_npz(path, d)


def nested(path):
    """JSON or TOML nested deeper than the parser recurses (a RecursionError, not a ValueError, was a traceback)."""
    path.write_text(("x = " if path.suffix == ".toml" else "") + "[" * 100_000 + "\n")


def huge_integer(path):
    """A number of 5000 digits (past Python's int-from-text limit: a ValueError that was not JSON's)."""
    if path.suffix == ".toml":
        path.write_text(path.read_text().replace("epochs = 1", "epochs = 1" + "0" * 5000))
    else:
        path.write_text(path.read_text().replace('"epoch": 1', '"epoch": 1' + "0" * 5000, 1))


def text_indices(path):
    """A readable val_predictions.npz whose rows are strings."""
    d = load_npz(path)
    d["idx"] = d["idx"].astype(str)
    save_npz(path, d)


def text_kernel(path):
    """A readable model.npz whose first conv kernel is strings."""
    d = load_npz(path)
    d = {k: (v.astype(str) if v.ndim == 4 else v) for k, v in d.items()}
    save_npz(path, d)


@pytest.mark.parametrize("name,damage,stage", [
    ("model.npz", garbage, "predict"), ("model.npz", truncated, "predict"), ("model.npz", garbage, "report"),
    ("model.npz", "delete", "predict"), ("model.npz", "delete", "report"),
    ("val_predictions.npz", truncated, "report"), ("val_predictions.npz", label_ten, "report"),
    ("val_predictions.npz", text_indices, "report"),
    ("summary.json", garbage, "report"), ("summary.json", nested, "report"),
    ("metrics.jsonl", garbage, "report"), ("metrics.jsonl", nested, "report"), ("metrics.jsonl", huge_integer, "report"),
    ("config.toml", garbage, "predict"), ("config.toml", garbage, "report"), ("config.toml", nested, "predict"),
    ("config.toml", huge_integer, "report"),
])
def test_a_damaged_artifact_is_one_line_and_make_train_repairs_it(root, capsys, name, damage, stage):
    path = root / "runs" / "base" / name
    if damage == "delete":
        path.unlink()
    else:
        damage(path)
    main = {"predict": predict_main, "report": lambda *args: report.main(list(args))}[stage]
    assert main("--run", "base") == 2
    one_error_line(capsys, name, "make train RUN=base")
    assert train.main(["--run", "base"]) == 0  # what the line says: it rebuilds the run from its checkpoints
    capsys.readouterr()
    assert main("--run", "base") == 0


def test_a_model_without_a_kernel_of_numbers_is_one_line_in_report(root, capsys):
    text_kernel(root / "runs" / "base" / "model.npz")  # a TypeError in the filters figure
    assert report.main(["--run", "base"]) == 2
    one_error_line(capsys, "model.npz has no 4-D convolution kernel of numbers")


def test_an_out_that_is_no_regular_file_is_refused_and_left_as_it_was(root, capsys, tmp_path):
    # `score --out /dev/null` replaced the device with a regular file (as root); a pipe was replaced too
    from pipeline import score

    assert predict_main("--run", "base") == 0
    key = root / "data" / "raw" / "test_labels.csv"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("ImageId,Label,mnist_test\n" + "".join(f"{i + 1},0,1\n" for i in range(20)))
    assert submit.main(["--run", "base", "--upload", "0"]) == 0
    pipe, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(pipe)
    folder.mkdir()
    for out in (pipe, folder):
        for stage in (lambda: submit.main(["--run", "base", "--upload", "0", "--out", str(out)]),
                      lambda: score.main(["--key", str(key), "--out", str(out)])):
            capsys.readouterr()
            assert stage() == 2
            one_error_line(capsys, "is not a regular file")
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and folder.is_dir() and not any(folder.iterdir())


def test_an_out_where_the_pipeline_keeps_its_files_is_refused_and_a_symlink_loop_is_no_traceback(root, capsys):
    # `submit --out runs/base/model.npz` replaced the model with the CSV, exit 0; a loop was a RuntimeError
    assert predict_main("--run", "base") == 0
    model = (root / "runs" / "base" / "model.npz").read_bytes()
    for out in (root / "runs" / "base" / "model.npz", root / "data" / "raw" / "train.csv",
                root / "submissions" / ".run", paths.configs() / "standard.toml"):
        capsys.readouterr()
        assert submit.main(["--run", "base", "--upload", "0", "--out", str(out)]) == 2
        one_error_line(capsys, "is where the pipeline keeps its own files")
    assert (root / "runs" / "base" / "model.npz").read_bytes() == model
    assert submit.main(["--run", "base", "--upload", "0"]) == 0
    from pipeline import score

    key = root / "data" / "raw" / "test_labels.csv"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("ImageId,Label,mnist_test\n" + "".join(f"{i + 1},0,1\n" for i in range(20)))
    capsys.readouterr()
    assert score.main(["--key", str(key), "--out", str(root / "runs" / "base" / "summary.json")]) == 2
    one_error_line(capsys, "is where the pipeline keeps its own files")
    for stage in (lambda out: submit.main(["--run", "base", "--upload", "0", "--out", out]),
                  lambda out: score.main(["--key", str(key), "--out", out])):
        loop = root / "loop"
        loop.unlink(missing_ok=True)
        loop.symlink_to(loop)
        assert stage(str(loop)) == 0  # (Path.resolve raised RuntimeError on it) the output replaces the link
        assert loop.is_file() and not loop.is_symlink()


def test_odd_numbers_and_names_in_run_files_are_read_as_unknown_not_a_traceback(root, capsys):
    metrics = root / "runs" / "base" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records[0]["val_acc"] = float("inf")  # matplotlib: "Axis limits cannot be NaN or Inf"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = root / "runs" / "base" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "best_val_acc": 10 ** 400}))  # OverflowError
    assert report.main(["--run", "base"]) == 0
    assert "validation accuracy of the delivered model: unknown" in (root / "runs" / "base" / "report" / "report.md").read_text()
    assert submit.upload_message("base", json.loads(summary.read_text())) == "run base (seed_small), val acc unknown"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "train_sha256": [1]}))  # unhashable
    assert runs.Run("base").learnt_train_sha256() is None
    night = ensemble_root(root)
    (night / "members" / "\u00b2").mkdir()  # a digit to str.isdigit, not to int(): a ValueError
    assert [m.name for m in runs.Run("night").members()] == ["night/members/0", "night/members/1"]


def test_damaged_test_probs_are_one_line_and_make_predict_recomputes_them(root, capsys):
    assert predict_main("--run", "base") == 0
    garbage(root / "runs" / "base" / "test_probs.npz")
    assert submit.main(["--run", "base", "--upload", "0"]) == 2
    one_error_line(capsys, "test_probs.npz is damaged", "make predict RUN=base")
    assert predict_main("--run", "base") == 0
    assert submit.main(["--run", "base", "--upload", "0"]) == 0


def replaced(**arrays):
    """A valid npz with these arrays changed (written by hand: what prepare never writes)."""
    def damage(path):
        d = load_npz(path)
        save_npz(path, {**d, **{k: f(d) for k, f in arrays.items()}})
    return damage


@pytest.mark.parametrize("name,damage,stage", [
    ("test.npz", truncated, "predict"), ("test.npz", garbage, "predict"), ("meta.json", garbage, "predict"),
    ("meta.json", garbage, "submit"), ("meta.json", nested, "predict"), ("train.npz", truncated, "train"),
    ("split.npz", garbage, "train"), ("split.npz", "other", "train"),
    # an IndexError or the loss's ValueError deep in training, where these lines were promised
    ("train.npz", replaced(y=lambda d: d["y"][:30]), "train"), ("train.npz", replaced(y=lambda d: d["y"] + 10), "train"),
    ("train.npz", replaced(x=lambda d: d["x"].reshape(len(d["x"]), -1)), "train"),
    ("split.npz", replaced(val_idx=lambda d: d["val_idx"] + 1000), "train"),
    ("split.npz", replaced(val_idx=lambda d: d["val_idx"].astype(np.float64)), "train"),
])
def test_damaged_processed_data_is_one_line_that_says_how_to_rebuild_it(root, capsys, name, damage, stage):
    path = root / "data" / "processed" / name
    if damage == "other":  # a valid npz without the arrays the stage reads
        save_npz(path, {"nothing": np.zeros(1)})
    else:
        damage(path)
    main = {"predict": lambda: predict_main("--run", "base"),
            "submit": lambda: submit.main(["--run", "base", "--upload", "0"]),
            "train": lambda: train.main(["--run", "fresh", "--preset", "quick", *FAST])}[stage]
    assert main() == 2
    one_error_line(capsys, name, "make prepare")


def ensemble_root(root):
    """runs/night: an ensemble whose two members are copies of the finished run 'base'."""
    night = root / "runs" / "night"
    for k in (0, 1):
        shutil.copytree(root / "runs" / "base", night / "members" / str(k), ignore=shutil.ignore_patterns(".lock"))
    cfg = runs.Run("base").config()
    cfg.members = 2
    (night / "config.toml").write_text(to_toml({"preset": "quick", **cfg.to_dict()}))
    (night / "summary.json").write_text(json.dumps({"ensemble": True, "members": 2, "finished": True}))
    return night


def test_a_damaged_member_cache_or_ensemble_json_is_one_line_or_recomputed(root, capsys):
    night = ensemble_root(root)
    runs.Run("night/members/0").write_probs(np.full((3, 10), 0.1, np.float32), "test_probs.npz")  # 3 rows, not 20
    garbage(night / "members" / "1" / "test_probs.npz")
    assert predict_main("--run", "night") == 0  # both caches recomputed
    assert load_npz(night / "members" / "0" / "test_probs.npz")["probs"].shape == (20, 10)
    garbage(night / "ensemble.json")
    capsys.readouterr()
    assert submit.main(["--run", "night", "--upload", "0"]) == 2
    one_error_line(capsys, "ensemble.json is damaged", "make ensemble RUN=night")
    from pipeline import ensemble

    assert ensemble.main(["--run", "night", "--device", "cpu"]) == 0
    assert submit.main(["--run", "night", "--upload", "0"]) == 0


@pytest.mark.parametrize("edit", [{"estimate": None}, {"weights": 3}, {"weights": {"0": "1"}}, {"strategy": 5},
                                  {"estimate": {"accuracy": "0.99"}}])
def test_an_ensemble_json_with_a_field_of_the_wrong_type_is_one_line(root, capsys, edit):
    # valid JSON with every key, but `"estimate": null` was an AttributeError in submit, `"weights": 3` a TypeError
    night = ensemble_root(root)
    assert predict_main("--run", "night") == 0
    blend = json.loads((night / "ensemble.json").read_text())
    (night / "ensemble.json").write_text(json.dumps({**blend, **edit}))
    capsys.readouterr()
    assert submit.main(["--run", "night", "--upload", "0"]) == 2
    one_error_line(capsys, "ensemble.json is damaged", "make ensemble RUN=night")


def test_a_member_name_on_a_single_run_is_refused(root, capsys):
    assert predict_main("--run", "base/members/0") == 2
    one_error_line(capsys, "runs/base is not an ensemble")
    assert train.main(["--run", "base/members/0"]) == 2
    one_error_line(capsys, "members are trained by their ensemble", "make train RUN=base")
    ensemble_root(root)
    assert predict_main("--run", "night/members/7") == 2
    one_error_line(capsys, "has no member 7", "members: 0, 1")


# ---------------------------------------------------------------- nothing stale

def other_test_data(root, rows=7):
    """What `make prepare` leaves after test.csv was replaced by other rows."""
    x = np.random.default_rng(5).random((rows, 28, 28, 1), dtype=np.float32)
    processed = root / "data" / "processed"
    save_npz(processed / "test.npz", {"x": x})
    meta = json.loads((processed / "meta.json").read_text())
    (processed / "meta.json").write_text(json.dumps({**meta, "test_rows": rows, "test_sha256": "another test.csv"}))
    return x


def test_predictions_of_other_test_data_are_never_submitted(root, capsys):
    assert predict_main("--run", "base") == 0
    assert predict_main("--run", "base") == 0
    assert "up to date" in capsys.readouterr().out
    x = other_test_data(root, rows=20)  # same row count: only the record tells
    assert submit.main(["--run", "base", "--upload", "0"]) == 2
    one_error_line(capsys, "test_probs.npz was made from other data", "make predict RUN=base")
    assert predict_main("--run", "base") == 0
    assert "up to date" not in capsys.readouterr().out
    expected = runs.Run("base").load_model().predict_proba(x).argmax(1)
    assert submit.main(["--run", "base", "--upload", "0"]) == 0
    labels = submit.validate_submission(root / "submissions" / "submission.csv", 20)["Label"].to_numpy()
    assert np.array_equal(labels, expected)


@pytest.mark.parametrize("stage", ["predict", "ensemble"])
def test_a_prepare_while_predicting_leaves_the_predictions_stale_not_fresh(root, capsys, monkeypatch, stage):
    # `make prepare` on a new test.csv while `make predict` ran: the old images' probabilities were marked as made
    # from the new data, and `make submit` sent them
    from pipeline import dataset, ensemble

    read = dataset.load_test_images

    def read_then_prepare(folder=None):
        x = read(folder)
        other_test_data(root, rows=20)  # what the other terminal's `make prepare` writes meanwhile
        return x

    monkeypatch.setattr(predict, "load_test_images", read_then_prepare)
    monkeypatch.setattr(dataset, "load_test_images", read_then_prepare)
    if stage == "ensemble":
        ensemble_root(root)
        assert ensemble.main(["--run", "night", "--device", "cpu"]) == 0
    else:
        assert predict_main("--run", "base") == 0
    capsys.readouterr()
    run = "night" if stage == "ensemble" else "base"
    assert submit.main(["--run", run, "--upload", "0"]) == 2
    one_error_line(capsys, "test_probs.npz was made from other data")


def test_predictions_of_another_model_are_never_submitted(root, capsys):
    assert predict_main("--run", "base") == 0
    (root / "runs" / "base" / "summary.json").unlink()
    shutil.rmtree(root / "runs" / "base" / "checkpoints")
    assert train.main(["--run", "base", "SEED=1", "FORCE=1"]) == 0  # retrained: another model.npz
    capsys.readouterr()
    assert submit.main(["--run", "base", "--upload", "0"]) == 2
    one_error_line(capsys, "made from another model", "make predict RUN=base")


def test_a_run_is_not_resumed_silently_on_another_split(root, capsys):
    # `make prepare VAL_FRACTION=0.3` between two nights of one run: it continued, judging epochs on rows it had
    # trained on
    code, _, err = finish(run_train(root, "cut", extra=[*FAST, "EPOCHS=3", "MAX_TIME=0.001s"]))
    assert code == 3, err
    processed = root / "data" / "processed"
    y = load_npz(processed / "train.npz")["y"]
    train_idx, val_idx = stratified_split(y, 0.3, 1)
    save_npz(processed / "split.npz", {"train_idx": train_idx, "val_idx": val_idx})
    meta = json.loads((processed / "meta.json").read_text())
    (processed / "meta.json").write_text(json.dumps({**meta, "split_seed": 1, "val_fraction": 0.3}))
    assert train.main(["--run", "cut"]) == 2
    started = checkpoint.unpack(checkpoint.read(root / "runs" / "cut" / "checkpoints" / checkpoint.LATEST))[3]["data"]
    one_error_line(capsys, "runs/cut was started on other training data", "FORCE=1",
                   f"`python -m pipeline.prepare --val-fraction {started['split'][1]} --split-seed "
                   f"{started['split'][0]}` puts back the split it started on")
    assert not (root / "runs" / "cut" / "summary.json").exists()
    assert train.main(["--run", "cut", "FORCE=1", "MAX_TIME="]) == 0
    latest = checkpoint.read(root / "runs" / "cut" / "checkpoints" / checkpoint.LATEST)
    assert checkpoint.unpack(latest)[3]["data"]["split"] == [1, 0.3]  # the record follows the data it continued on


def test_predictions_show_progress_and_equal_the_models_own(root, monkeypatch):
    # a minute or more of predicting (an ensemble with test-time shifts: far more) showed nothing at all
    from pipeline import console, dataset

    bars = []

    class Bar:
        def __init__(self, total, desc, leave, unit="batch"):
            self.total, self.desc, self.done, self.closed = total, desc, 0, False
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(console, "progress_bar", Bar)
    x = dataset.load_test_images()
    probs = runs.Run("base").predict_probs(x, batch_size=7)
    assert [(b.total, b.done, b.closed) for b in bars] == [(20, 20, True)] and "base" in bars[0].desc
    # the run's own weights: a model built and loaded here, batched otherwise (BatchNorm in eval: rows independent)
    model = build_model(runs.Run("base").config().arch, seed=123, dtype=np.float32)
    model.load_state_dict(load_npz(runs.Run("base").folder / "model.npz"))
    np.testing.assert_allclose(probs, model.predict_proba(x, batch_size=20), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the run model

def test_the_run_knows_its_state(root):
    base = runs.Run("base")
    assert base.finished and not base.is_ensemble and base.members() == [] and not base.is_member
    assert base.config().arch == "seed_small"
    night = ensemble_root(root)
    ens = runs.Run("night")
    assert ens.is_ensemble and [m.name for m in ens.members()] == ["night/members/0", "night/members/1"]
    assert ens.finished and ens.members()[0].root.name == "night"
    (night / "members" / "1" / "model.npz").unlink()
    assert not ens.finished and ens.finished_members()[1] == ["1"]
    shutil.rmtree(night / "members" / "1")  # deleted, or never begun (MAX_TIME before it): left out all the same
    assert not ens.finished and ens.finished_members()[1] == ["1"]
    assert runs.Run("base").made_from()["data"] == runs.data_fingerprint()


def test_a_setting_missing_from_an_older_recorded_config_counts_as_its_default():
    assert runs.config_changes({"lr": 1e-3}, {"lr": 1e-3, "ema_decay": 0.0}) == []
    assert runs.config_changes({"lr": 1e-3}, {"lr": 1e-3, "ema_decay": 0.999}) == ["ema_decay"]


# ---------------------------------------------------------------- an ensemble's config, which no checkpoint backs

ENSEMBLE = ["--preset", "quick", *FAST, "MEMBERS=2"]


def test_an_edited_ensemble_config_is_refused_and_a_forced_one_is_remembered(root, capsys):
    # the ensemble folder has no checkpoint: an edit of its config.toml was taken silently, and the members still
    # to train trained with it while the finished ones kept the old values, unsaid
    assert train.main(["--run", "ens", *ENSEMBLE]) == 0
    assert train.main(["--run", "ens", "MEMBERS=3"]) == 0  # more members of the same config: no FORCE needed
    assert runs.Run("ens/members/2").config().seed == 2
    path = root / "runs" / "ens" / "config.toml"
    path.write_text(path.read_text().replace("members = 3", "members = 4").replace("lr = 0.004", "lr = 0.5"))
    capsys.readouterr()
    assert train.main(["--run", "ens"]) == 2
    one_error_line(capsys, "config.toml does not match the config in the run's record", "lr 0.004 -> 0.5", "FORCE=1")
    assert not (root / "runs" / "ens" / "members" / "3").exists()
    assert train.main(["--run", "ens", "FORCE=1"]) == 0  # on purpose: the members still to train take it
    err = capsys.readouterr().err
    assert "finished members 0, 1, 2 keep the config they were trained with" in err, err
    assert [runs.Run(f"ens/members/{k}").config().lr for k in range(4)] == [0.004, 0.004, 0.004, 0.5]
    assert train.main(["--run", "ens"]) == 0  # the forced config is the record now: no FORCE=1 every night
    assert "nothing to do" in capsys.readouterr().out


def test_an_ensemble_is_not_continued_on_another_train_csv(root, capsys):
    # `make fetch SOURCE=kaggle` between members: the new members learnt the new train.csv unsaid, and the blend
    # then judged them on the old one's labels
    meta_path = root / "data" / "processed" / "meta.json"
    meta = {**json.loads(meta_path.read_text()), "train_sha256": "a" * 64}
    meta_path.write_text(json.dumps(meta))
    assert train.main(["--run", "ens", *ENSEMBLE]) == 0
    assert runs.Run("ens/members/1").summary()["train_sha256"] == "a" * 64
    meta_path.write_text(json.dumps({**meta, "train_sha256": "f" * 64}))
    capsys.readouterr()
    assert train.main(["--run", "ens"]) == 0  # nothing left to train: nothing to refuse
    assert train.main(["--run", "ens", "MEMBERS=3"]) == 2
    one_error_line(capsys, "runs/ens/members/0, 1 learnt another train.csv", "new RUN=")
    assert not (root / "runs" / "ens" / "members" / "2").exists()
    assert "members = 2" in (root / "runs" / "ens" / "config.toml").read_text()  # the refused MEMBERS=3 left no trace
    assert train.main(["--run", "ens"]) == 0


@pytest.mark.parametrize("changed", [{"split_seed": 7}, {"val_fraction": 0.3}])
def test_an_ensemble_is_not_continued_on_another_split(root, capsys, changed):
    # a prepare in between (`make train VAL_FRACTION=0.3 RUN=other`): the next member held out other rows, unsaid,
    # and the blend refused the whole ensemble after it trained
    assert train.main(["--run", "ens", *ENSEMBLE]) == 0
    meta_path = root / "data" / "processed" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, **changed}))
    capsys.readouterr()
    assert train.main(["--run", "ens"]) == 0  # nothing left to train: nothing to refuse
    assert train.main(["--run", "ens", "MEMBERS=3"]) == 2
    one_error_line(capsys, "runs/ens's members began on another validation split", "puts back the split",
                   "new RUN=", "FORCE=1 does not apply" if "split_seed" in changed else "FORCE=1 to continue on it")
    assert not (root / "runs" / "ens" / "members" / "2").exists()
    assert "members = 2" in (root / "runs" / "ens" / "config.toml").read_text()
    if "split_seed" in changed:  # members of two split seeds: never, FORCE or not
        assert train.main(["--run", "ens", "MEMBERS=3", "FORCE=1"]) == 2
        one_error_line(capsys, "FORCE=1 does not apply")
        meta_path.write_text(json.dumps(meta))
        assert train.main(["--run", "ens", "MEMBERS=3"]) == 0
    else:  # another fraction of the same seed: the smaller's validation rows lie within the larger's
        assert train.main(["--run", "ens", "MEMBERS=3", "FORCE=1"]) == 0
        assert "FORCE: the members still to train hold out the split of now" in capsys.readouterr().err


def test_a_val_fraction_given_to_train_itself_is_the_prepared_one_or_refused(root, capsys):
    # `python -m pipeline.train VAL_FRACTION=0.5` held out the prepared split's rows and recorded 0.5
    meta_path, prepared = root / "data" / "processed" / "meta.json", 0.2  # as prepare records it
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "val_fraction": prepared}))
    assert train.main(["--run", "v", "--preset", "quick", *FAST, "VAL_FRACTION=0.5"]) == 2
    one_error_line(capsys, f"VAL_FRACTION=0.5: training holds out the split prepare made, VAL_FRACTION={prepared}",
                   "make train VAL_FRACTION=0.5")
    assert not (root / "runs" / "v").exists()
    assert train.main(["--run", "v", "--preset", "quick", *FAST, f"VAL_FRACTION={prepared}"]) == 0
    assert train.main(["--run", "w", "--preset", "quick", *FAST, "VAL_FRACTION=0.5", "SPLIT_SEED=3"]) == 0  # its own
    # a run begun before (its record says the default 0.1) resumed with the fraction prepared now: not refused here
    assert runs.Run("base").config().val_fraction != prepared
    assert train.main(["--run", "base", f"VAL_FRACTION={prepared}"]) == 0


def test_an_ensemble_on_a_split_too_small_to_blend_is_refused_before_it_trains(root, capsys):
    # `VAL_FRACTION=0.0003`: every member trained, then the blend refused them all
    split = root / "data" / "processed" / "split.npz"
    d = load_npz(split)
    save_npz(split, {"train_idx": np.sort(np.concatenate([d["train_idx"], d["val_idx"][10:]])),
                     "val_idx": d["val_idx"][:10]})
    assert train.main(["--run", "ens", *ENSEMBLE]) == 2
    one_error_line(capsys, "the prepared validation split holds 10 rows", "VAL_FRACTION")
    assert not (root / "runs" / "ens").exists()
    assert train.main(["--run", "one", "--preset", "quick", *FAST]) == 0  # a single net has no blend to choose
    # `make train VAL_FRACTION=0.0003 PRESET=overnight`: asked before prepare splits the data every run shares
    meta_path = root / "data" / "processed" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "class_counts": [12] * 10}))
    capsys.readouterr()
    assert train.main(["--run", "ens", *ENSEMBLE, "VAL_FRACTION=0.05", "--check-config"]) == 2
    one_error_line(capsys, "the asked validation split holds 10 rows")
    assert train.main(["--run", "ens", *ENSEMBLE, "VAL_FRACTION=0.2", "--check-config"]) == 0


def test_forced_members_on_an_unfinished_single_net_are_refused(root, capsys):
    # `make train RUN=x MEMBERS=3 FORCE=1` over a net stopped by MAX_TIME made an ensemble whose stale checkpoint
    # refused every later `make train RUN=x`
    assert train.main(["--run", "x", "--preset", "quick", *FAST, "EPOCHS=3", "MAX_TIME=0.001s"]) == 3
    capsys.readouterr()
    assert train.main(["--run", "x", "MEMBERS=3", "FORCE=1"]) == 2
    one_error_line(capsys, "runs/x holds a single net", "another RUN=")
    assert not (root / "runs" / "x" / "members").exists()
    assert train.main(["--run", "x", "MAX_TIME="]) == 0 and runs.Run("x").finished  # it continues as the net it is


@pytest.mark.parametrize("finished", [False, True])
def test_an_edit_of_config_toml_adopted_by_force_passes_the_guards_an_override_does(root, capsys, finished):
    # config.toml edited to members = 3, then FORCE=1: an ensemble was trained beside the single net's checkpoints
    # (and on a finished net, `epochs` edited and FORCE=1 said "nothing to do" and kept the edit), because an
    # adopted edit skipped the checks that MEMBERS=3 FORCE=1 on the command line goes through
    extra = [] if finished else ["MAX_TIME=0.001s"]
    assert train.main(["--run", "x", "--preset", "quick", *FAST, "EPOCHS=3", *extra]) == (0 if finished else 3)
    path = root / "runs" / "x" / "config.toml"
    original = path.read_text()
    done = "has finished training, so FORCE=1 cannot continue"
    for edit, words in ((("members = 1", "members = 3"), done if finished else "runs/x holds a single net"),
                        (("epochs = 3", "epochs = 4"), done)):
        if words == done and not finished:
            continue
        path.write_text(original.replace(*edit))
        capsys.readouterr()
        assert train.main(["--run", "x", "FORCE=1"]) == 2
        one_error_line(capsys, words)
        assert not (root / "runs" / "x" / "members").exists()
    path.write_text(original)
    assert train.main(["--run", "x", "MAX_TIME="]) == 0 and runs.Run("x").finished


def test_a_forced_members_after_an_edited_record_still_repairs_the_ensemble(root, capsys):
    # config.toml edited to members = 1 is refused with "keep its MEMBERS"; MEMBERS=2 FORCE=1 then repairs it
    assert train.main(["--run", "ens", *ENSEMBLE]) == 0
    (root / "runs" / "ens" / "members" / "1" / "summary.json").unlink()  # unfinished, so FORCE may change it
    path = root / "runs" / "ens" / "config.toml"
    path.write_text(path.read_text().replace("members = 2", "members = 1"))
    capsys.readouterr()
    assert train.main(["--run", "ens", "MEMBERS=2", "FORCE=1"]) == 0
    assert "holds a single net" not in capsys.readouterr().err and runs.Run("ens").finished


def test_a_setting_a_member_would_refuse_is_refused_before_the_ensemble_records_it(root, capsys, monkeypatch):
    # `make train RUN=ens DEVICE=gpu` on a machine without a GPU: recorded, then refused by every later run
    assert train.main(["--run", "ens", *ENSEMBLE]) == 0
    config = (root / "runs" / "ens" / "config.toml").read_text()
    monkeypatch.setattr("pipeline.nn.backend.cupy_available", lambda: False)
    capsys.readouterr()
    assert train.main(["--run", "ens", "MEMBERS=3", "DEVICE=gpu"]) == 2
    one_error_line(capsys, "device 'gpu' requested")
    assert (root / "runs" / "ens" / "config.toml").read_text() == config
    shutil.rmtree(root / "runs" / "ens" / "members" / "1")  # unfinished: FORCE=1 may change what member 1 trains
    assert train.main(["--run", "ens", "ARCH=seed_smal", "FORCE=1"]) == 2
    assert "seed_smal" in capsys.readouterr().err
    assert (root / "runs" / "ens" / "config.toml").read_text() == config
    assert train.main(["--run", "ens"]) == 0 and runs.Run("ens/members/1").finished


def test_a_missing_run_named_after_a_preset_is_trained_by_naming_the_preset(root):
    # `make submit PRESET=quick` advised `make train RUN=quick`, which is refused (a preset's name)
    with pytest.raises(UserError, match=r"train it first \(`make train PRESET=quick`\)"):
        runs.Run.existing("quick")
    with pytest.raises(UserError, match=r"`make train RUN=mine`"):
        runs.Run.existing("mine")


def test_a_run_named_after_another_preset_says_which_preset_it_trains(root, capsys):
    # `make train RUN=quick` trained the 30-minute standard preset into runs/quick
    assert train.main(["--run", "quick", *FAST]) == 2
    one_error_line(capsys, "RUN=quick is a preset's name", "`make train PRESET=quick`")
    assert not (root / "runs" / "quick").exists()
    assert train.main(["--run", "quick", "--preset", "standard", *FAST]) == 0  # said outright: trained
    capsys.readouterr()
    assert train.main(["--run", "quick"]) == 0
    assert "note: runs/quick was trained with preset standard, not quick" in capsys.readouterr().out


def test_an_ensemble_from_before_member_archs_continues_when_its_preset_is_named(root, capsys):
    # `make train PRESET=overnight` on an overnight run started before the preset gained member_archs was
    # refused ("changed: member_archs"), and so was every continuing Kaggle kernel (it always names the preset)
    args = ["--preset", "overnight", "--run", "night", *FAST, "MEMBERS=2"]
    assert train.main([*args, "MEMBER_ARCHS="]) == 0
    for name in ("config.toml", train.ENSEMBLE_RECORD):
        path = root / "runs" / "night" / name
        path.write_text("\n".join(l for l in path.read_text().splitlines() if "member_archs" not in l) + "\n")
    capsys.readouterr()
    assert train.main(args) == 0, capsys.readouterr().err
    assert "nothing to do" in capsys.readouterr().out
    assert train.main([*args, "MEMBER_ARCHS=seed_small,lenet5"]) == 2  # said outright: a change, as before
    # its record removed too: the preset's advice named the preset, whose MEMBER_ARCHS member 1 was not trained with
    for name in ("config.toml", train.ENSEMBLE_RECORD):
        (root / "runs" / "night" / name).unlink()
    capsys.readouterr()
    assert train.main([*args, "MEMBER_ARCHS=seed_small,lenet5"]) == 2
    one_error_line(capsys, "members/1 was trained with another config (arch 'seed_small' -> 'lenet5')",
                   "MEMBER_ARCHS= trains every member as ARCH")
    assert train.main([*args, "MEMBER_ARCHS="]) == 0, capsys.readouterr().err


def test_a_refused_new_ensemble_leaves_nothing_to_refuse_the_corrected_retry_with(root, capsys):
    # `ARCH=typo` was refused after config.toml was written; the retry with the right name was then "another config"
    assert train.main(["--run", "ens", *ENSEMBLE, "ARCH=seed_smal"]) == 2
    assert "seed_smal" in capsys.readouterr().err
    assert not (root / "runs" / "ens").exists()
    assert train.main(["--run", "ens", *ENSEMBLE]) == 0


def test_an_ensemble_without_its_config_is_never_trained_as_a_single_net(root, capsys):
    # with config.toml removed (as the damaged-file message advised), `make train RUN=ens` trained a `standard`
    # net into the ensemble's folder
    assert train.main(["--run", "ens", *ENSEMBLE]) == 0
    (root / "runs" / "ens" / "config.toml").unlink()  # restored from the record
    assert train.main(["--run", "ens"]) == 0 and (root / "runs" / "ens" / "config.toml").is_file()
    (root / "runs" / "ens" / "config.toml").unlink()
    (root / "runs" / "ens" / train.ENSEMBLE_RECORD).unlink()  # as an ensemble from before the record
    capsys.readouterr()
    assert train.main(["--run", "ens"]) == 2
    one_error_line(capsys, "holds the members of an ensemble", "`make train PRESET=quick RUN=ens`")
    assert not (root / "runs" / "ens" / "model.npz").exists()
    assert train.main(["--run", "ens", *ENSEMBLE, "EPOCHS=2"]) == 2  # its members say which config it was
    one_error_line(capsys, "epochs 1 -> 2")
    assert train.main(["--run", "ens", *ENSEMBLE]) == 0 and (root / "runs" / "ens" / "config.toml").is_file()
    path = root / "runs" / "ens" / "config.toml"
    path.write_text(path.read_text().replace("members = 2", "members = 1"))
    capsys.readouterr()
    assert train.main(["--run", "ens", "FORCE=1"]) == 2  # an adopted edit passes the guards a forced change does
    one_error_line(capsys, "runs/ens has finished training, so FORCE=1 cannot continue it with changed members")
    assert not (root / "runs" / "ens" / "model.npz").exists()


def test_check_config_refuses_what_training_would_and_writes_nothing(root, capsys):
    # `make train VAL_FRACTION=0.2 RUN=x` asks this before prepare splits the data again; it compared the config's
    # val_fraction, which a run on prepare's split never uses, not the split its checkpoint began on
    folder = root / "runs" / "x"
    meta_path, prepared = root / "data" / "processed" / "meta.json", 0.25
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "split_seed": 0, "val_fraction": prepared}))
    assert train.main(["--run", "x", "--preset", "quick", *FAST, "VAL_FRACTION=0.3", "--check-config"]) == 0
    assert not folder.exists()  # a new run: taken, and nothing trained or recorded
    # begun by a plain `make train` on a split prepared earlier: its config says the preset's 0.1
    assert train.main(["--run", "x", "--preset", "quick", *FAST]) == 0
    assert runs.Run("x").config().val_fraction == 0.1
    written = lambda: {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}
    before = written()
    capsys.readouterr()
    assert train.main(["--run", "x", "VAL_FRACTION=0.1", "--check-config"]) == 2  # the config's: not the split's
    one_error_line(capsys, f"runs/x began on the split VAL_FRACTION={prepared}", f"give VAL_FRACTION={prepared}")
    for ok in ([f"VAL_FRACTION={prepared}"], [], ["VAL_FRACTION=0.3", "FORCE=1"]):
        assert train.main(["--run", "x", *ok, "--check-config"]) == 0, capsys.readouterr().err
    assert train.main(["--run", "x", "EPOCHS=2", "--check-config"]) == 2  # what training refuses, refused here
    one_error_line(capsys, "runs/x was started with another config (changed: epochs)")
    assert written() == before
    assert train.main(["--run", "x", f"VAL_FRACTION={prepared}"]) == 0  # its config's 0.1 is not a change
    # an ensemble alike: its members' configs say 0.1 too, which is no change of theirs either (a member refused
    # it after the ensemble's record took it, and every later resume was refused)
    with signal_while_judged():  # member 0 stops with its checkpoint
        assert train.main(["--run", "e", *ENSEMBLE]) == 128 + signal.SIGINT
    assert (root / "runs" / "e" / "members" / "0" / "checkpoints").is_dir()
    assert train.main(["--run", "e", f"VAL_FRACTION={prepared}"]) == 0, capsys.readouterr().err
    assert train.main(["--run", "e"]) == 0 and runs.Run("e").finished


def test_max_time_zero_means_no_limit_for_an_ensemble_too(root, capsys):
    # parse_duration reads 0 as no limit, and a single net trained on; an ensemble stopped before member 0 (exit 3)
    assert train.main(["--run", "ens0", *ENSEMBLE, "MAX_TIME=0"]) == 0, capsys.readouterr().err
    assert runs.Run("ens0").finished


def test_a_forced_change_keeps_the_best_epoch_so_far_and_says_it_in_the_checkpoints_first(root, capsys, monkeypatch):
    # `make train RUN=x EPOCHS=4 FORCE=1` over a run stopped after its best epoch: best.npz was then refused as
    # "made with another config" and the last epoch delivered, whatever SELECT=best said
    with signal_while_judged():  # Ctrl-C while epoch 1 is judged: training stops at epoch 2
        assert train.main(["--run", "b", "--preset", "quick", *FAST, "EPOCHS=3"]) != 0
    ckpt = root / "runs" / "b" / "checkpoints"
    assert checkpoint.unpack(checkpoint.read(ckpt / checkpoint.BEST))[3]["config"]["epochs"] == 3
    capsys.readouterr()
    assert train.main(["--run", "b", "EPOCHS=4", "FORCE=1", "MAX_TIME=0.001s"]) == 3  # stopped at once
    for name in (checkpoint.BEST, checkpoint.LATEST):  # the adopted config is in the checkpoints already
        assert checkpoint.unpack(checkpoint.read(ckpt / name))[3]["config"]["epochs"] == 4, name
    assert train.main(["--run", "b", "MAX_TIME="]) == 0  # no "config.toml was edited"
    assert "another config" not in capsys.readouterr().err
    history = [json.loads(line) for line in (root / "runs" / "b" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["val_acc"] for r in history]
    assert runs.Run("b").summary()["best_epoch"] == scores.index(max(scores)) + 1


def test_a_forced_change_of_the_metric_judges_the_epochs_after_it_afresh(root, capsys, monkeypatch):
    # EARLY_STOP_METRIC=val_loss FORCE=1 over a run judged by val_acc: the best val_acc (about 0.9) could never be
    # beaten by a -val_loss, and the old epoch stayed the one delivered
    with signal_while_judged():
        assert train.main(["--run", "m", "--preset", "quick", *FAST, "EPOCHS=3"]) != 0
    assert train.main(["--run", "m", "EARLY_STOP_METRIC=val_loss", "FORCE=1"]) == 0
    assert runs.Run("m").summary()["best_epoch"] > 1  # judged by val_loss from epoch 2 on: epoch 2 is its first


def test_a_signal_while_the_last_epoch_is_judged_stops_the_ensemble(root, capsys, monkeypatch):
    # the flag was read between steps only: a Ctrl-C (or a scheduler's SIGTERM) during the last epoch's validation
    # was lost, and the ensemble went on to train its next member
    with signal_while_judged(signal.SIGTERM):
        assert train.main(["--run", "ens", *ENSEMBLE]) == 128 + signal.SIGTERM
    assert "stopped by signal" in capsys.readouterr().err
    assert not (root / "runs" / "ens" / "members" / "1").exists()
    assert train.main(["--run", "ens"]) == 0 and runs.Run("ens").finished


def test_a_run_resumed_on_another_device_says_its_weights_will_differ(root, capsys):
    # a Kaggle kernel continuing a CPU run with GPU=1 (or DEVICE=auto on a GPU machine) went on without a word,
    # where the promise is the very weights of an uninterrupted run
    folder = stopped_run(root, "dev")
    latest = folder / "checkpoints" / checkpoint.LATEST
    arrays = checkpoint.read(latest)
    state = json.loads(str(arrays["state"]))
    assert state["device"] == "cpu"
    arrays["state"] = np.array(json.dumps({**state, "device": "gpu"}, sort_keys=True))
    arrays["checksum"] = np.array(checkpoint._checksum(arrays))
    save_npz(latest, arrays)
    (folder / "checkpoints" / checkpoint.PREVIOUS).unlink(missing_ok=True)
    code, _, err = finish(run_train(root, "dev", extra=[*FAST, "EPOCHS=3"]))
    assert code == 0 and "began on GPU and continues on CPU" in err, err


def test_a_batch_of_one_through_a_batchnorm_on_a_1x1_map_is_one_line(root, capsys):
    # deotte's last BatchNorm sees 1x1 maps: BATCH_SIZE=1 ended in a ValueError traceback at the first step
    assert train.main(["--run", "b1", "--preset", "quick", *FAST, "ARCH=deotte", "BATCH_SIZE=1"]) == 2
    one_error_line(capsys, "use BATCH_SIZE of 2 or more")
    assert train.main(["--run", "b1", "--preset", "quick", *FAST, "ARCH=deotte", "BATCH_SIZE=2"]) == 0, \
        capsys.readouterr().err  # the corrected retry is no "another config"
    assert train.main(["--run", "e1", *ENSEMBLE, "ARCH=deotte", "BATCH_SIZE=1"]) == 2  # an ensemble's first member
    one_error_line(capsys, "use BATCH_SIZE of 2 or more")
    assert not (root / "runs" / "e1").exists()
    assert train.main(["--run", "e1", *ENSEMBLE, "ARCH=deotte", "BATCH_SIZE=2"]) == 0, capsys.readouterr().err
