"""The Makefile stays in step with the code: every target dry-runs, is documented, and names real modules."""
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def make(*args):
    return subprocess.run(["make", "-C", str(REPO), "--no-print-directory", *args],
                          capture_output=True, text=True, timeout=60)


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


def test_command_line_overrides_reach_train():
    out = make("-n", "-W", "data/processed/meta.json", "train", "PRESET=quick", "EPOCHS=3", "RUN=myrun").stdout
    line = next(l for l in out.splitlines() if "pipeline.train" in l)
    assert "--preset quick" in line and "--run myrun" in line and "EPOCHS=3" in line


def test_resume_without_preset_keeps_the_runs_own():
    out = make("-n", "-W", "data/processed/meta.json", "train", "RUN=old").stdout
    line = next(l for l in out.splitlines() if "pipeline.train" in l)
    assert "--preset" not in line and "--run old" in line
