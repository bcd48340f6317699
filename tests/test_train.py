"""Training stage behaviour beyond resume: early stopping, batching, user errors."""
import importlib.util
import json
import re

import numpy as np
import pytest

from pipeline import checkpoint, train
from pipeline.errors import UserError
from pipeline.fileio import load_npz
from tests.test_resume import assert_same_weights, finish, history, train as run_train, write_processed

# Deotte's own layer order, Keras' zoom, and a weight average that the run delivers at its last epoch.
AVERAGED = ["ARCH=deotte_relu_bn", "ZOOM_XY=1", "EMA_DECAY=0.9", "SELECT=last"]


def test_weight_average_resumes_bit_exactly_and_is_what_the_run_delivers(tmp_path):
    write_processed(tmp_path)
    code, _, err = finish(run_train(tmp_path, "whole", extra=AVERAGED))
    assert code == 0, err
    whole = tmp_path / "runs" / "whole"
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("live_val_acc" in r for r in records)
    assert json.loads((whole / "summary.json").read_text())["best_epoch"] == 2  # SELECT=last
    delivered = load_npz(whole / "model.npz")
    live, _, _, _ = checkpoint.unpack(checkpoint.read(whole / "checkpoints" / checkpoint.LATEST))
    assert not np.array_equal(delivered["0.w"], live["0.w"])  # the average, not the last live weights
    assert not np.array_equal(delivered["2.running_mean"], live["2.running_mean"])  # statistics recomputed

    for attempt in range(40):  # each invocation stops after a step or so with a checkpoint (exit 3)
        code, _, err = finish(run_train(tmp_path, "cut", extra=[*AVERAGED, "MAX_TIME=0.3s"]))
        if code == 0:
            break
        assert code == 3, err
    else:
        pytest.fail("the interrupted run never finished")
    assert attempt >= 2
    assert_same_weights(load_npz(tmp_path / "runs" / "cut" / "model.npz"), delivered)
    assert history(tmp_path / "runs" / "cut" / "metrics.jsonl") == history(whole / "metrics.jsonl")


@pytest.mark.parametrize("select,delivered_epoch", [("best", 1), ("last", 2)])
def test_early_stopping_ends_the_run_and_delivers_the_selected_epoch(tmp_path, select, delivered_epoch):
    write_processed(tmp_path)
    # LR=0: validation never improves after epoch 1, so patience 1 stops after epoch 2 of 5, whatever SELECT says.
    code, out, err = finish(run_train(tmp_path, "early", extra=["EPOCHS=5", "LR=0", "EARLY_STOP_PATIENCE=1",
                                                               f"SELECT={select}"]))
    assert code == 0, err
    assert "early stop" in out
    run = tmp_path / "runs" / "early"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((run / "summary.json").read_text())["best_epoch"] == delivered_epoch


def test_the_weight_average_can_be_switched_on_in_a_started_run(tmp_path):
    write_processed(tmp_path)
    code, _, err = finish(run_train(tmp_path, "late", extra=["MAX_TIME=0.3s"]))
    assert code == 3, err
    code, _, err = finish(run_train(tmp_path, "late", extra=["EMA_DECAY=0.9", "FORCE=1"]))
    assert code == 0, err
    assert json.loads((tmp_path / "runs" / "late" / "summary.json").read_text())["weight_average"] is True


def test_force_continues_a_run_whose_optimizer_settings_changed(tmp_path, monkeypatch, capsys):
    """SGD without momentum saves no buffers: FORCE=1 with MOMENTUM=0.9 starts them from the gradient, and a
    resume after that needs no FORCE. Another optimizer starts its state afresh, its step count with it."""
    write_processed(tmp_path)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    args = ["--preset", "quick", "EPOCHS=2", "BATCH_SIZE=16", "DEVICE=cpu", "OPTIMIZER=sgd"]
    assert train.main(["--run", "sgd", *args, "MOMENTUM=0", "MAX_TIME=0.001s"]) == 3
    assert train.main(["--run", "sgd", *args, "MOMENTUM=0.9", "FORCE=1", "MAX_TIME=0.001s"]) == 3
    assert train.main(["--run", "sgd", *args, "MOMENTUM=0.9"]) == 0, capsys.readouterr().err
    assert train.main(["--run", "adam", *args, "MOMENTUM=0.9", "MAX_TIME=0.001s"]) == 3
    capsys.readouterr()
    assert train.main(["--run", "adam", *args[:-1], "OPTIMIZER=adam", "FORCE=1"]) == 0
    assert "the optimizer is now adam: its state starts afresh" in capsys.readouterr().err


@pytest.mark.parametrize("n,batch,steps", [(100, 10, 10), (101, 10, 10), (102, 10, 11), (1, 10, 1), (9, 10, 1)])
def test_no_batch_of_a_single_image(n, batch, steps):
    assert train.batches_per_epoch(n, batch) == steps


@pytest.mark.parametrize("text,seconds", [("8h", 28800), ("90m", 5400), ("1h30m", 5400), ("45", 45), ("", 0)])
def test_max_time_durations(text, seconds):
    assert train.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["9" * 309 + "h", "9" * 400, "400d", "9000h", "31622401"])
def test_a_max_time_beyond_a_year_or_unreadable_is_one_line(text):
    # 1e309 seconds overflowed to inf, and an ensemble's math.ceil(inf) was a traceback
    with pytest.raises(UserError, match="MAX_TIME: .*'" + text + "'"):
        train.parse_duration(text)


@pytest.mark.parametrize("item, words", [("RUN=night", "--run"), ("PRESET=overnight", "--preset"),
                                         ("TTA=1", "read by make")])
def test_make_variables_typed_on_trains_own_command_line_are_refused(item, words, capsys, monkeypatch, tmp_path):
    # `python -m pipeline.train PRESET=overnight RUN=night` trained `standard` into runs/standard, unsaid
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))  # a regression trains in a folder of its own, not in runs/
    assert train.main([item, "EPOCHS=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and item in err, err


def test_settings_from_the_environment_are_named(monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_MAKE_VARS", "SEED")
    monkeypatch.setenv("PIPELINE_VAR_SEED", "42")
    monkeypatch.setenv("PIPELINE_ENV_SETTINGS", "SEED")
    args = train.parse_args(["--make-vars"])
    assert "SEED=42" in args.overrides and capsys.readouterr().err == "note: SEED=42 from the environment\n"


def test_a_refused_resume_names_the_command_that_puts_its_split_back():
    # `make train RUN=x VAL_FRACTION=0.2` re-split the shared data, then refused: the way back was never said
    now = {"train_sha256": "a", "split": [0, 0.2]}
    assert "`make prepare VAL_FRACTION=0.1`" in train.restore_advice({"train_sha256": "a", "split": [0, 0.1]}, now)
    assert "--split-seed 3" in train.restore_advice({"train_sha256": "a", "split": [3, 0.1]}, now)
    assert train.restore_advice({"train_sha256": "b", "split": [0, 0.1]}, now) == ""  # another train.csv: no way back


def test_a_bag_is_its_own_seeded_fraction_of_the_training_rows():
    rows = np.arange(1000, 1400)
    assert train.bagged(rows, 1.0, 0) is rows
    a, again, other = train.bagged(rows, 0.9, 0), train.bagged(rows, 0.9, 0), train.bagged(rows, 0.9, 1)
    assert len(a) == 360 and np.all(np.diff(a) > 0) and np.isin(a, rows).all()
    assert np.array_equal(a, again) and not np.array_equal(a, other)
    assert len(np.intersect1d(a, other)) < 360  # two members' bags differ by a few dozen rows, not by nothing
    with pytest.raises(train.UserError, match="leaves 1 of the 400"):  # one image: no BatchNorm statistics
        train.bagged(rows, 0.002, 0)


def test_a_bagged_net_trains_on_its_bag_and_keeps_the_shared_validation_rows(tmp_path):
    write_processed(tmp_path)
    sizes = {}
    for run, bag in [("whole", []), ("bagged", ["BAG=0.5"])]:
        code, out, err = finish(run_train(tmp_path, run, extra=[*bag, "EPOCHS=1"]))
        assert code == 0, err
        sizes[run] = [int(n) for n in re.search(r"(\d+) train / (\d+) validation images", out).groups()]
    assert sizes["bagged"] == [sizes["whole"][0] // 2, sizes["whole"][1]] and sizes["whole"][0] % 2 == 0


NO_CUPY = importlib.util.find_spec("cupy") is None


@pytest.mark.parametrize("bad", [["EPOCHS=x"], ["NOPE=1"], ["MAX_TIME=soon"], ["SELECT=worst"], ["EMA_DECAY=1"],
                                 ["FORCE=no"], ["LR_DECAY=1e200"], ["BAG=0"], ["BAG=1.5"], ["BAG=1e-9"],
                                 pytest.param(["DEVICE=gpu"], marks=pytest.mark.skipif(not NO_CUPY, reason="CuPy here"))])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, bad):
    write_processed(tmp_path)
    code, out, err = finish(run_train(tmp_path, "bad", extra=bad))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "runs" / "bad" / "summary.json").exists()


def test_a_checkpoint_with_conv_biases_before_batchnorm_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """small_bn lost the conv bias in front of each BatchNorm: resuming a run saved before says so in one
    line, no traceback."""
    write_processed(tmp_path)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    args = ["--preset", "quick", "--run", "old", "EPOCHS=2", "BATCH_SIZE=16", "DEVICE=cpu"]
    assert train.main([*args, "MAX_TIME=0.001s"]) == 3  # stops after its first step, with a checkpoint
    folder = tmp_path / "runs" / "old" / "checkpoints"
    model_state, opt_state, rng_state, state = checkpoint.unpack(checkpoint.read(folder / checkpoint.LATEST))
    model_state = {**model_state, "0.b": np.zeros(16, np.float32), "4.b": np.zeros(32, np.float32)}
    checkpoint.write_latest(folder, checkpoint.pack(model_state, opt_state, rng_state, state))
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "older version" in err and "runs/old" in err


@pytest.mark.parametrize("edit", [lambda s: s.pop("epoch"), lambda s: s.update(step="3"),
                                  lambda s: s["epoch_sums"].pop("seen")],
                         ids=["no epoch", "step a string", "epoch sums without seen"])
def test_a_checkpoint_whose_state_lacks_what_resuming_reads_is_refused_in_one_line(tmp_path, monkeypatch, capsys,
                                                                                    edit):
    """A checkpoint rewritten by hand, its checksum with it: one line naming the checkpoint, not a KeyError."""
    write_processed(tmp_path)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    args = ["--preset", "quick", "--run", "hand", "EPOCHS=2", "BATCH_SIZE=16", "DEVICE=cpu"]
    assert train.main([*args, "MAX_TIME=0.001s"]) == 3
    folder = tmp_path / "runs" / "hand" / "checkpoints"
    model_state, opt_state, rng_state, state = checkpoint.unpack(checkpoint.read(folder / checkpoint.LATEST))
    edit(state)
    checkpoint.write_latest(folder, checkpoint.pack(model_state, opt_state, rng_state, state))
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacks its training state" in err and "runs/hand" in err, err


def test_a_run_that_learned_nothing_says_so_in_one_line(tmp_path):
    write_processed(tmp_path)
    code, _, err = finish(run_train(tmp_path, "fine"))
    assert code == 0 and "did not learn" not in err, err
    code, _, err = finish(run_train(tmp_path, "diverged", extra=["LR=1e4"]))  # Adam steps of 1e4: no net survives
    assert code == 0, err
    lines = [line for line in err.splitlines() if "did not learn" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: runs/diverged did not learn"), err
