"""How a stage fails: one line on stderr and an exit code, never a traceback for what the user can fix."""
import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline.errors import UserError, cli_main
from pipeline.nn.errors import EngineError

REPO = Path(__file__).resolve().parent.parent


def stage(exc):
    @cli_main
    def main(argv=None):
        raise exc
    return main


@pytest.mark.parametrize("exc", [UserError("bad input\n  on two lines"), EngineError("unknown optimizer 'x'")])
def test_user_and_engine_errors_are_one_line_exit_2(exc, capsys):
    assert stage(exc)([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])  # EFBIG: past `ulimit -f`
def test_a_full_disk_is_one_line_and_a_bug_is_a_traceback(capsys, code):
    assert stage(OSError(code, os.strerror(code), "runs/x"))([]) == 2
    assert capsys.readouterr().err == f"error: runs/x: {os.strerror(code)}\n"
    with pytest.raises(ValueError):
        stage(ValueError("a bug of ours"))([])


def test_a_closed_pipe_is_not_an_error():
    # `python -m pipeline.score | head -1`: the reader leaves early; BrokenPipeError is an OSError whose errno is
    # not the environment's, so it must be caught before the OSError rule re-raises it
    code = "from pipeline.errors import cli_main\n@cli_main\ndef main(argv=None):\n    raise BrokenPipeError()\n" \
           "import sys; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_warnings_are_one_line_in_a_stage(capsys):
    @cli_main
    def main(argv=None):
        warnings.warn("skipping unfinished members 2")
    assert main([]) == 0
    assert capsys.readouterr().err == "warning: skipping unfinished members 2\n"


def test_stages_without_the_engine_do_not_load_it():
    r = subprocess.run([sys.executable, "-c", "import sys, pipeline.errors; print('pipeline.nn' in sys.modules)"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


def test_sigterm_mid_write_removes_the_temporary_file_and_keeps_the_old_output(tmp_path):
    # `kill PID` while a stage writes: the old output stays and no `.NAME.*.tmp` is left beside it
    out = tmp_path / "submission.csv"
    out.write_text("old\n")
    code = ("import sys, time\nfrom pathlib import Path\nfrom pipeline.errors import cli_main\n"
            "from pipeline.fileio import atomic_path\n@cli_main\ndef main(argv=None):\n"
            f"    with atomic_path(Path({str(out)!r})) as tmp:\n        tmp.write_text('half')\n"
            "        print('writing', flush=True)\n        time.sleep(60)\n"
            "sys.exit(main())\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline() == "writing\n"
    p.terminate()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143 and err == "terminated\n", err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["submission.csv"] and out.read_text() == "old\n"
