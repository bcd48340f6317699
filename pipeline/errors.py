"""User-facing failures: one line on stderr, exit code 2, no traceback."""
import argparse
import contextlib
import errno
import functools
import signal
import sys
import threading
import warnings


# Failures of the machine, not of our code: said in one line like a UserError. EISDIR, ENOTDIR and EEXIST: a
# folder stands where an output goes (submissions/submission.csv made a directory), or a file where a folder
# does (submissions itself a file: mkdir says EEXIST); ENAMETOOLONG: an --out name past the file system's limit;
# ELOOP: a symlink loop where a file is read or written; EFBIG: a file past the size limit (`ulimit -f`).
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE,
                      errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG}


class UserError(Exception):
    """Something the user can fix (bad input, missing file, bad option): shown as one line."""


class StageArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are UserErrors too: one line and exit 2, like every other bad input."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def said_in_one_line(exc):
    """A UserError, or the engine's EngineError (the engine keeps its own; it is looked up only once the
    engine was imported, so that stages without it do not load it)."""
    engine = sys.modules.get("pipeline.nn.errors")
    return isinstance(exc, UserError) or (engine is not None and isinstance(exc, engine.EngineError))


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop), raised like Ctrl-C so that `finally` blocks and context managers
    run: a half-written output's temporary file is removed instead of left beside the output."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_exception():
    """Within it, SIGTERM raises Terminated, where the default would end the process on the spot. Only where
    Python may install handlers (the main thread) and nobody else has (train's own StopSignal nests inside)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cli_main(fn):
    """Wrap a stage's main(): UserError or EngineError -> 'error: ...' and exit 2; Ctrl-C -> exit 130;
    SIGTERM -> exit 143, after the same clean-up."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            with one_line_warnings(), sigterm_as_exception():
                code = fn(argv)
        except MemoryError:
            print("error: out of memory (is an input far larger than the competition's?)", file=sys.stderr)
            return 2
        except BrokenPipeError:  # `... | head` closed the pipe: not an error of ours (before OSError, its base)
            sys.stderr.close()
            return 0
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise
            target = exc.filename2 or exc.filename  # os.replace(temp, output): the output is the one to name
            where = f"{target}: " if target else ""
            print(f"error: {where}{exc.strerror}", file=sys.stderr)
            return 2
        except Terminated:
            print("terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 (re-raised unless it is meant for the user)
            if not said_in_one_line(exc):
                raise
            msg = " ".join(str(exc).split())  # one line, whatever the message held
            print(f"error: {msg}", file=sys.stderr)
            return 2
        return 0 if code is None else code

    return wrapper


@contextlib.contextmanager
def one_line_warnings():
    """Within it (or a function it decorates), warnings are shown as 'warning: ...' lines on stderr."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        yield


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings of a stage as one line on stderr ("warning: ..."), without Python's source line."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
