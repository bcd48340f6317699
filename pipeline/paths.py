"""Where everything lives, defined once. The root is the repository unless PIPELINE_ROOT says otherwise."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def root() -> Path:
    """Project root for data/, runs/ and submissions/ (PIPELINE_ROOT lets tests use a temp dir)."""
    return Path(os.environ.get("PIPELINE_ROOT", REPO))


def data_raw() -> Path:
    return root() / "data" / "raw"


def data_processed() -> Path:
    return root() / "data" / "processed"


def data_external() -> Path:
    return root() / "data" / "external"


def runs() -> Path:
    return root() / "runs"


def submissions() -> Path:
    return root() / "submissions"


def configs() -> Path:
    """Presets ship with the code, so they are found beside it, not under PIPELINE_ROOT."""
    return REPO / "configs"



def same_file(a, b) -> bool:
    """Whether two paths name one file however they are spelled (os.path.realpath: a symlink loop is no
    error here, where Path.resolve raised RuntimeError)."""
    return os.path.realpath(a) == os.path.realpath(b)


def check_out(out, records=()):
    """An --out given for a stage's result must not lie where the stages keep their own files (runs/, data/, the
    presets, the code) nor be one of `records` (the files beside the submission make reads): `--out
    runs/r1/model.npz` replaced a model with a CSV."""
    from pipeline.errors import UserError

    target = Path(os.path.realpath(out))
    owned = [Path(os.path.realpath(f())) for f in (runs, data_raw, data_processed, data_external, configs)]
    owned.append(Path(os.path.realpath(REPO / "pipeline")))
    if any(target == folder or folder in target.parents for folder in owned) or \
            any(same_file(out, record) for record in records):
        raise UserError(f"--out {out} is where the pipeline keeps its own files (runs/, data/, configs/, its "
                        f"records in submissions/): give another path, e.g. under submissions/")
    if os.path.exists(out) and not os.path.isfile(out):  # the file is written beside it and moved over it
        raise UserError(f"--out {out} is not a regular file (a folder, a device such as /dev/null, a pipe), and "
                        f"writing it would replace it: give a file's path, e.g. under submissions/")
