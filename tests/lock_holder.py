"""A lock held by another process, for tests of what a stage or a make target does beside its holder."""
import contextlib
import subprocess
import sys

HOLD = ("import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True); "
        "time.sleep(float(sys.argv[2]))")


@contextlib.contextmanager
def held_elsewhere(lock, seconds=60):
    """An exclusive flock on `lock`, held by a child process from the block's start for `seconds` (or until the
    block ends, when that comes first)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        yield holder
    finally:
        holder.kill()
        holder.wait()
