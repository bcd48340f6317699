"""Per-layer timing of one training step: where forward and backward time goes."""
import time

import numpy as np

from pipeline.nn.backend import get_array_module
from pipeline.nn.loss import softmax_cross_entropy


def _synchronize(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


def profile_layers(model, x, y, repeats=5, warmup=1, clock=time.perf_counter):
    """[{layer, forward_ms, backward_ms}] per layer that runs (model.names: a fused layer is one row), plus a
    final {"layer": "loss", ...} row.

    Times are the median over `repeats` training steps (forward train=True, loss, backward without the
    input gradient, as training does) after `warmup` untimed steps. x, y on the model's backend.
    clock: wall time by default; time.process_time gives CPU time, steadier on a shared machine when
    the math libraries run one thread.
    """
    xp = get_array_module(x)
    n_layers = len(model.layers)
    fwd = np.zeros((repeats, n_layers))
    bwd = np.zeros((repeats, n_layers))
    loss_ms = np.zeros(repeats)
    rng_state = model.get_rng_state()
    state = model.state_dict()  # training forwards move BatchNorm's running statistics: put back after
    for r in range(-warmup, repeats):
        h = x
        for i, layer in enumerate(model.layers):
            _synchronize(xp)
            t0 = clock()
            h = layer.forward(h, True)
            _synchronize(xp)
            if r >= 0:
                fwd[r, i] = clock() - t0
        t0 = clock()
        _, d = softmax_cross_entropy(h, y)
        _synchronize(xp)
        if r >= 0:
            loss_ms[r] = clock() - t0
        first = model.first_layer_with_params()
        for i in range(n_layers - 1, first - 1, -1):
            layer = model.layers[i]
            _synchronize(xp)
            t0 = clock()
            d = layer.backward(d, need_dx=i > first)
            _synchronize(xp)
            if r >= 0:
                bwd[r, i] = clock() - t0
    model.set_rng_state(rng_state)  # profiling must not shift the dropout stream of a run
    model.load_state_dict(state)  # nor its BatchNorm statistics
    rows = [{"layer": name, "forward_ms": 1e3 * float(np.median(fwd[:, i])),
             "backward_ms": 1e3 * float(np.median(bwd[:, i]))} for i, name in enumerate(model.names)]
    rows.append({"layer": "loss", "forward_ms": 1e3 * float(np.median(loss_ms)), "backward_ms": 0.0})
    return rows


def format_profile(rows):
    """A plain-text table of profile_layers' rows with totals."""
    lines = [f"{'layer':<26}{'forward ms':>12}{'backward ms':>13}"]
    for row in rows:
        lines.append(f"{row['layer']:<26}{row['forward_ms']:>12.2f}{row['backward_ms']:>13.2f}")
    f = sum(r["forward_ms"] for r in rows)
    b = sum(r["backward_ms"] for r in rows)
    lines.append(f"{'total':<26}{f:>12.2f}{b:>13.2f}")
    return "\n".join(lines)
