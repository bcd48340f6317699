"""predict: test_probs.npz from a fake run equals the model's own eval-mode output; clear errors."""
import json

import numpy as np
import pytest

from pipeline import predict, runs
from pipeline.config import TrainConfig, to_toml
from pipeline.errors import UserError
from pipeline.fileio import load_npz, save_npz

N_TEST = 12


@pytest.fixture
def project(tmp_path, monkeypatch):
    """PIPELINE_ROOT with a tiny test.npz and runs/r1 holding a freshly built seed_small."""
    from pipeline.nn import build_model

    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    x = np.random.default_rng(0).random((N_TEST, 28, 28, 1), dtype=np.float32)
    save_npz(processed / "test.npz", {"x": x})
    (processed / "meta.json").write_text(json.dumps({"test_rows": N_TEST}))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(to_toml(TrainConfig(arch="seed_small").to_dict()))
    model = build_model("seed_small", seed=3, dtype=np.float32)
    save_npz(run / "model.npz", model.state_dict())
    return tmp_path, run, x, model


def test_predict_writes_probs_of_the_saved_weights(project, capsys):
    _, run, x, model = project
    assert predict.main(["--run", "r1", "--device", "cpu", "--batch-size", "5"]) == 0
    probs = load_npz(run / "test_probs.npz")["probs"]
    assert probs.dtype == np.float32 and probs.shape == (N_TEST, 10)
    # config seed is 0, the weights come from seed 3: equality proves model.npz was loaded
    np.testing.assert_allclose(probs, model.predict_proba(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(runs.Run("r1").test_probs(N_TEST), probs)
    assert "12 test images" in capsys.readouterr().out


def test_predict_errors(project, capsys):
    root, run, _, _ = project
    assert predict.main(["--run", "nope", "--device", "cpu"]) == 2
    assert "run 'nope' not found" in capsys.readouterr().err
    (run / "model.npz").unlink()
    assert predict.main(["--run", "r1", "--device", "cpu"]) == 2
    assert "model.npz is missing" in capsys.readouterr().err
    (root / "data" / "processed" / "test.npz").unlink()
    assert predict.main(["--run", "r1", "--device", "cpu"]) == 2
    assert "make prepare" in capsys.readouterr().err
    assert not (run / "test_probs.npz").exists()


def test_predict_refuses_weights_of_another_architecture(project):
    _, run, x, _ = project
    save_npz(run / "model.npz", {"0.w": np.zeros((3, 3, 1, 2), np.float32)})
    with pytest.raises(UserError, match="does not fit"):
        runs.Run("r1").predict_probs(x)


def test_check_probs():
    good = np.full((2, 10), 0.1, np.float32)
    runs.check_probs(good, 2)
    with pytest.raises(UserError, match="shape"):
        runs.check_probs(good, 3)
    with pytest.raises(UserError, match="NaN"):
        runs.check_probs(np.where(np.eye(2, 10) > 0, np.nan, 0.1), 2)
    with pytest.raises(UserError, match="probability"):
        runs.check_probs(np.full((2, 10), 0.2), 2)


def test_a_run_saved_with_conv_biases_before_batchnorm_is_told_apart_in_one_line(project, capsys):
    """deotte and small_bn lost the conv bias in front of each BatchNorm: an older model.npz that still
    has them is refused with one line that says why, not a traceback."""
    from pipeline.nn import build_model

    _, run, _, _ = project
    (run / "config.toml").write_text(to_toml(TrainConfig(arch="small_bn").to_dict()))
    state = build_model("small_bn", seed=0).state_dict()
    assert "0.b" not in state and "4.b" not in state and "9.b" in state  # the dense layers keep theirs
    save_npz(run / "model.npz", {**state, "0.b": np.zeros(16, np.float32), "4.b": np.zeros(32, np.float32)})
    assert predict.main(["--run", "r1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "older version" in err and "Traceback" not in err


def test_tta_on_a_single_net_is_refused_in_one_line(project, capsys):
    # test-time shifts are tried only in an ensemble's blend: `make submit TTA=1` on a single net did nothing unsaid
    assert predict.main(["--run", "r1", "--device", "cpu", "--tta", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs/r1 is a single net" in err, err
    assert predict.main(["--run", "r1", "--device", "cpu", "--tta", "0"]) == 0
