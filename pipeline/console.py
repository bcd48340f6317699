"""Where the stages speak: a terminal (the repository's `make` targets) or the Kaggle notebook (its cells).

The notebook calls use_notebook() once; nothing else switches. It is an environment variable so that it
survives the notebook re-importing the pipeline, and it holds for every stage the notebook's process runs.
"""
import math
import os
import sys

NOTEBOOK_VARIABLE = "PIPELINE_NOTEBOOK"

# How train's line for a run stopped by MAX_TIME begins; `make kernel-output` looks for it in a kernel's log.
MAX_TIME_REACHED = "MAX_TIME reached"

# The next step a message tells of: (the repository's words, the notebook's words); {run} is the run's name.
NEXT_STEPS = {
    "continue": ("`make train RUN={run}` continues",
                 "running the Train cell again continues (so does a later version with this version's output "
                 "added as an input)"),
    "blend": ("`make ensemble RUN={run}` blends them", "the Select cell blends them"),
    "upload": ("upload skipped (--upload 0)",
               "to score it, submit it from the saved version's Output (Submit to competition)"),
    "restart": ("use another RUN=, or FORCE=1 to continue with the new one",
                "change the settings cell back, or delete runs/{run} under PIPELINE_ROOT to start it afresh"),
}


def finite(value):
    """value as a float when it is a finite number (as a hand-edited JSON record may not be: a string, NaN, an
    integer too large for a float), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def use_notebook():
    """From now on: the notebook's words in messages, tqdm.auto progress bars (widgets when Jupyter has them)."""
    os.environ[NOTEBOOK_VARIABLE] = "1"


def in_notebook():
    return os.environ.get(NOTEBOOK_VARIABLE) == "1"


def next_step(action, **fields):
    """The words for `action` (a key of NEXT_STEPS) where we run, filled with `fields` (run=...)."""
    repository, notebook = NEXT_STEPS[action]
    return (notebook if in_notebook() else repository).format(**fields)


def progress_bar(total, desc, leave, unit="batch"):
    """A tqdm bar in the notebook or on a terminal; a disabled one when output goes to a log (one line per epoch)."""
    if in_notebook():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=leave, unit=unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=leave, unit=unit, dynamic_ncols=True, disable=not sys.stderr.isatty())
