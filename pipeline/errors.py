"""User-facing failures: one line on stderr, exit code 2, no traceback."""
import argparse
import functools
import sys


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
            code = fn(argv)
        except UserError as exc:
            msg = " ".join(str(exc).split())  # one line, whatever the message held
            print(f"error: {msg}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `... | head` closed the pipe: not an error of ours
            sys.stderr.close()
            return 0
        return 0 if code is None else code

    return wrapper
