"""The plan (fused layer classes chosen before build), fused == plain layers, the inference copy with its
BatchNorms folded, and names that do not see the fusion (checkpoints)."""
import numpy as np
import pytest

from pipeline.nn import ARCHITECTURES, build_model, select_device, softmax_cross_entropy, to_numpy
from pipeline.nn.fused import BatchNormReLU, ConvMaxPool2x2, ConvReLUMaxPool2x2, ReLUMaxPool
from pipeline.nn.errors import EngineError
from pipeline.nn.layers import BatchNorm, Conv2D, Dense, Layer
from pipeline.nn.parameterless import AvgPool2D, Dropout, Flatten, MaxPool2D, MaxPool2x2, ReLU
from pipeline.nn.spec import layer_from_spec
from pipeline.nn.model import resolve_arch
from pipeline.nn.plan import FUSIONS, plan
from tests import fakecupy

CONV_BN_RELU = [Conv2D, BatchNormReLU]
CONV_RELU_BN = [Conv2D, ReLU, BatchNorm]
HEAD = [Flatten, Dropout, Dense]
EXPECTED = {  # (NumPy, CuPy)
    "deotte": [*CONV_BN_RELU * 3, Dropout, *CONV_BN_RELU * 3, Dropout, *CONV_BN_RELU, *HEAD],
    "deotte_relu_bn": [*CONV_RELU_BN * 3, Dropout, *CONV_RELU_BN * 3, Dropout, *CONV_RELU_BN, *HEAD],
    "small_bn": [*[Conv2D, BatchNormReLU, MaxPool2x2] * 2, Flatten, Dense, ReLU, Dense],
    "lenet5": [ConvReLUMaxPool2x2, ConvReLUMaxPool2x2, Flatten, Dense, ReLU, Dense, ReLU, Dense],
    "seed_small": [ConvReLUMaxPool2x2, ConvReLUMaxPool2x2, Flatten, Dense, ReLU, Dense],
}
# the one difference on CuPy: no convpool (plan.py says why); ReLU then max pool is fused instead
ON_CUPY = {"lenet5": [Conv2D, ReLUMaxPool, Conv2D, ReLUMaxPool, Flatten, Dense, ReLU, Dense, ReLU, Dense],
           "seed_small": [Conv2D, ReLUMaxPool, Conv2D, ReLUMaxPool, Flatten, Dense, ReLU, Dense]}


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = fakecupy.install(monkeypatch)
    assert select_device("gpu") is fake
    return fake


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_the_plan_picks_the_fused_classes(arch, fake_cupy):
    spec, _ = resolve_arch(arch)
    assert [type(layer) for layer in plan(spec, np)] == EXPECTED[arch]
    assert [type(layer) for layer in plan(spec, fake_cupy)] == ON_CUPY.get(arch, EXPECTED[arch])
    model = build_model(arch, xp=fake_cupy)
    assert [type(layer) for layer in model.layers] == ON_CUPY.get(arch, EXPECTED[arch])
    # every spec entry is one part, in order, whatever the plan
    assert [part.kind for part in model.parts] == [layer_from_spec(s).kind for s in spec]
    assert [type(layer) for layer in plan(spec, np, fuse=False)] == [type(layer_from_spec(s)) for s in spec]
    assert [type(layer) for layer in plan(spec, np, fuse=True)] == EXPECTED[arch]


def test_memory_options_are_the_plans_choice(fake_cupy):
    """ReLUs in place where nothing else holds the memory; eval buffers reused except where the output
    reaches the caller (and not on the GPU)."""
    relu_bn = build_model("deotte_relu_bn")
    relus = [layer for layer in relu_bn.layers if type(layer) is ReLU]
    assert relus and all(r.inplace_forward and r.inplace_backward for r in relus)
    lenet = build_model("lenet5")
    assert [(r.inplace_forward, r.inplace_backward) for r in lenet.layers if type(r) is ReLU] == [(True, True)] * 2
    assert all(layer.reuse_eval_output for layer in lenet.layers[:2])
    spec = [{"type": "conv2d", "filters": 4, "kernel": 3}, {"type": "batchnorm"}, {"type": "relu"},
            {"type": "conv2d", "filters": 3, "kernel": 4}, {"type": "flatten"}]
    small = build_model(spec, input_shape=(6, 6, 1), num_classes=3)
    assert [type(layer) for layer in small.layers] == [Conv2D, BatchNormReLU, Conv2D, Flatten]
    assert [layer.reuse_eval_output for layer in small.layers] == [True, True, False, False]
    gpu = build_model(spec, input_shape=(6, 6, 1), num_classes=3, xp=fake_cupy)
    assert not any(layer.reuse_eval_output for layer in gpu.layers)


def test_plan_options_come_from_the_plan_only():
    with pytest.raises(ValueError, match="chosen by the plan"):
        build_model([{"type": "relu", "inplace_forward": True}, {"type": "flatten"}, {"type": "dense"}])
    with pytest.raises(ValueError, match="unknown fusions"):
        build_model("lenet5", fuse=("conv_bn",))


def test_a_maxpool_spec_of_2x2_windows_at_stride_2_is_maxpool2x2_and_any_other_maxpool2d(monkeypatch):
    """The 2x2 op is chosen once, by the spec's window and stride; ReLUMaxPool runs its pool part's own op."""
    from pipeline.nn import pool
    from pipeline.nn.spec import layer_from_spec

    ran = []
    for name in ("maxpool_forward", "maxpool2x2_forward"):
        monkeypatch.setattr(pool, name, lambda *a, _f=getattr(pool, name), _n=name, **k: ran.append(_n) or _f(*a, **k))

    assert type(layer_from_spec({"type": "maxpool", "size": 2})) is MaxPool2x2
    assert type(layer_from_spec({"type": "maxpool", "size": 2, "stride": 1})) is MaxPool2D
    assert type(layer_from_spec({"type": "maxpool", "size": 3, "stride": 2})) is MaxPool2D
    with pytest.raises(TypeError):  # its window is its name: no size to get wrong
        MaxPool2x2(3)
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3))
    for size, stride, kind in ((3, 2, MaxPool2D), (2, 2, MaxPool2x2)):
        spec = [{"type": "relu"}, {"type": "maxpool", "size": size, "stride": stride}]
        (fused,) = plan(spec, np, (7, 7, 3))
        assert type(fused) is ReLUMaxPool and type(fused.max_pool) is kind
        plain = plan(spec, np, (7, 7, 3), fuse=())
        want = plain[1].forward(plain[0].forward(x.copy(), True), True)
        ran.clear()
        np.testing.assert_array_equal(fused.forward(x.copy(), True), want)
        assert ran == ["maxpool2x2_forward" if kind is MaxPool2x2 else "maxpool_forward"]


def test_conv_then_pool_without_relu_and_odd_outputs():
    spec = [{"type": "conv2d", "filters": 2, "kernel": 3}, {"type": "maxpool", "size": 2},
            {"type": "flatten"}, {"type": "dense"}]
    even = build_model(spec, input_shape=(8, 8, 1), num_classes=3)
    assert type(even.layers[0]) is ConvMaxPool2x2  # its own class: no ReLU flag inside ConvReLUMaxPool2x2
    assert even.names[0] == "0-1.conv2d+maxpool"
    odd = build_model(spec, input_shape=(9, 9, 1), num_classes=3)  # 7x7 convolution output: not fusable
    assert [type(layer) for layer in odd.layers] == [Conv2D, MaxPool2x2, Flatten, Dense]
    assert odd.forward(np.ones((2, 9, 9, 1)), train=True).shape == (2, 3)
    # average pooling is its own class: never fused with the ReLU before it (they do not commute)
    spec = [{"type": "conv2d", "filters": 2, "kernel": 3, "stride": 2}, {"type": "relu"},
            {"type": "avgpool", "size": 2}, {"type": "flatten"}, {"type": "dense", "units": 3}]
    assert [type(layer) for layer in plan(spec, np, (9, 9, 1))] == [Conv2D, ReLU, AvgPool2D, Flatten, Dense]


MIXED = [  # every fusion and a few plain layers between them
    {"type": "conv2d", "filters": 3, "kernel": 3, "padding": "same"},
    {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "conv2d", "filters": 4, "kernel": 3, "padding": 1}, {"type": "relu"}, {"type": "maxpool", "size": 2},
    {"type": "conv2d", "filters": 5, "kernel": 2, "stride": 1}, {"type": "maxpool", "size": 2},
    {"type": "flatten"}, {"type": "dropout", "rate": 0.3}, {"type": "dense", "units": 6}, {"type": "batchnorm"},
    {"type": "relu"}, {"type": "dense", "units": 3},
]


def mixed_model(fuse, dtype=np.float64, seed=4):
    return build_model(MIXED, seed=seed, dtype=dtype, input_shape=(12, 12, 2), num_classes=3, fuse=fuse)


def passes(model, x, y):
    """(logits, dx, grads, BN statistics) after a training pass, then after an eval pass, each with backward."""
    results = []
    for train in (True, False):
        logits = model.forward(x, train=train)
        dx = model.backward(softmax_cross_entropy(logits, y)[1])
        results.append((logits, dx, {n: g.copy() for n, _, g in model.params()},
                        {k: v for k, v in model.state_dict().items() if "running" in k}))
    return results


@pytest.mark.parametrize("arch", ["mixed", "lenet5", "seed_small", "small_bn", "deotte", "deotte_relu_bn"])
def test_fused_model_equals_the_plain_layers(arch):
    """Logits, input gradient, every parameter gradient and the BN statistics, float64, ties at 0 and
    plateaus (equal maxima in whole windows) included. Dropout masks are the same (same seed, same order)."""
    rng = np.random.default_rng(6)
    shape = (3, 12, 12, 2) if arch == "mixed" else (3, 28, 28, 1)
    x = np.maximum(rng.standard_normal(shape), -0.2)
    x[0, :6, :6] = 0.5
    y = np.array([1, 2, 0])

    def model(fuse):
        return mixed_model(fuse) if arch == "mixed" else build_model(arch, seed=4, dtype=np.float64, fuse=fuse)

    fused, plain = model(tuple(FUSIONS)), model(())
    assert len(fused.layers) < len(plain.layers) or arch == "deotte_relu_bn"
    if arch == "mixed":
        assert [type(layer) for layer in fused.layers] == [Conv2D, BatchNormReLU, MaxPool2x2, ConvReLUMaxPool2x2,
                                                           ConvMaxPool2x2, Flatten, Dropout, Dense,
                                                           BatchNormReLU, Dense]
    for got, want in zip(passes(fused, x, y), passes(plain, x, y)):
        for a, b in zip(got[:2], want[:2]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        for k in want[2]:
            np.testing.assert_allclose(got[2][k], want[2][k], rtol=1e-11, atol=1e-14, err_msg=k)
        for k in want[3]:
            np.testing.assert_allclose(got[3][k], want[3][k], rtol=1e-12, atol=1e-14, err_msg=k)


def test_relu_after_max_pool_is_exact():
    """ReLU then max pool == max pool then ReLU bit for bit (no rounding in either), values and gradients."""
    rng = np.random.default_rng(13)
    x = np.maximum(rng.standard_normal((3, 28, 28, 1)), -0.2)
    x[0, :6, :6] = 0.5
    y = np.array([1, 2, 3])
    moved = build_model("lenet5", seed=4, dtype=np.float64, fuse=("relu_maxpool",))
    assert sum(type(layer) is ReLUMaxPool for layer in moved.layers) == 2
    for got, want in zip(passes(moved, x, y), passes(build_model("lenet5", seed=4, dtype=np.float64, fuse=()), x, y)):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        for k in want[2]:
            np.testing.assert_array_equal(got[2][k], want[2][k], err_msg=k)


def randomize_batchnorms(model, seed=12):
    rng = np.random.default_rng(seed)
    for part in model.parts:
        if part.kind == "batchnorm":
            c = part.params["gamma"].shape[0]
            part.params["gamma"][...] = rng.uniform(0.5, 1.5, c)
            part.params["beta"][...] = rng.uniform(-0.2, 0.3, c)
            part.buffers["running_mean"][...] = rng.uniform(-0.1, 0.2, c)
            part.buffers["running_var"][...] = rng.uniform(0.6, 1.4, c)


@pytest.mark.parametrize("arch", ["deotte", "small_bn", "deotte_relu_bn", "mixed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_for_inference_equals_eval_and_leaves_the_model_alone(arch, dtype):
    model = mixed_model(tuple(FUSIONS), dtype) if arch == "mixed" else build_model(arch, seed=2, dtype=dtype)
    randomize_batchnorms(model)
    shape = (5, 12, 12, 2) if arch == "mixed" else (5, 28, 28, 1)
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    y = np.arange(5) % 3
    logits = model.forward(x, train=True)
    model.backward(softmax_cross_entropy(logits, y)[1])  # caches and grads that must survive
    layers, caches = list(model.layers), [layer.cache for layer in model.layers]
    state, grads = model.state_dict(), {n: g.copy() for n, _, g in model.params()}

    inference = model.for_inference()
    got = inference.forward(x, train=False)
    assert inference.inference and inference.forward(x[:2], train=False).shape == (2, 3 if arch == "mixed" else 10)
    folded = sum(type(a) is Conv2D and b.parts[0].kind == "batchnorm" for a, b in zip(layers, layers[1:]))
    assert folded == {"deotte": 7, "small_bn": 2, "deotte_relu_bn": 0, "mixed": 1}[arch]
    assert sum(part.kind == "batchnorm" for layer in inference.layers for part in layer.parts) == \
        sum(part.kind == "batchnorm" for part in model.parts) - folded
    assert not set(map(id, inference.layers)) & set(map(id, model.layers))  # new objects, not flagged old ones
    # the training model: same layers, caches, arrays and gradients as before
    assert model.layers == layers and all(layer.cache is c for layer, c in zip(model.layers, caches))
    after = model.state_dict()
    assert all(np.array_equal(after[k], state[k]) for k in state)
    assert all(np.array_equal(g, grads[n]) for n, _, g in model.params())
    # ... and its own eval pass, unfolded, agrees; so does a backward after it, with no forward replayed
    want = model.forward(x, train=False)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(got, want, **tol)
    assert model.backward(softmax_cross_entropy(want, y)[1]).shape == x.shape
    with pytest.raises(RuntimeError, match="inference copy"):
        inference.forward(x, train=True)
    with pytest.raises(RuntimeError, match="inference copy"):
        inference.backward(got)
    with pytest.raises(RuntimeError, match="inference copy"):
        inference.state_dict()


def test_an_inference_copy_is_made_from_the_statistics_of_now():
    model = build_model("small_bn", seed=1)
    x = np.random.default_rng(4).random((6, 28, 28, 1), dtype=np.float32)
    before = model.for_inference().forward(x, train=False).copy()
    model.forward(x, train=True)  # the running statistics move
    now = model.for_inference().forward(x, train=False)
    assert not np.allclose(now, before)
    np.testing.assert_allclose(now, model.forward(x, train=False), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(model.predict_proba(x), to_numpy(softmax_of(now)), rtol=1e-6, atol=1e-7)


def test_an_inference_copy_is_a_snapshot_that_training_steps_do_not_reach():
    """Folded or not, every array of an inference copy is as of its creation (small_bn: two folded pairs,
    then plain MaxPool, Dense, ReLU, Dense layers)."""
    from pipeline.nn import make_optimizer

    model = build_model("small_bn", seed=1)
    x = np.random.default_rng(4).random((6, 28, 28, 1), dtype=np.float32)
    inference = model.for_inference()
    before = inference.forward(x, train=False).copy()
    opt = make_optimizer("adam")
    for _ in range(2):
        model.backward(softmax_cross_entropy(model.forward(x, train=True), np.arange(6))[1], input_grad=False)
        opt.step(model.params(), 1e-2)
    assert not np.allclose(model.for_inference().forward(x, train=False), before)  # the weights did move
    np.testing.assert_array_equal(inference.forward(x, train=False), before)
    shared = {id(a) for part in model.parts for a in (*part.params.values(), *part.buffers.values())}
    assert not shared & {id(a) for part in inference.parts for a in (*part.params.values(), *part.buffers.values())}


class ViewOfInput(Layer):
    """A newcomer's layer that returns a view of its input and says nothing of its memory (Layer's
    defaults): (H, W, C) -> (H*W*C,)."""

    kind = "view_of_input"

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, train):
        return x.reshape(len(x), -1)

    def backward(self, dout, need_dx=True):
        raise NotImplementedError


@pytest.mark.parametrize("before", [[], [{"type": "batchnorm"}]])
def test_an_unknown_layer_returning_a_view_keeps_eval_results_apart(monkeypatch, before):
    """The layer before an unlisted view-returning layer must not hand its reused eval buffer to the caller:
    a second eval pass would overwrite the first one's result."""
    from pipeline.nn import spec as spec_table

    monkeypatch.setitem(spec_table.LAYER_TYPES, "view_of_input", ViewOfInput)
    spec = [{"type": "conv2d", "filters": 10, "kernel": 3}, *before, {"type": "view_of_input"}]
    model = build_model(spec, input_shape=(3, 3, 1), num_classes=10)
    assert not any(layer.reuse_eval_output for layer in model.layers[-2:])
    rng = np.random.default_rng(0)
    x1, x2 = rng.random((4, 3, 3, 1), dtype=np.float32), rng.random((4, 3, 3, 1), dtype=np.float32)
    first = model.forward(x1, train=False)
    kept = first.copy()
    model.forward(x2, train=False)
    np.testing.assert_array_equal(first, kept)


def test_an_engine_error_in_a_layer_stays_one():
    """An EngineError raised while building a layer reaches the stage as an EngineError (one line)."""
    with pytest.raises(EngineError, match="layer 0.conv2d: unknown initializer 'nope'"):
        build_model([{"type": "conv2d", "filters": 2, "init": "nope"}, {"type": "flatten"}, {"type": "dense"}])
    with pytest.raises(ValueError, match="layer 0.conv2d") as plain:
        build_model([{"type": "conv2d", "filters": 2, "kernel": 40}, {"type": "flatten"}, {"type": "dense"}])
    assert not isinstance(plain.value, EngineError)


def softmax_of(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def plain_attributes(layer):
    """The layer's attributes that are not arrays, caches or scratch: what fixes its behaviour."""
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in vars(layer).items() if k != "cache" and (
        isinstance(v, plain) or isinstance(v, tuple) and all(isinstance(e, plain) for e in v))}


@pytest.mark.parametrize("arch", ["deotte", "lenet5", "small_bn", "deotte_relu_bn"])
def test_no_layer_attribute_is_set_from_outside(arch):
    """Every layer (and part) keeps the attributes its constructor gave it, through build, training and eval
    passes, predict, an inference copy and the BN statistics recomputed."""
    spec, _ = resolve_arch(arch)
    planned = plan(spec, np, dropout_rng=np.random.default_rng())
    constructed = [plain_attributes(p) | {"keys": set(vars(p))} for layer in planned for p in (layer, *layer.parts)]
    model = build_model(arch, seed=0)
    objects = [p for layer in model.layers for p in (layer, *layer.parts)]
    built = [plain_attributes(p) for p in objects]
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    model.backward(softmax_cross_entropy(model.forward(x, train=True), np.arange(4))[1], input_grad=False)
    model.forward(x, train=False)
    model.predict_proba(x)
    model.for_inference().forward(x, train=False)
    model.recompute_batchnorm_statistics(x)
    for p, fresh, after_build in zip(objects, constructed, built):
        assert set(vars(p)) == fresh.pop("keys"), p
        assert plain_attributes(p) == after_build, p
        assert {k: v for k, v in after_build.items() if k not in ("pad", "out_hw")} == \
            {k: v for k, v in fresh.items() if k not in ("pad", "out_hw")}, p


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_state_names_do_not_see_the_fusion(arch):
    """Checkpoints: the names are those of the spec indices, fused or not, and a state moves between the two."""
    fused, plain = build_model(arch, seed=0), build_model(arch, seed=1, fuse=())
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert [n for n, _, _ in fused.params()] == [n for n, _, _ in plain.params()]
    plain.load_state_dict(fused.state_dict())
    x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    np.testing.assert_allclose(plain.forward(x, train=False), fused.forward(x, train=False), rtol=1e-4, atol=1e-5)
    if arch == "lenet5":
        assert [n for n, _, _ in fused.params()] == ["0.w", "0.b", "3.w", "3.b", "7.w", "7.b", "9.w", "9.b",
                                                     "11.w", "11.b"]
    if arch == "deotte":
        assert list(fused.state_dict())[:6] == ["0.w", "1.gamma", "1.beta", "1.running_mean", "1.running_var",
                                                "3.w"]


def test_summary_lists_what_runs():
    text = build_model("lenet5").summary()
    assert "0-2.conv2d+relu+maxpool" in text and "ConvReLUMaxPool2x2" in text and "total parameters: 61706" in text
    assert "1-2.batchnorm+relu" in repr(build_model("deotte"))


def test_a_new_layer_type_needs_its_class_and_a_table_entry_only(monkeypatch):
    """The newcomer's path: an op pair, a layer class, a LAYER_TYPES entry (spec.py); the plan and the model
    need nothing (patterns match exact types, so the new layer is never fused by accident)."""
    from pipeline.nn import spec as spec_table

    class Square(Layer):  # its op pair, inline here: out = x * x, dx = 2 x dout
        kind = "square"

        def forward(self, x, train):
            self.cache = x
            return x * x

        def backward(self, dout, need_dx=True):
            return 2 * self.cache * dout

    monkeypatch.setitem(spec_table.LAYER_TYPES, "square", Square)
    spec = [{"type": "conv2d", "filters": 2, "kernel": 3}, {"type": "square"}, {"type": "maxpool", "size": 2},
            {"type": "flatten"}, {"type": "dense"}]
    model = build_model(spec, dtype=np.float64, input_shape=(6, 6, 1), num_classes=3)
    assert [type(layer) for layer in model.layers] == [Conv2D, Square, MaxPool2x2, Flatten, Dense]
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 1))
    assert model.backward(softmax_cross_entropy(model.forward(x, train=True), np.array([0, 2]))[1]).shape == x.shape
    assert model.names[1] == "1.square" and list(model.state_dict()) == ["0.w", "0.b", "4.w", "4.b"]


@pytest.mark.parametrize("train", [False, True])
def test_a_batch_in_another_memory_order_gives_the_same_logits(train):
    # ReLU and BatchNorm+ReLU write through reshaped views of their output: on a transposed (not C-ordered) batch
    # those were copies, and the layer returned uninitialised memory (logits near -3e32)
    spec = [{"type": "batchnorm"}, {"type": "relu"}, {"type": "flatten"}, {"type": "dense", "units": 10}]
    rng = np.random.default_rng(0)
    nchw = rng.standard_normal((4, 3, 6, 6)).astype(np.float32)
    x = nchw.transpose(0, 2, 3, 1)  # (N, H, W, C) as a view: not C-ordered
    assert not x.flags.c_contiguous
    a, b = (build_model(spec, input_shape=(6, 6, 3)) for _ in range(2))
    np.testing.assert_array_equal(a.forward(x, train=train), b.forward(np.ascontiguousarray(x), train=train))


def test_a_relu_overwrites_its_incoming_gradient_only_when_the_layer_that_made_it_says_it_is_fresh():
    # the rule asked whether *any* later layer returned fresh memory: a new layer returning memory it holds, with
    # a Dense after it, would have had that memory overwritten by the ReLU before it
    from pipeline.nn.plan import gradient_is_fresh

    class HoldsItsGradient(Layer):  # the defaults: nothing promised
        pass

    assert not gradient_is_fresh([HoldsItsGradient, Dense])
    assert gradient_is_fresh([Flatten, Dropout, ReLU, Dense])  # each passes the gradient from the Dense through
    assert not gradient_is_fresh([Flatten])  # the caller's loss gradient
    assert gradient_is_fresh([Dense, HoldsItsGradient])
