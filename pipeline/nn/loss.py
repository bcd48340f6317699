"""Softmax and softmax cross-entropy fused through a stable log-softmax.

Label smoothing follows PyTorch's definition: the target is (1 - s) * one_hot + s / K, K classes.
Shapes: logits (N, K), y int (N,).
"""
from pipeline.nn.backend import get_array_module


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


def softmax_cross_entropy(logits, y, label_smoothing=0.0):
    """(loss: float, mean over the batch; dlogits (N, K) = (softmax - target) / N)."""
    xp = get_array_module(logits)
    n, k = logits.shape
    y = xp.asarray(y).astype(xp.int64, copy=False)
    logp = log_softmax(logits)
    rows = xp.arange(n)
    nll = -logp[rows, y]
    if label_smoothing:
        s = float(label_smoothing)
        per_row = (1.0 - s) * nll - (s / k) * logp.sum(axis=1)
    else:
        per_row = nll
    loss = float(per_row.sum()) / n
    dlogits = xp.exp(logp)
    if label_smoothing:
        dlogits -= logits.dtype.type(s / k)
        dlogits[rows, y] -= logits.dtype.type(1.0 - s)
    else:
        dlogits[rows, y] -= logits.dtype.type(1.0)
    dlogits *= logits.dtype.type(1.0 / n)
    return loss, dlogits
