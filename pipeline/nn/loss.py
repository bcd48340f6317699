"""Softmax and softmax cross-entropy fused through a stable log-softmax.

Label smoothing follows PyTorch's definition: the target is (1 - s) * one_hot + s / K, K classes.
Shapes: logits (N, K), y int (N,).
"""
import numpy as np

from pipeline.nn.backend import get_array_module, to_numpy


def log_softmax(logits):
    """log p (N, K), stable: shifted by the row maximum before exp."""
    xp = get_array_module(logits)
    z = logits - logits.max(axis=1, keepdims=True)
    z -= xp.log(xp.exp(z).sum(axis=1, keepdims=True))
    return z


def softmax(logits):
    """Probabilities (N, K), rows sum to 1."""
    xp = get_array_module(logits)
    z = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(z)
    e /= e.sum(axis=1, keepdims=True)
    return e


def softmax_cross_entropy(logits, y, label_smoothing=0.0, as_float=True):
    """(loss, mean over the batch; dlogits (N, K) = (softmax - target) / N).

    y: N labels in [0, K), checked here, where they arrive (NumPy would take -1 as the last class and CuPy
    wraps any out-of-range label around): host labels at no cost, device labels at one host sync.
    as_float=False leaves the loss on the logits' backend (a 0-d CuPy array, a NumPy scalar), so that a GPU
    step need not wait for it (train.step_totals fetches it with the step's other numbers).
    """
    xp = get_array_module(logits)
    n, k = logits.shape
    check_labels(y, n, k)
    y = xp.asarray(y).astype(xp.int64, copy=False)
    logp = log_softmax(logits)
    rows = xp.arange(n)
    nll = -logp[rows, y]
    if label_smoothing:
        s = float(label_smoothing)
        per_row = (1.0 - s) * nll - (s / k) * logp.sum(axis=1)
    else:
        per_row = nll
    loss = per_row.sum() / n
    dlogits = xp.exp(logp)
    if label_smoothing:
        dlogits -= logits.dtype.type(s / k)
        dlogits[rows, y] -= logits.dtype.type(1.0 - s)
    else:
        dlogits[rows, y] -= logits.dtype.type(1.0)
    dlogits *= logits.dtype.type(1.0 / n)
    return (float(loss) if as_float else loss), dlogits


def check_labels(y, n, k):
    """ValueError unless y holds n integer labels in [0, k)."""
    xp = get_array_module(y)
    if xp is np:
        y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), got {tuple(y.shape)}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if n == 0:
        return
    low, high = (int(v) for v in to_numpy(xp.stack([y.min(), y.max()])))
    if low < 0 or high >= k:
        raise ValueError(f"labels must lie in [0, {k}) for {k} classes; got labels from {low} to {high}")


def softmax_cross_entropy_naive(logits, y, label_smoothing=0.0):
    """Reference: row by row from the textbook softmax and the smoothed one-hot target; (loss, dlogits)."""
    xp = get_array_module(logits)
    n, k = logits.shape
    loss, dlogits = 0.0, xp.zeros_like(logits)
    for i in range(n):
        e = xp.exp(logits[i] - logits[i].max())
        p = e / e.sum()
        target = xp.full(k, label_smoothing / k, dtype=logits.dtype)
        target[int(y[i])] += 1.0 - label_smoothing
        loss -= float((target * xp.log(p)).sum())
        dlogits[i] = (p - target) / n
    return loss / n, dlogits
