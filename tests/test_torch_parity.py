"""Our engine against PyTorch: same weights -> same logits, loss, gradients, BN statistics and optimizer steps.

The PyTorch twin comes from bench.bench.torch_twin (built from the same spec list; conv kernels permuted to
(Cout, Cin, kh, kw), the first dense after a Flatten gets its rows reordered from HWC to CHW).

Error measure, per tensor: max|ours - torch| / max|torch|. Tensors that are zero in exact arithmetic (the
gradient of a conv bias in front of a BatchNorm) have torch values of rounding size, where that ratio means
nothing: when max|torch| is below 1e-6 of the largest gradient in the model, the denominator is that largest
gradient instead, i.e. ours must be as close to zero as torch is.

Kinks: in float32 a pre-activation within rounding of 0 can land on opposite sides of a ReLU in the two
engines (deotte has ~400k ReLU inputs at batch 8 and a BatchNorm then spreads that one element's gradient
over its channel: a 1-4% gradient difference with both engines right). So in float32 training passes the
twin's ReLUs apply the masks our ReLUs used; float64 runs use torch's own ReLUs at a 1e-9 tolerance.
Dropout runs at the shipped rates with the same masks on both sides (our layer's forward replaced by one
applying a mask drawn here, its cache as dropout_forward's, so that dropout_backward runs as it is).
"""
import contextlib
import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (it is a dev requirement)")
F = torch.nn.functional

from bench import bench  # noqa: E402  (needs torch, so after the importorskip)
from pipeline.nn import (ARCHITECTURES, build_model, make_optimizer, softmax_cross_entropy,  # noqa: E402
                         to_numpy)

ARCHS = ["seed_small", "lenet5", "deotte"]
TOL = {np.float32: 1e-4, np.float64: 1e-9}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def rel_err(ours, theirs, scale=0.0):
    """max|ours - theirs| / max|theirs|, or / scale when max|theirs| is below 1e-6 * scale."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    denom = np.abs(theirs).max()
    if denom < 1e-6 * scale:
        denom = scale
    return float(np.abs(ours - theirs).max() / max(denom, 1e-300))


def without_dropout(spec):
    """A copy of the spec with every dropout rate 0: train mode becomes deterministic on both sides."""
    spec = copy.deepcopy(spec)
    for layer in spec:
        if layer["type"] == "dropout":
            layer["rate"] = 0.0
    return spec


def twins(spec, dtype, seed=0):
    """Our model with random biases, BN affine params and running stats (the init's 0/1 would hide bugs),
    and the PyTorch twin holding the same values."""
    model = build_model(spec, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    state = {k: to_numpy(v) for k, v in model.state_dict().items()}
    for name, value in state.items():
        if name.endswith((".gamma", ".running_var")):
            state[name] = rng.uniform(0.5, 1.5, value.shape).astype(value.dtype)
        elif not name.endswith(".w"):
            state[name] = (0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
    model.load_state_dict(state)
    net, links = bench.torch_twin(spec, dtype=TORCH_DTYPE[dtype])
    bench.load_into_torch(links, state)
    return model, net, links


def nhwc_mask_to_torch(mask, like):
    mask = np.asarray(mask)
    return torch.from_numpy(np.ascontiguousarray(mask.transpose(0, 3, 1, 2) if mask.ndim == 4 else mask)).to(like)


@contextlib.contextmanager
def shared_masks(model, net, relus, seed=7):
    """While active, our dropout layers use masks drawn here and the twin applies the same ones; with
    relus=True the twin's ReLUs apply the masks (pre-activation > 0) our ReLUs computed, except where our
    layer applies the ReLU after a max pool (ConvReLUMaxPool2x2, ReLUMaxPool)."""
    rng = np.random.default_rng(seed)
    masks, replaced, wrapped = {}, {}, []

    def apply_mask(k):
        return lambda module, inputs, out: out * nhwc_mask_to_torch(masks[k], out)

    end = 0
    for layer in model.layers:  # what runs: a ReLU may be the last part of a fused layer (BatchNormReLU)
        end += len(layer.parts)
        k, last = end - 1, layer.parts[-1]
        if last.kind == "dropout":
            def dropout_forward(x, train, layer=last, k=k):
                keep = rng.random(x.shape) >= layer.rate
                masks[k] = (keep / (1.0 - layer.rate)).astype(x.dtype)
                layer.cache = (keep, x.dtype.type(1.0 / (1.0 - layer.rate)))  # what dropout_backward reads
                return x * masks[k]
            layer.forward = dropout_forward
        elif last.kind == "relu" and relus:
            def relu_forward(x, train, k=k, original=layer.forward):
                out = original(x, train)
                masks[k] = to_numpy(out) > 0  # the ReLU's output is positive where its input was
                return out
            layer.forward = relu_forward
        else:
            continue
        wrapped.append(layer)
        replaced[k] = net[k]
        net[k] = torch.nn.Identity()
        net[k].register_forward_hook(apply_mask(k))
    try:
        yield
    finally:
        for k, module in replaced.items():
            net[k] = module
        for layer in wrapped:
            del layer.forward


def batch(n, dtype, seed=1):
    x, y = bench.random_batch(n, seed)
    return x.astype(dtype), y


def ours_train_pass(model, x, y):
    logits = model.forward(x, train=True)
    loss, dlogits = softmax_cross_entropy(logits, y)
    model.backward(dlogits)
    grads = {name: to_numpy(g) for name, _, g in model.params()}
    return to_numpy(logits), float(loss), grads


def torch_train_pass(net, links, x, y):
    net.train()
    net.zero_grad(set_to_none=True)
    logits = net(bench.nhwc_to_torch(x))
    loss = F.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    return logits.detach().numpy(), float(loss.detach()), bench.torch_grads(links)


def assert_close(ours, theirs, tol, what, scale=0.0):
    err = rel_err(ours, theirs, scale)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_and_eval_match_torch(arch, dtype):
    model, net, links = twins(ARCHITECTURES[arch], dtype)
    x, y = batch(8, dtype)
    tol = TOL[dtype]

    with shared_masks(model, net, relus=dtype == np.float32):
        logits, loss, grads = ours_train_pass(model, x, y)
        t_logits, t_loss, t_grads = torch_train_pass(net, links, x, y)
    assert_close(logits, t_logits, tol, "train logits")
    assert abs(loss - t_loss) / abs(t_loss) < tol, (loss, t_loss)
    assert sorted(grads) == sorted(t_grads)
    scale = max(np.abs(g).max() for g in t_grads.values())
    for name in grads:
        assert_close(grads[name], t_grads[name], tol, f"grad {name}", scale)

    # One plain SGD step on each side, then params and BN running stats (updated by the train forward) agree.
    lr = 0.05
    make_optimizer("sgd", momentum=0.0).step(model.params(), lr)
    torch.optim.SGD(net.parameters(), lr=lr).step()
    ours_state = {k: to_numpy(v) for k, v in model.state_dict().items()}
    t_state = bench.torch_state(links)
    assert sorted(ours_state) == sorted(t_state)
    for name in ours_state:
        assert_close(ours_state[name], t_state[name], tol, f"state {name} after a step")

    # Eval mode (running statistics) on a fresh batch.
    x2, _ = batch(8, dtype, seed=2)
    net.eval()
    with torch.no_grad():
        t_eval = net(bench.nhwc_to_torch(x2)).numpy()
    assert_close(to_numpy(model.forward(x2, train=False)), t_eval, tol, "eval logits")


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_with_dropout_in_spec_matches_torch(arch):
    """The real spec (dropout rates as shipped): eval mode must ignore dropout on both sides."""
    model, net, links = twins(ARCHITECTURES[arch], np.float32)
    x, _ = batch(8, np.float32)
    net.eval()
    with torch.no_grad():
        t_logits = net(bench.nhwc_to_torch(x)).numpy()
    assert_close(to_numpy(model.forward(x, train=False)), t_logits, TOL[np.float32], "eval logits")


# Each case: our make_optimizer kwargs, torch optimizer class and kwargs, torch kwargs for the kernel group
# ("*.w") only, and the learning rate of each step (changing, so the lr passed to step() must be the one used).
SGD_LRS = [0.1, 0.05, 0.02]
ADAM_LRS = [1e-2, 5e-3, 2e-3]
OPTIMIZER_CASES = {
    "sgd_momentum": (dict(name="sgd", momentum=0.9), torch.optim.SGD, dict(momentum=0.9), {}, SGD_LRS),
    "sgd_nesterov": (dict(name="sgd", momentum=0.9, nesterov=True), torch.optim.SGD,
                     dict(momentum=0.9, nesterov=True), {}, SGD_LRS),
    "sgd_l2": (dict(name="sgd", momentum=0.9, l2=0.01), torch.optim.SGD, dict(momentum=0.9),
               dict(weight_decay=0.01), SGD_LRS),
    "adam": (dict(name="adam", betas=(0.8, 0.95), eps=1e-6), torch.optim.Adam,
             dict(betas=(0.8, 0.95), eps=1e-6), {}, ADAM_LRS),
    "adam_l2": (dict(name="adam", l2=0.01), torch.optim.Adam, {}, dict(weight_decay=0.01), ADAM_LRS),
    "adamw": (dict(name="adamw", weight_decay=0.1), torch.optim.AdamW, dict(weight_decay=0.0),
              dict(weight_decay=0.1), ADAM_LRS),
}


# lenet5 runs every case; deotte (BatchNorm, 4x the time) the two that differ most.
OPTIMIZER_RUNS = [("lenet5", case) for case in sorted(OPTIMIZER_CASES)] + [("deotte", "sgd_nesterov"),
                                                                           ("deotte", "adamw")]


@pytest.mark.parametrize("arch, case", OPTIMIZER_RUNS)
def test_optimizer_steps_match_torch(arch, case):
    """Three steps on the same data, float64 so formula differences (eps placement, bias correction,
    decay on kernels only) stand far above rounding. Compares each step's parameter displacement.

    Conv biases in front of a BatchNorm have gradients of rounding size (zero in exact arithmetic) which
    Adam divides by sqrt(v) + eps, i.e. multiplies by up to 1/eps: for those only, the bound is 1e-6 of
    the largest displacement in the model (they must stay put on both sides)."""
    ours_kwargs, torch_cls, torch_kwargs, kernel_kwargs, lrs = OPTIMIZER_CASES[case]
    model, net, links = twins(without_dropout(ARCHITECTURES[arch]), np.float64)
    kwargs = dict(ours_kwargs)
    opt = make_optimizer(kwargs.pop("name"), **kwargs)
    named = bench.torch_params(links)
    kernels = [p for name, p in named if name.endswith(".w")]
    others = [p for name, p in named if not name.endswith(".w")]
    t_opt = torch_cls([{"params": kernels, **kernel_kwargs}, {"params": others}], lr=lrs[0], **torch_kwargs)
    x, y = batch(8, np.float64)

    before = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    for step, lr in enumerate(lrs, 1):
        ours_train_pass(model, x, y)
        opt.step(model.params(), lr)
        _, _, t_grads = torch_train_pass(net, links, x, y)
        if step == 1:
            grad_scale = max(np.abs(g).max() for g in t_grads.values())
            null = {name for name, g in t_grads.items() if np.abs(g).max() < 1e-6 * grad_scale}
        for group in t_opt.param_groups:
            group["lr"] = lr
        t_opt.step()
        ours_state = {k: to_numpy(v) for k, v in model.state_dict().items()}
        t_state = bench.torch_state(links)
        names = [name for name, _, _ in model.params()]
        moved = {name: ours_state[name] - before[name] for name in names}
        t_moved = {name: t_state[name] - before[name] for name in names}
        scale = max(np.abs(m).max() for m in t_moved.values())
        for name in names:
            assert_close(moved[name], t_moved[name], 1e-6 if name in null else 1e-8,
                         f"{case} step {step}: displacement of {name}", scale)


def test_twin_layouts_round_trip():
    """to_our_layout inverts to_torch_layout (conv, plain dense and dense after a spatial flatten)."""
    rng = np.random.default_rng(0)
    links = [({"kind": "conv", "flat_hwc": None}, rng.standard_normal((5, 3, 2, 4))),
             ({"kind": "dense", "flat_hwc": None}, rng.standard_normal((6, 3))),
             ({"kind": "dense", "flat_hwc": (2, 3, 4)}, rng.standard_normal((24, 5)))]
    for link, w in links:
        np.testing.assert_array_equal(bench.to_our_layout(link, "w", bench.to_torch_layout(link, "w", w)), w)
    # HWC row (h=1, w=2, c=3) is CHW column 3*6 + 1*3 + 2 of torch's (out, in) weight.
    link, w = links[2]
    np.testing.assert_array_equal(bench.to_torch_layout(link, "w", w)[:, 3 * 6 + 1 * 3 + 2], w[1 * 12 + 2 * 4 + 3])


def test_keras_same_pads():
    assert bench.keras_same_pads(24, 5, 2) == (1, 2)
    assert bench.keras_same_pads(28, 3, 1) == (1, 1)
    assert bench.keras_same_pads(28, 1, 2) == (0, 0)


SUMMARY = re.compile(r"^bench: deotte train x\d+\.\d\d infer x\d+\.\d\d \| lenet5 train x\d+\.\d\d infer x\d+\.\d\d$")


def test_bench_helpers_smoke():
    """The bench's measuring path on lenet5 at batch 8, one repeat; and the summary line's format."""
    result = bench.measure_arch("lenet5", batch=8, infer_batch=8, repeats=1, batches=1, warmup=0)
    for mode in ("train", "infer"):
        for engine in ("ours", "torch"):
            assert np.isfinite(result[mode][engine]) and result[mode][engine] > 0
    line = bench.summary_line({"deotte": result, "lenet5": result})
    assert SUMMARY.match(line), line
    assert not SUMMARY.match(line.replace(" | ", " "))


def test_memory_child_reports_peak_rss():
    mem = bench.peak_rss_child("ours", "lenet5", "infer", 8)
    assert 0 < mem["baseline_mib"] <= mem["peak_mib"]


def test_bench_main_quick_last_line(capsys):
    """`python -m bench.bench --quick` end to end at tiny sizes: the last stdout line is the summary."""
    assert bench.main(["--quick", "--repeats", "1", "--batch", "8", "--infer-batch", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert SUMMARY.match(lines[-1]), lines[-1]
    assert lines[-2].startswith("torch defaults: deotte train ") and "no OMP_WAIT_POLICY" in lines[-2], lines[-2]
    assert any("blas" in line for line in lines)
