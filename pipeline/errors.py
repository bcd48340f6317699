"""User-facing failures: one line on stderr, exit code 2, no traceback."""
import argparse
import errno
import functools
import sys
import warnings

from pipeline.nn.errors import EngineError

# Failures of the machine, not of our code: said in one line like a UserError.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE}


class UserError(Exception):
    """Something the user can fix (bad input, missing file, bad option): shown as one line."""


class StageArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes are UserErrors too: one line and exit 2, like every other bad input."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def cli_main(fn):
    """Wrap a stage's main(): UserError -> 'error: ...' and exit 2; Ctrl-C -> exit 130."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                code = fn(argv)
        except (UserError, EngineError) as exc:  # the engine's refusals are said the same way
            msg = " ".join(str(exc).split())  # one line, whatever the message held
            print(f"error: {msg}", file=sys.stderr)
            return 2
        except MemoryError:
            print("error: out of memory (is an input far larger than the competition's?)", file=sys.stderr)
            return 2
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `... | head` closed the pipe: not an error of ours
            sys.stderr.close()
            return 0
        return 0 if code is None else code

    return wrapper


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings of a stage as one line on stderr ("warning: ..."), without Python's source line."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
