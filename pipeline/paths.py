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
