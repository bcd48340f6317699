"""Atomic file writes: a temp file beside the target, flushed, fsynced, then os.replace'd.

A stage that fails half-way leaves the previous output untouched and no partial file behind.
"""
import fcntl
import hashlib
import io
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.errors import UserError


@contextmanager
def held_lock(path, note, busy, shared=False, wait=False):
    """Hold an flock on `path` (created when absent) for the block, with `note` written into it for whoever
    finds it held. fcntl.flock: the kernel drops it when the holder dies, even by kill -9. Held elsewhere, it
    is a UserError of busy(the holder's note); with `wait`, busy(...) is printed and the lock waited for."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"{path}: cannot open the lock: {exc.strerror}") from None
    try:
        kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            message = busy(os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process")
            if not wait:
                raise UserError(message) from None
            print(message, file=sys.stderr, flush=True)
            fcntl.flock(fd, kind)
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)
        yield
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path, suffix=""):
    """Yield a temp path in the target's folder; on success it replaces `path`, on error it is removed."""
    with atomic_paths([path], suffix=suffix) as (tmp,):
        yield tmp


@contextmanager
def atomic_paths(paths, before_replace=None, suffix=""):
    """Temp paths for several files, yielded in the order of `paths`. On success every temp is flushed to disk
    first, then `before_replace()` runs, then each replaces its target in that order (the window in which a
    kill leaves some files new and some old is the renames alone); on error every temp is removed."""
    paths = [Path(p) for p in paths]
    temps = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
            os.close(fd)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
            temps.append(Path(tmp))
        yield list(temps)
        for tmp in temps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        if before_replace:
            before_replace()
        for path in paths:
            os.replace(temps[0], path)
            temps.pop(0)  # moved in: no longer a temp to remove on error
        for folder in {p.parent for p in paths}:
            _fsync_dir(folder)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def json_text(obj):
    """The JSON every output is written as (write_json): indented, keys sorted, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path, obj):
    write_text(path, json_text(obj))


def json_loads(text):
    """json.loads, where text nested too deeply for the parser (a RecursionError) is bad JSON like any other: a
    ValueError, which every reader of a damaged file turns into its one line."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json_object(path, advice):
    """The JSON object in `path` as a dict; a damaged file is one UserError ending with `advice`."""
    try:
        data = json_loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is damaged (not JSON): {advice}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged (not a JSON object): {advice}")
    return data


def save_npz(path, arrays: dict, compressed=False):
    """Save numpy arrays (no pickle) atomically."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    write_bytes(path, buf.getvalue())


def load_npz(path) -> dict:
    """Load an .npz written by save_npz into a plain dict (pickles refused)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def file_sha256(path):
    """sha256 hex digest of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
