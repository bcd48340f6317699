"""The Makefile stays in step with the code: every target dry-runs, is documented, and names real modules."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import TrainConfig, apply_values, make_overrides, stage_variables
from pipeline import submit
from tests.lock_holder import held_elsewhere

REPO = Path(__file__).resolve().parent.parent


def make(*args):
    return subprocess.run(["make", "-C", str(REPO), "--no-print-directory", *args],
                          capture_output=True, text=True, timeout=60)


FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as fh:
    env = {{k: v for k, v in os.environ.items() if k.startswith("PIPELINE_")}}
    fh.write(json.dumps({{"argv": sys.argv[1:], "env": env}}) + "\\n")
sys.exit(2 if os.environ.get("FAKE_FAIL") in sys.argv else 0)  # FAKE_FAIL=--flag: the call with it is refused
"""


def sandbox(tmp_path, venv=True):
    """A copy of the Makefile in tmp_path whose .venv python only logs how it was called (argv, PIPELINE_ env)."""
    box = tmp_path / "box"
    box.mkdir()
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt", "requirements-kernel.txt"):
        shutil.copy(REPO / name, box / name)
    shutil.copytree(REPO / "configs", box / "configs")
    if venv:
        (box / ".venv" / "bin").mkdir(parents=True)
        python = box / ".venv" / "bin" / "python"
        python.write_text(FAKE_PYTHON)
        python.chmod(0o755)
        for marker in (".installed", ".dev-installed", ".kernel-installed"):
            (box / ".venv" / marker).touch()
    return box


def outside_make(env):
    """The environment without what an enclosing make (`make test`) passes down: its variables are not ours."""
    return {k: v for k, v in env.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
            and not k.startswith("PIPELINE_VAR_") and k != "PIPELINE_MAKE_VARS"}


def sandbox_make(box, *args, env=None):
    env = dict(outside_make(os.environ if env is None else env), FAKE_LOG=str(box / "calls.jsonl"))
    return subprocess.run(["make", "-C", str(box), "--no-print-directory", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def calls(box):
    log = box / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def built(box, run="x"):
    """Every file of `make train submit RUN=run` in place, each newer than what it is made from (test.csv before
    train.csv, as fetch writes them)."""
    files = ["data/raw/test.csv", "data/raw/train.csv", "data/processed/meta.json", f"runs/{run}/summary.json",
             f"runs/{run}/test_probs.npz", "submissions/.submission.json", "submissions/.run",
             "submissions/submission.csv"]
    now = time.time()
    for i, name in enumerate(files):
        path = box / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{run}\n" if name == "submissions/.run" else "x")
        os.utime(path, (now - 100 + i, now - 100 + i))


def phony_targets():
    text = (REPO / "Makefile").read_text()
    return [t for t in re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split() if t != "FORCE"]


def test_help_is_default_and_lists_every_phony_target():
    out = make().stdout
    assert "make train submit" in (REPO / "README.md").read_text()
    listed = set(re.findall(r"^  (\S+)\s", out, re.M))
    assert set(phony_targets()) <= listed, set(phony_targets()) - listed


@pytest.mark.parametrize("target", [t for t in phony_targets() if t != "help"])
def test_every_target_dry_runs_and_calls_existing_modules(target):
    result = make("-n", target, "RUN=dryrun", "PRESET=quick")
    assert result.returncode == 0, result.stderr
    for module in re.findall(r"-m (pipeline\.\w+|bench\.\w+)", result.stdout):
        assert importlib.util.find_spec(module) is not None, f"{target} calls missing module {module}"


def test_command_line_overrides_reach_train(tmp_path):
    out = make("-n", "train", "PRESET=quick", "EPOCHS=3", "RUN=myrun").stdout
    line = next(l for l in out.splitlines() if "pipeline.train" in l)
    assert "--preset quick" in line and "--run myrun" in line and "--make-vars" in line
    box = sandbox(tmp_path)
    result = sandbox_make(box, "train", "PRESET=quick", "EPOCHS=3", "RUN=myrun")
    assert result.returncode == 0, result.stderr
    call = next(c for c in calls(box) if "pipeline.train" in c["argv"])
    assert "EPOCHS=3" in make_overrides(call["env"]) and "RUN=myrun" in make_overrides(call["env"])


def test_training_settings_from_the_environment_reach_train(tmp_path):
    # `SEED=1 make train RUN=s1` trained seed 0: make read RUN from the environment and dropped SEED unsaid
    box = sandbox(tmp_path)
    env = dict(os.environ, SEED="1", MAX_TIME="8h", RUN="s1")
    result = sandbox_make(box, "train", env=env)
    assert result.returncode == 0, result.stderr
    call = next(c for c in calls(box) if "pipeline.train" in c["argv"])
    assert {"SEED=1", "MAX_TIME=8h"} <= set(make_overrides(call["env"])) and "--run s1" in " ".join(call["argv"])
    assert call["env"]["PIPELINE_ENV_SETTINGS"] == "MAX_TIME SEED"  # train names where they came from
    result = sandbox_make(box, "train", env=dict(os.environ, SEED="", DEVICE=""))  # exported but empty: not given
    assert result.returncode == 0, result.stderr
    call = [c for c in calls(box) if "pipeline.train" in c["argv"]][-1]
    assert not any(o.startswith(("SEED=", "DEVICE=")) for o in make_overrides(call["env"]))


def test_a_fetch_cut_short_is_fetched_again_by_make_train(tmp_path):
    # the CSV rule ran only when a CSV was missing: prepare then refused the mixed data/raw on every `make train`
    box = sandbox(tmp_path)
    built(box)
    assert "pipeline.fetch" not in sandbox_make(box, "-n", "prepare").stdout
    (box / "data" / "raw" / ".fetch-incomplete").write_text("cut short\n")
    result = sandbox_make(box, "prepare")
    assert result.returncode == 0, result.stderr
    stages = [c["argv"] for c in calls(box)]
    assert any("pipeline.fetch" in a for a in stages) and "pipeline.prepare" in stages[-1], stages


def test_resume_without_preset_keeps_the_runs_own():
    out = make("-n", "train", "RUN=old").stdout
    line = next(l for l in out.splitlines() if "pipeline.train" in l)
    assert "--preset" not in line and "--run old" in line


# ---------------------------------------------------------------- misuse (issue 12)

@pytest.mark.parametrize("message", ["x `touch {mark}`", "x $$(touch {mark})", "x $(touch {mark})",
                                     'v2 "best" $HOME it\'s', "line one\nline two", "-v2", "--final"])
def test_message_reaches_python_as_data(tmp_path, message):
    box = sandbox(tmp_path)
    built(box)
    mark = tmp_path / "pwned"
    message = message.format(mark=mark)
    result = sandbox_make(box, "submit", "RUN=x", f"MESSAGE={message}")
    assert result.returncode == 0, result.stderr
    assert not mark.exists(), "the shell ran part of MESSAGE"
    upload = next(c for c in calls(box) if "--upload-only" in c["argv"])
    # as submit reads it: `--message -v2` was refused by argparse ("expected one argument") after the CSV was written
    assert submit.parse_args(upload["argv"][2:]).message == message


@pytest.mark.parametrize("run", ["x`touch {mark}`", "x$$(touch {mark})", "x;touch {mark}", "a b", "../../x", "-x", "-h",
                                 ".hidden", "_x"])
def test_a_bad_run_name_is_refused_before_any_recipe(tmp_path, run):
    box = sandbox(tmp_path)
    mark = tmp_path / "pwned"
    result = sandbox_make(box, "train", "submit", f"RUN={run.format(mark=mark)}")
    assert result.returncode != 0 and "is not a run name" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not mark.exists() and calls(box) == []


@pytest.mark.parametrize("preset", ["../../x", "..", "-h"])
def test_a_preset_outside_configs_is_refused(tmp_path, preset):
    box = sandbox(tmp_path)
    result = sandbox_make(box, "train", f"PRESET={preset}")
    assert result.returncode != 0 and "is not a preset name" in result.stderr and calls(box) == []
    from pipeline.config import build_config
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="unknown preset"):
        build_config("../configs/quick")


def test_dry_run_of_submit_after_everything_is_built_lists_only_the_upload(tmp_path):
    box = sandbox(tmp_path)
    built(box)
    result = sandbox_make(box, "-n", "submit", "RUN=x")
    assert result.returncode == 0, result.stderr
    stages = re.findall(r"-m (pipeline\.\w+)", result.stdout)
    assert stages == ["pipeline.submit"] and "--upload-only" in result.stdout, result.stdout
    other = sandbox_make(box, "-n", "submit", "RUN=y").stdout  # another run: its submission is written
    assert "pipeline.submit --run y --upload 0" in other
    # a submit killed after .run but before its record: the CSV is unchecked by score until written anew
    (box / "submissions" / ".submission.json").unlink()
    assert "pipeline.submit --run x --upload 0" in sandbox_make(box, "-n", "submit", "RUN=x").stdout
    assert "--force" not in other
    forced = sandbox_make(box, "-n", "submit", "RUN=y", "FORCE=1").stdout  # a run that did not learn, all the same
    assert forced.count("--force") == 2, forced
    # `make train submit LR=50 FORCE=1`: the FORCE is train's (a changed LR), not a pass for what it trains
    both = sandbox_make(box, "-n", "train", "submit", "RUN=y", "FORCE=1").stdout
    assert "pipeline.submit" in both and "--force" not in both.split("pipeline.train", 1)[1].split("\n", 1)[1], both


def test_a_failed_upload_is_tried_again_by_the_next_submit(tmp_path):
    box = sandbox(tmp_path)
    built(box)
    for _ in range(2):  # the CSV is up to date both times; the upload step still asks (it knows what was sent)
        assert sandbox_make(box, "submit", "RUN=x").returncode == 0
    assert sum("--upload-only" in c["argv"] for c in calls(box)) == 2
    assert not any("pipeline.predict" in c["argv"] or "pipeline.train" in c["argv"] for c in calls(box))


def test_score_judges_the_submission_that_exists(tmp_path):
    box = sandbox(tmp_path)
    (box / "submissions").mkdir()
    (box / "submissions" / "submission.csv").write_text("x")
    result = sandbox_make(box, "score")  # PRESET and RUN default to standard, which was never trained
    assert result.returncode == 0, result.stderr
    assert [c["argv"][:2] for c in calls(box)] == [["-m", "pipeline.score"]]
    assert "--run" not in calls(box)[0]["argv"]  # the run submit recorded is the one the CSV must come from
    assert sandbox_make(box, "score", "RUN=r1").returncode == 0
    assert calls(box)[-1]["argv"][-2:] == ["--run", "r1"]  # RUN= given: the CSV must be that run's


def test_ensemble_creates_the_venv_first(tmp_path):
    box = sandbox(tmp_path, venv=False)
    out = sandbox_make(box, "-n", "ensemble", "RUN=night").stdout
    assert "-m venv" in out and out.index("-m venv") < out.index("pipeline.ensemble")


def test_make_kernel_installs_nbformat_and_never_the_test_tools(tmp_path):
    # `make kernel` installed requirements-dev.txt (PyTorch: gigabytes on a CUDA machine) to get nbformat
    box = sandbox(tmp_path)
    for marker in (".dev-installed", ".kernel-installed"):
        (box / ".venv" / marker).unlink()
    assert sandbox_make(box, "kernel").returncode == 0
    installed = [c["argv"][c["argv"].index("-r") + 1] for c in calls(box) if "-r" in c["argv"]]
    assert installed == ["requirements-kernel.txt"], installed
    assert "torch" not in (box / "requirements-kernel.txt").read_text()
    assert calls(box)[-1]["argv"][1:3] == ["pipeline.kernel", "generate"]


def fake_pythons(tmp_path, versions, broken=(), python3_minor=10):
    """python3.X stand-ins that log each call, and a plain python3 that is 3.`python3_minor` (it shadows the real
    one in /usr/bin). A broken one exits 127 like a pyenv shim for a version pyenv cannot start."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, minor in [("python3", python3_minor)] + [(f"python3.{v}", v) for v in versions]:
        check = "exit 127" if minor in broken else f"[ {minor} -ge 11 ] || exit 1"
        exe = folder / name
        exe.write_text(f"#!/bin/bash\necho {name} \"$@\" >> {tmp_path}/python.log\n"
                       f"if [ \"$1\" = -c ]; then {check}; fi\n")
        exe.chmod(0o755)
    return folder


def venv_python(tmp_path):
    """The python make created the venv with, from the fake pythons' log."""
    lines = [line for line in (tmp_path / "python.log").read_text().splitlines() if "-m venv" in line]
    assert len(lines) == 1, lines
    return lines[0].split()[0]


@pytest.mark.parametrize("versions, broken, python3_minor, expected", [
    ([11, 13, 12], (), 10, "python3.11"),  # python3 is too old; 3.11 first, as the project pins it
    ([11, 13], (), 12, "python3"),         # the user's own python3 when it is new enough
    ([11, 12], (11,), 10, "python3.12"),   # a shim that cannot start is passed over (it failed CI once)
])
def test_the_first_working_python_is_picked(tmp_path, versions, broken, python3_minor, expected):
    box = sandbox(tmp_path, venv=False)
    folder = fake_pythons(tmp_path, versions, broken, python3_minor)
    sandbox_make(box, "venv", env=dict(os.environ, PATH=f"{folder}:/usr/bin:/bin"))
    assert venv_python(tmp_path) == expected  # the fake python makes no venv: what matters is which one was asked


def test_python_base_names_the_python(tmp_path):
    box = sandbox(tmp_path, venv=False)
    folder = fake_pythons(tmp_path, [13, 14])
    sandbox_make(box, "venv", "PYTHON_BASE=python3.13", env=dict(os.environ, PATH=f"{folder}:/usr/bin:/bin"))
    assert venv_python(tmp_path) == "python3.13"
    assert "python3.14" not in (tmp_path / "python.log").read_text()


def test_only_broken_pythons_is_one_line(tmp_path):
    box = sandbox(tmp_path, venv=False)
    folder = fake_pythons(tmp_path, [13], broken=(13,))
    make_exe = shutil.which("make")
    result = subprocess.run([make_exe, "-C", str(box), "--no-print-directory", "venv"], capture_output=True,
                            text=True, timeout=60, env=dict(outside_make(os.environ), PATH=str(folder)))
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "no python3.11 or newer found" in result.stderr


def test_no_python_is_one_line(tmp_path):
    box = sandbox(tmp_path, venv=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    make_exe = shutil.which("make")
    result = subprocess.run([make_exe, "-C", str(box), "--no-print-directory", "venv"], capture_output=True,
                            text=True, timeout=60, env=dict(outside_make(os.environ), PATH=str(empty)))
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "no python3.11 or newer found" in result.stderr and "command not found" not in result.stderr


def test_make_variables_are_not_refused_as_settings():
    cfg = apply_values(TrainConfig(), {}, overrides=["PYTHON_BASE=python3.13", "TTA=1", "MESSAGE=x", "EPOCHS=2"])
    assert cfg.epochs == 2
    makefile = (REPO / "Makefile").read_text()
    read = set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", makefile))
    settings = {f.upper() for f in TrainConfig().to_dict()}
    assert read - settings <= stage_variables(), "a Makefile variable would be refused by train"


def test_make_overrides_come_from_the_environment_unexpanded():
    env = {"PIPELINE_MAKE_VARS": "EPOCHS LR", "PIPELINE_VAR_EPOCHS": "3", "PIPELINE_VAR_LR": "$(x) `y`"}
    assert make_overrides(env) == ["EPOCHS=3", "LR=$(x) `y`"]


def test_clean_removes_what_a_killed_stage_left(tmp_path):
    box = sandbox(tmp_path)
    leftovers = ["data/processed/.train.npz.abc123.tmp", "data/raw/.train.csv.abc123.tmp",
                 "data/.kaggle-download-abc123/x.zip", "submissions/.submission.csv.abc.tmp",
                 "submissions/submission.csv", "submissions/.run", "submissions/.submission.json",
                 "submissions/score.json"]  # the submission's records go with it: they named a removed CSV
    kept = ["data/raw/train.csv", "data/raw/test.csv", "submissions/.uploaded.json"]  # the record: never upload twice
    for name in leftovers + kept:
        (box / name).parent.mkdir(parents=True, exist_ok=True)
        (box / name).write_text("x")
    assert sandbox_make(box, "clean").returncode == 0
    assert [n for n in leftovers if (box / n).exists()] == []
    assert all((box / n).exists() for n in kept)
    assert not (box / "data" / ".kaggle-download-abc123").exists()


def test_report_of_a_missing_or_unfinished_run_never_trains(tmp_path):
    # `make report RUN=typo` trained the standard preset into runs/typo (about 30 minutes) before reporting
    box = sandbox(tmp_path)
    built(box)
    for run in ("typo", "x"):
        result = sandbox_make(box, "-n", "report", f"RUN={run}")
        assert result.returncode == 0, result.stderr
        assert re.findall(r"-m (pipeline\.\w+)", result.stdout) == ["pipeline.report"], result.stdout


def test_submit_never_trains_fetches_or_prepares(tmp_path):
    # `make submit RUN=typo` trained the standard preset into runs/typo (30 minutes), then uploaded it; an ensemble
    # stopped by MAX_TIME went back to training instead of blending its finished members
    box = sandbox(tmp_path)
    built(box)
    (box / "runs" / "x" / "summary.json").unlink()  # x stopped before it delivered
    for run in ("typo", "x"):
        result = sandbox_make(box, "-n", "submit", f"RUN={run}")
        assert result.returncode == 0, result.stderr
        stages = re.findall(r"-m (pipeline\.\w+)", result.stdout)
        assert stages[-1] == "pipeline.submit" and "pipeline.train" not in stages, result.stdout
    (tmp_path / "fresh").mkdir()
    fresh = sandbox(tmp_path / "fresh")  # nothing fetched yet: submit says what is missing instead
    result = sandbox_make(fresh, "-n", "submit")
    assert re.findall(r"-m (pipeline\.\w+)", result.stdout) == ["pipeline.predict", "pipeline.submit",
                                                                  "pipeline.submit"], result.stdout
    # `make train submit` still does it all, training first
    result = sandbox_make(fresh, "-n", "train", "submit")
    assert re.findall(r"-m (pipeline\.\w+)", result.stdout)[-4:] == ["pipeline.train", "pipeline.predict",
                                                                       "pipeline.submit", "pipeline.submit"]


def test_what_training_delivers_is_predicted_before_it_is_submitted(tmp_path):
    # make lists the files when it starts: a summary.json that `make train submit` writes was not a prerequisite
    # yet, so an ensemble resumed and finished by that very command went to submit with its old blend
    box = sandbox(tmp_path)
    built(box)
    stages = re.findall(r"-m (pipeline\.\w+)", sandbox_make(box, "-n", "train", "submit", "RUN=x").stdout)
    assert stages == ["pipeline.prepare", "pipeline.train", "pipeline.predict", "pipeline.submit",
                      "pipeline.submit"], stages
    # a member delivered by an earlier `make train` (after a blend of the members finished then) is blended in
    member = box / "runs" / "x" / "members" / "3" / "summary.json"
    member.parent.mkdir(parents=True)
    member.write_text("x")
    stages = re.findall(r"-m (pipeline\.\w+)", sandbox_make(box, "-n", "submit", "RUN=x").stdout)
    assert stages == ["pipeline.predict", "pipeline.submit", "pipeline.submit"], stages


@pytest.mark.parametrize("target,variable", [("submit", "run=y"), ("train", "preset=quick"), ("fetch", "source=mnist"),
                                             ("kernel", "force=1"), ("train", "val_fraction=0.2"),
                                             ("submit", "Upload=0"), ("submit", "Run=y"), ("ensemble", "tTa=1")])
def test_a_make_variable_in_another_case_is_refused_before_any_recipe(tmp_path, target, variable):
    # `make submit run=y` submitted the default run, `make submit Upload=0` uploaded, `make train preset=quick` trained
    # the standard preset,
    # `make kernel force=1` rebuilt nothing, `make train val_fraction=0.2` recorded 0.2 on a split prepare kept
    box = sandbox(tmp_path)
    built(box)
    result = sandbox_make(box, target, variable)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert f"write {variable.split('=')[0].upper()}=" in result.stderr and calls(box) == []


def test_a_variable_name_with_a_percent_sign_is_no_case_pattern(tmp_path):
    # the case check used the name as a make pattern: `r%=1` matched RUN and was refused as "write R%="
    box = sandbox(tmp_path)
    result = sandbox_make(box, "help", "r%=1")
    assert result.returncode == 0 and "case-sensitive" not in result.stderr, result.stderr


def test_prepare_and_train_ask_prepare_whatever_the_dates_say(tmp_path):
    # `make prepare VAL_FRACTION=0.3` after a first prepare said "Nothing to be done" and kept the 0.1 split; CSVs
    # unzipped with their old dates were never prepared (prepare compares contents and the split itself)
    box = sandbox(tmp_path)
    built(box)
    for goal, value in (("prepare", "0.3"), ("prepare", None), ("train", None)):
        result = sandbox_make(box, goal, *([f"VAL_FRACTION={value}"] if value else []))
        assert result.returncode == 0, result.stderr
        argv = [c["argv"] for c in calls(box) if "pipeline.prepare" in c["argv"]][-1]
        assert argv[2:] == ["--if-needed", *(["--val-fraction", value] if value else [])], argv
    assert len([c for c in calls(box) if "pipeline.prepare" in c["argv"]]) == 3
    # asking prepare makes nothing downstream look stale: `make -n` says what a real run does
    stages = re.findall(r"-m (pipeline\.\w+)", sandbox_make(box, "-n", "prepare", "submit", "RUN=x").stdout)
    assert stages == ["pipeline.prepare", "pipeline.submit"], stages


def test_train_with_val_fraction_asks_train_before_prepare_splits_again(tmp_path):
    # `make train VAL_FRACTION=0.2 RUN=x` on a run started on the 0.1 split split data/processed again, then train
    # refused x: every other run's split was changed by a command that did nothing
    box = sandbox(tmp_path)
    built(box)
    stages = lambda: [" ".join(c["argv"][1:2] + [a for a in c["argv"] if a == "--check-config"]) for c in calls(box)]
    result = sandbox_make(box, "train", "RUN=x", "VAL_FRACTION=0.2", env=dict(os.environ, FAKE_FAIL="--check-config"))
    assert result.returncode != 0 and stages() == ["pipeline.train --check-config"], (stages(), result.stderr)
    (box / "calls.jsonl").unlink()
    assert sandbox_make(box, "train", "RUN=x", "VAL_FRACTION=0.2").returncode == 0
    assert stages() == ["pipeline.train --check-config", "pipeline.prepare", "pipeline.train"], stages()
    assert calls(box)[0]["argv"][2:] == ["--run", "x", "--make-vars", "--check-config"]
    for args in (["train", "RUN=x"], ["prepare", "VAL_FRACTION=0.2"]):  # no split asked for, or no training
        (box / "calls.jsonl").unlink()
        sandbox_make(box, *args)
        assert "pipeline.train --check-config" not in stages(), (args, stages())
    (box / "calls.jsonl").unlink()  # from the environment: prepare splits with it, so train (asked, then
    assert sandbox_make(box, "train", "RUN=x", env=dict(os.environ, VAL_FRACTION="0.3")).returncode == 0  # training)
    trains = [c for c in calls(box) if c["argv"][1] == "pipeline.train"]  # reads it as a command-line one
    assert [c["argv"][-1] for c in trains] == ["--check-config", "--make-vars"]
    assert all("VAL_FRACTION=0.3" in make_overrides(c["env"]) for c in trains), [c["env"] for c in trains]


@pytest.mark.parametrize("variable", ["MESSAGE", "FOO", "EPOCHS", "PRESET", "RUN", "TTA", "GPU", "SEED", "VAL_FRACTION",
                                      "KAGGLE_KERNEL_ID"])
def test_make_code_in_a_value_is_never_run_by_make(tmp_path, variable):
    # make expanded command-line values where it read them and when it exported them to a recipe: a
    # `$(shell ...)` in any of them ran, even under `make help`
    box = sandbox(tmp_path)
    built(box)
    mark = tmp_path / "pwned"
    value = f"1$(shell touch {mark})"
    for args in (["help"], ["-n", "train", "prepare", "ensemble", "kernel", "submit"], ["submit", "RUN=x"]):
        sandbox_make(box, *args, f"{variable}={value}")
        assert not mark.exists(), args
    if variable not in ("PRESET", "RUN", "TTA", "GPU"):  # refused as names or switches; the others reach Python
        sandbox_make(box, "submit", "RUN=x", f"{variable}={value}")
        assert calls(box)[-1]["env"][f"PIPELINE_VAR_{variable}"] == value


@pytest.mark.parametrize("variable", ["RUN", "PRESET", "VAL_FRACTION", "VENV", "MESSAGE", "SOURCE", "EPOCHS", "MAX_TIME",
                                      "DEVICE", "SEED"])
def test_make_code_in_an_environment_variable_is_never_run_by_make(tmp_path, variable):
    # `RUN='$(shell ...)' make submit`: make expanded the variables it reads from the environment too
    box = sandbox(tmp_path)
    built(box)
    mark = tmp_path / "pwned"
    env = dict(os.environ, **{variable: f"1$(shell touch {mark})"})
    for args in (["help"], ["-n", "train", "prepare", "ensemble", "kernel", "submit"], ["submit", "RUN=x"]):
        sandbox_make(box, *args, env=env)
        assert not mark.exists(), args


@pytest.mark.parametrize("variable", ["SHELL", ".SHELLFLAGS"])
@pytest.mark.parametrize("where", ["command line", "environment"])
def test_makes_own_shell_settings_are_refused_before_anything_runs(tmp_path, variable, where):
    # `make help '.SHELLFLAGS=-c touch x;'` ran its command in every $(shell ...) and recipe
    box = sandbox(tmp_path)
    built(box)
    mark = tmp_path / "pwned"
    value = f"-c touch {mark};" if variable == ".SHELLFLAGS" else str(box / "evil.sh")
    (box / "evil.sh").write_text(f"#!/bin/sh\ntouch {mark}\n")
    (box / "evil.sh").chmod(0o755)
    for goal in ("help", "submit"):
        if where == "command line":
            result = sandbox_make(box, goal, "RUN=x", f"{variable}={value}")
        else:
            result = sandbox_make(box, goal, "RUN=x", env=dict(os.environ, **{variable: value}))
        if where == "environment" and variable == "SHELL":  # make never takes SHELL from the environment
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
            assert "make's own shell setting" in result.stderr and calls(box) == []
    assert not mark.exists()
    if variable == "SHELL":  # another bash, where /bin/bash is missing, by its absolute path
        bash = os.path.realpath(shutil.which("bash"))
        assert sandbox_make(box, "help", f"SHELL={bash}").returncode == 0
        code = f"$(file >{mark},x){bash}"  # never expanded by the check
        assert sandbox_make(box, "help", f"SHELL={code}").returncode != 0 and not mark.exists()


@pytest.mark.parametrize("value", ["x`touch {mark}`", "$$(touch {mark})", "my venv"])
@pytest.mark.parametrize("where", ["command line", "environment"])
def test_a_venv_path_that_bash_would_read_as_code_is_refused(tmp_path, value, where):
    # VENV reached every recipe unquoted (as $(PY)): bash ran a command substitution in it
    box = sandbox(tmp_path)
    built(box)
    mark = tmp_path / "pwned"
    value = value.format(mark=mark)
    if where == "command line":
        result = sandbox_make(box, "submit", "RUN=x", f"VENV={value}")
    else:
        result = sandbox_make(box, "submit", "RUN=x", env=dict(os.environ, VENV=value.replace("$$", "$")))
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "is not a folder name" in result.stderr, \
        result.stderr
    assert not mark.exists() and calls(box) == []


@pytest.mark.parametrize("target,switch", [("ensemble", "TTA=yes"), ("kernel", "GPU=true"), ("kernel", "CONTINUE=2"),
                                           ("submit", "UPLOAD=maybe")])
def test_a_switch_that_is_not_0_or_1_is_refused_not_read_as_0(tmp_path, target, switch):
    # `make kernel GPU=true` built a CPU session and `make ensemble TTA=yes` tried no shifts, without a word
    box = sandbox(tmp_path)
    built(box)
    result = sandbox_make(box, target, "RUN=x", switch)
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "is not a switch" in result.stderr and calls(box) == []
    assert sandbox_make(box, target, "RUN=x", switch.split("=")[0] + "=1").returncode == 0


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")
def test_clean_leaves_a_run_in_use_alone(tmp_path):
    # `make clean` while a training ran deleted its checkpoints (best.npz among them) under it
    box = sandbox(tmp_path)
    built(box)
    lock = box / "runs" / "x" / ".lock"
    lock.write_text("pid 1234 (train, since today)")
    with held_elsewhere(lock):
        result = sandbox_make(box, "clean")
        assert result.returncode != 0 and "runs/x is in use (pid 1234 (train" in result.stderr, result.stderr
        assert (box / "runs" / "x" / "summary.json").exists() and (box / "submissions" / "submission.csv").exists()
    assert sandbox_make(box, "clean").returncode == 0
    assert not (box / "runs" / "x").exists()


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")
def test_clean_holds_the_locks_until_everything_is_removed(tmp_path):
    # clean let go of each lock once it had checked it, then removed runs/*/: a stage that locked its run in
    # between lost it from under its process
    box = sandbox(tmp_path)
    built(box)
    (box / "runs" / "x" / ".lock").write_text("")
    (box / "data" / ".processed.lock").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    rm = bin_dir / "rm"  # what a stage locking now would find: each lock taken or free
    rm.write_text(f"#!/bin/bash\nfor l in runs/x/.lock data/.processed.lock; do flock -n \"$l\" true && echo \"$l free\" "
                  f">> {tmp_path / 'seen'} || echo \"$l held\" >> {tmp_path / 'seen'}; done\n"
                  f"cat runs/x/.lock >> {tmp_path / 'seen'}; echo >> {tmp_path / 'seen'}\n"
                  f"exec {shutil.which('rm')} \"$@\"\n")
    rm.chmod(0o755)
    result = sandbox_make(box, "clean", env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert result.returncode == 0, result.stderr
    seen = (tmp_path / "seen").read_text().splitlines()
    assert seen[:2] == ["runs/x/.lock held", "data/.processed.lock held"], seen
    assert "(make clean, since " in seen[2], seen  # a stage refused meanwhile names clean, not an old holder
    assert not (box / "runs" / "x").exists()


@pytest.mark.parametrize("variable", ["PROCESSED=data/my x", "PY=python3", "RAW=/", "RUNDIR=runs/a b", "KERNEL_BUILD=."])
def test_the_makefiles_own_names_are_refused_on_the_command_line(tmp_path, variable):
    # they were pasted into recipes as typed: `make clean PROCESSED='data/my x'` ran rm -rf on data/my and on x
    box = sandbox(tmp_path)
    built(box)
    (box / "data" / "my").mkdir(parents=True)
    for goal in ("clean", "train", "help"):
        result = sandbox_make(box, goal, variable)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert "keeps for itself" in result.stderr and calls(box) == []
    assert (box / "data" / "my").is_dir() and (box / "data" / "raw" / "train.csv").is_file()


def test_tta_given_to_submit_or_predict_reaches_predict(tmp_path):
    # `make submit RUN=night TTA=1` submitted the blend of the last `make ensemble`, shifts or not, unsaid
    box = sandbox(tmp_path)
    built(box)
    for args, expected in ((["submit"], None), (["submit", "TTA=1"], ["--tta", "1"]), (["predict", "TTA=0"], ["--tta", "0"]),
                           (["predict"], [])):
        (box / "calls.jsonl").unlink(missing_ok=True)
        assert sandbox_make(box, *args, "RUN=x").returncode == 0
        predicted = [c["argv"][2:] for c in calls(box) if c["argv"][1] == "pipeline.predict"]
        assert predicted == ([] if expected is None else [["--run", "x", *expected]]), (args, predicted)


def test_force_reaches_make_kernel_from_the_command_line_only(tmp_path):
    # an exported FORCE=1 (meant for something else) rebuilt over hand edits; FORCE=yes forced nothing, unsaid
    box = sandbox(tmp_path)
    for args, env, forced in ((["kernel"], {}, False), (["kernel", "FORCE=1"], {}, True),
                              (["kernel", "FORCE=0"], {}, False), (["kernel"], {"FORCE": "1"}, False)):
        (box / "calls.jsonl").unlink(missing_ok=True)
        assert sandbox_make(box, *args, env=dict(os.environ, **env)).returncode == 0
        (call,) = [c for c in calls(box) if c["argv"][1] == "pipeline.kernel"]
        assert ("--force" in call["argv"]) is forced, (args, env, call["argv"])
    result = sandbox_make(box, "kernel", "FORCE=yes")
    assert result.returncode != 0 and "FORCE='yes' is not a switch" in result.stderr
