"""The weight average (EMA) and the BatchNorm statistics recomputed for it."""
import numpy as np
import pytest

from pipeline.averaging import WeightAverage
from pipeline.nn import build_model


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


def bn_layers(model):
    return [part for part in model.parts if part.kind == "batchnorm"]


@pytest.mark.parametrize("arch", ["small_bn", "deotte_relu_bn"])
def test_recomputed_statistics_are_those_of_each_batchnorm_input_without_dropout(arch):
    model = build_model(arch, seed=1)
    x = images(24)
    state = model.get_rng_state()
    model.recompute_batchnorm_statistics(x, batch_size=7)
    first = bn_layers(model)[0].buffers["running_mean"].copy()  # population figures, whatever the batches
    model.recompute_batchnorm_statistics(x, batch_size=len(x))
    np.testing.assert_allclose(first, bn_layers(model)[0].buffers["running_mean"], rtol=1e-5, atol=1e-6)
    assert model.get_rng_state() == state  # no dropout mask was drawn
    # Reference: walk the plain layers (one per spec entry, unfused) in float64 with batch statistics,
    # recording each BatchNorm's input.
    h = x.astype(np.float64)
    for layer in model.parts:
        if layer.kind == "dropout":
            continue
        if layer.kind == "batchnorm":
            flat = h.reshape(-1, h.shape[-1])
            np.testing.assert_allclose(layer.buffers["running_mean"], flat.mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(layer.buffers["running_var"], flat.var(0, ddof=1), rtol=1e-3, atol=1e-5)
            # the next layers see their batch normalized as in training (here the whole set is one batch)
            h = (h - flat.mean(0)) / np.sqrt(flat.var(0) + layer.eps) * layer.params["gamma"] + layer.params["beta"]
            continue
        h = layer.forward(h.astype(np.float32), False).astype(np.float64)


def test_average_follows_the_warm_up_formula_and_round_trips():
    model = build_model("seed_small", seed=0)
    avg = WeightAverage(model, decay=0.99)
    w0 = avg.shadow["0.w"].copy()
    model.params()[0][1][...] += 1.0  # the live weight moves by 1
    avg.update(model)  # t = 0: d = min(0.99, 1/10) = 0.1
    np.testing.assert_allclose(avg.shadow["0.w"], w0 + 0.9, rtol=1e-6)
    avg.update(model)  # t = 1: d = 2/11; the gap 0.1 shrinks by (1 - d)
    np.testing.assert_allclose(avg.shadow["0.w"], w0 + 1 - 0.1 * 2 / 11, rtol=1e-6)
    other = WeightAverage(build_model("seed_small", seed=5), decay=0.99)
    other.load_state_dict(avg.state_dict())
    assert other.updates == 2 and all(np.array_equal(other.shadow[k], v) for k, v in avg.shadow.items())


def test_averaged_state_leaves_the_live_model_untouched():
    model = build_model("small_bn", seed=2)
    x = images(16, seed=3)
    model.forward(x, train=True)
    avg = WeightAverage(model, decay=0.9)
    for p in (p for _, p, _ in model.params()):
        p *= 1.5
    before = model.state_dict()
    averaged = avg.averaged_state(model, x)
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not np.array_equal(averaged["0.w"], before["0.w"])
    bn = bn_layers(model)[0]
    name = f"{model.parts.index(bn)}.running_mean"
    assert not np.array_equal(averaged[name], before[name])
