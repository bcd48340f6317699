"""Training checkpoints: one .npz per checkpoint holding everything needed to continue bit-exactly.

Keys: "model/<name>" (parameters and BatchNorm statistics), "opt/<name>" (optimizer state), "rng/<name>"
(dropout generator), "average/<name>" (the weight average, when the run keeps one), "state" (JSON: epoch, step, best score, metrics history, config) and "checksum"
(sha256 over every other entry). No pickle. Written to a temp file, fsynced and os.replace'd
(pipeline.fileio). The folder keeps latest.npz, previous.npz (the latest before it) and best.npz.
"""
import hashlib
import json
import os
import warnings

import numpy as np

from pipeline.fileio import json_loads, load_npz, save_npz

LATEST, PREVIOUS, BEST = "latest.npz", "previous.npz", "best.npz"


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read or whose checksum does not match."""


def _checksum(arrays):
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def pack(model_state, opt_state, rng_state, state, average_state=None):
    """Flatten the parts of a training state into one dict of arrays (with its checksum)."""
    arrays = {f"model/{k}": v for k, v in model_state.items()}
    arrays.update({f"average/{k}": v for k, v in (average_state or {}).items()})
    arrays.update({f"opt/{k}": v for k, v in opt_state.items()})
    arrays.update({f"rng/{k}": v for k, v in rng_state.items()})
    arrays["state"] = np.array(json.dumps(state, sort_keys=True))
    arrays["checksum"] = np.array(_checksum(arrays))
    return arrays


def unpack(arrays):
    """Inverse of pack: (model_state, opt_state, rng_state, state)."""
    parts = {"model": {}, "opt": {}, "rng": {}}
    for key, value in arrays.items():
        head, _, name = key.partition("/")
        if head in parts:
            parts[head][name] = value
    return parts["model"], parts["opt"], parts["rng"], json_loads(str(arrays["state"]))


def average_part(arrays):
    """The weight average packed beside the training state ({} when the run keeps none)."""
    return {key.partition("/")[2]: value for key, value in arrays.items() if key.startswith("average/")}


def read(path):
    """Load and verify one checkpoint file; CorruptCheckpoint if unreadable or its checksum differs."""
    try:
        arrays = load_npz(path)
    except Exception as exc:  # a truncated zip raises BadZipFile, EOFError, ValueError, ...
        raise CorruptCheckpoint(f"{path}: unreadable ({type(exc).__name__})") from None
    stored = arrays.pop("checksum", None)
    if stored is None or str(stored) != _checksum(arrays):
        raise CorruptCheckpoint(f"{path}: checksum mismatch")
    try:
        state = json_loads(str(arrays.get("state")))
    except ValueError:
        state = None
    if not isinstance(state, dict):  # a file rewritten by hand, its checksum with it
        raise CorruptCheckpoint(f"{path}: its training state is not a JSON object")
    return arrays


def restamp_best(folder, config):
    """Rewrite best.npz as made with `config`, when FORCE=1 adopted a changed one: the best epoch so far stays
    the run's best, where load_delivered would refuse it as another config's. A damaged one is left as it is."""
    path = folder / BEST
    if not path.exists():
        return
    try:
        arrays = read(path)
    except CorruptCheckpoint:
        return  # load_delivered says so, and delivers the last epoch
    state = json_loads(str(arrays["state"]))
    arrays["state"] = np.array(json.dumps({**state, "config": config}, sort_keys=True))
    arrays["checksum"] = np.array(_checksum(arrays))
    save_npz(path, arrays)


def write_latest(folder, arrays):
    """Make `arrays` the latest checkpoint; the old latest becomes previous."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".incoming.npz"
    save_npz(tmp, arrays)  # atomic by itself; the rename chain below keeps one valid file at every instant
    latest = folder / LATEST
    if latest.exists():
        os.replace(latest, folder / PREVIOUS)
    os.replace(tmp, latest)


def write_best(folder, arrays):
    save_npz(folder / BEST, arrays)


def load_newest(folder):
    """The newest valid checkpoint's arrays, falling back from latest to previous with a warning; None if none."""
    # A complete .incoming.npz is newer than latest (a kill fell between its write and its rename).
    for name in (".incoming.npz", LATEST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            return read(path)
        except CorruptCheckpoint as exc:
            stat = path.stat()
            seen = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
            if seen not in _REPORTED:  # a stage reads the newest checkpoint more than once: say it once
                _REPORTED.add(seen)
                warnings.warn(f"{exc}; trying an older checkpoint", stacklevel=2)
    return None


_REPORTED = set()  # damaged checkpoint files already reported in this process
