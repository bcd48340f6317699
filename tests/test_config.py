"""Presets and KEY=value overrides: typed, case-insensitive, unknown keys refused."""
import tomllib

import pytest

from pipeline.config import TrainConfig, build_config, to_toml
from pipeline.errors import UserError


@pytest.mark.parametrize("preset", ["quick", "standard", "overnight"])
def test_every_preset_loads(preset):
    cfg = build_config(preset)
    assert cfg.epochs > 0 and cfg.batch_size > 0


def test_overrides_are_typed_and_case_insensitive():
    cfg = build_config("quick", ["EPOCHS=7", "lr=0.01", "AUGMENT=1", "RUN=ignored", "PRESET=quick"])
    assert (cfg.epochs, cfg.lr, cfg.augment) == (7, 0.01, True)


@pytest.mark.parametrize("bad", ["EPOCHS=three", "NOPE=1", "AUGMENT=maybe", "epochs"])
def test_bad_overrides_are_refused(bad):
    with pytest.raises(UserError):
        build_config("quick", [bad])


@pytest.mark.parametrize("bad", ["EPOCHS=-1", "EPOCHS=0", "BATCH_SIZE=0", "LR=nan", "LR=inf", "LR=-1", "SEED=-1",
                                 "VAL_FRACTION=1.5", "MEMBERS=0", "ROTATE_DEG=nan", "SHIFT=-1", "ZOOM=5",
                                 "LABEL_SMOOTHING=2", "STEP_EPOCHS=0", "EARLY_STOP_METRIC=nope", "MOMENTUM=nan",
                                 "MEMBERS=1000000000"])
def test_values_no_training_can_use_are_refused_in_one_line(bad):
    # each of these used to train (EPOCHS=-1 delivered an untrained model as finished) or end in a traceback
    with pytest.raises(UserError, match=f"^{bad.split('=')[0]}: expected"):
        build_config("quick", [bad])


@pytest.mark.parametrize("bad,words", [(["run=mine"], "reads RUN"), (["preset=quick"], "reads PRESET"),
                                       (["EPOCHS=2", "epochs=1"], "same setting")])
def test_a_make_variable_in_the_wrong_case_or_twice_is_refused(bad, words):
    # `make train run=mine` trained into runs/PRESET, `preset=quick` trained the standard preset, and
    # `EPOCHS=2 epochs=1` trained 1 epoch: each silently
    with pytest.raises(UserError, match=words):
        build_config("quick", bad)
    assert build_config("quick", ["RUN=mine", "force=1", "EPOCHS=2", "epochs=2"]).epochs == 2


def test_unknown_preset_names_the_known_ones():
    for name in ("nosuch", "quick\n"):
        with pytest.raises(UserError, match="quick"):
            build_config(name)


def test_resolved_config_round_trips_through_toml():
    cfg = TrainConfig(arch="deotte", lr=3e-4, augment=True, max_time="8h")
    assert tomllib.loads(to_toml(cfg.to_dict())) == cfg.to_dict()
    # a newline typed into MEMBER_ARCHS wrote a config.toml no later command could read
    for text in ('a,\nb', 'tab\there "q" \\ back', "del\x7f nul\x00 é \U0001F600"):
        cfg = TrainConfig(member_archs=text)
        assert tomllib.loads(to_toml(cfg.to_dict())) == cfg.to_dict(), text


@pytest.mark.parametrize("name", ["quick", "night-2", "night/members/3"])
def test_run_names_accepted(name):
    from pipeline.runs import run_dir

    assert run_dir(name).name == name.split("/")[-1]


@pytest.mark.parametrize("name", ["../etc", "a/b", "night/members/x", "", ".hidden", "a b", "night\n",
                                  "night/members/3\n"])
def test_run_names_refused(name):
    from pipeline.runs import run_dir

    with pytest.raises(UserError):
        run_dir(name)
