"""The same ops on the GPU backend and on NumPy agree.

Every test runs against tests/fakecupy.py, a NumPy-backed stand-in as strict as CuPy about what crosses
between host and device, on every run; and against CuPy itself where CuPy and a CUDA device exist.

What the fake cannot catch (only a real GPU run can):
- asynchrony: its kernels finish before they return, so a race between streams, or host memory changed
  while a copy is still in flight, passes here;
- out-of-bounds wrapping: it indexes as NumPy does, raising IndexError where CuPy silently wraps an
  out-of-range integer index around, so code that counts on that IndexError passes here;
- kernel compilation: nothing is compiled (NVRTC, cuBLAS, cuDNN are never loaded); `make(broken=...)`
  only imitates such a failure;
- numerics: it computes with NumPy, so GPU rounding, summation order, TF32 and atomics are not seen;
- memory: it counts the bytes of live device arrays, but not CuPy's memory pool, fragmentation or a
  device's capacity;
- speed: its timings are NumPy's.
"""
import sys

import numpy as np
import pytest

from pipeline.nn import backend, build_model, conv, make_optimizer, norm, pool, softmax_cross_entropy, to_numpy
from pipeline.nn.backend import get_array_module, select_device
from tests import fakecupy

REAL_CUPY = backend.cupy_available()


@pytest.fixture(params=["fake", "cupy"])
def cp(request, monkeypatch):
    """The GPU backend: the fake always; real CuPy where it and a device exist."""
    if request.param == "cupy":
        if not REAL_CUPY:
            pytest.skip("needs CuPy and a CUDA device")
        return select_device("gpu")
    fake = fakecupy.install(monkeypatch)
    assert select_device("gpu") is fake
    fake._ledger.reset()
    return fake


def close(gpu, cpu, rtol=1e-4, atol=1e-5):
    """gpu, computed on the device (an op that took its inputs to the host would give a NumPy array), is cpu."""
    assert get_array_module(gpu) is not np, type(gpu)
    np.testing.assert_allclose(to_numpy(gpu), cpu, rtol=rtol, atol=atol)


def test_backend_picks_cupy_for_device_arrays(cp):
    a = cp.zeros(3)
    assert get_array_module(a) is cp and get_array_module(np.zeros(3)) is np
    assert select_device("auto") is cp


@pytest.mark.parametrize("x_shape,k,stride,padding", [((3, 9, 9, 1), (3, 3, 4), 1, "valid"),
                                                      ((2, 12, 12, 3), (5, 5, 4), 2, "same"),
                                                      ((2, 8, 7, 2), (3, 3, 5), 1, 1)])
def test_conv2d(cp, x_shape, k, stride, padding):
    rng = np.random.default_rng(0)
    kh, kw, f = k
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((kh, kw, x_shape[3], f)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    pad = conv.conv_padding(padding, x_shape[1:3], (kh, kw), stride)
    out, cache = conv.conv2d_forward(x, w, b, stride, pad)
    gout, gcache = conv.conv2d_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), stride, pad)
    close(gout, out)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    for g, c in zip(conv.conv2d_backward(cp.asarray(dout), gcache), conv.conv2d_backward(dout, cache)):
        close(g, c)


def test_pooling_and_batchnorm(cp):
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((4, 6, 6, 3)), 0).astype(np.float32)
    dout = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    for fwd, bwd in ((pool.maxpool_forward, pool.maxpool_backward), (pool.avgpool_forward, pool.avgpool_backward),
                     (lambda x, size: pool.maxpool2x2_forward(x), pool.maxpool2x2_backward)):
        out, cache = fwd(x, 2)
        gout, gcache = fwd(cp.asarray(x), 2)
        close(gout, out)
        close(bwd(cp.asarray(dout), gcache), bwd(dout, cache))
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    grm, grv = cp.asarray(rm), cp.asarray(rv)
    out, cache = norm.batchnorm_forward(x, gamma, beta, rm, rv, True)
    gout, gcache = norm.batchnorm_forward(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), grm, grv, True)
    close(gout, out)
    close(grm, rm)
    close(grv, rv)
    for g, c in zip(norm.batchnorm_backward(cp.asarray(x), gcache), norm.batchnorm_backward(x, cache)):
        close(g, c, rtol=1e-3, atol=1e-4)


# An odd net for the branches the named ones miss: a stride-2 'same' conv into BatchNorm, leaky ReLU, average
# pooling, a 3x3 stride-2 max pool, global average pooling, a dense BatchNorm.
ODD_NET = [
    {"type": "conv2d", "filters": 6, "kernel": 3, "stride": 2, "padding": "same", "bias": False},
    {"type": "batchnorm"}, {"type": "leaky_relu", "alpha": 0.1}, {"type": "avgpool", "size": 2},
    {"type": "conv2d", "filters": 8, "kernel": 3, "padding": 1}, {"type": "relu"},
    {"type": "maxpool", "size": 3, "stride": 2}, {"type": "conv2d", "filters": 12, "kernel": 1},
    {"type": "global_avgpool"}, {"type": "dense", "units": 16}, {"type": "batchnorm"}, {"type": "relu"},
    {"type": "dropout", "rate": 0.3}, {"type": "dense"},
]


@pytest.mark.parametrize("arch", ["deotte", "lenet5", "small_bn", "seed_small", "odd"])
def test_model_step_and_state_agree_with_numpy(cp, arch):
    """Same seed: same weights, same dropout masks, same loss, gradients and optimizer step on both backends.

    The odd net takes SGD: one of its channels is nearly dead behind the ReLU and max pool, and Adam's first
    step would blow its rounding-size bias gradient up to +-lr (item 1 of issue 15, in another guise)."""
    optimizer, slot = ("sgd", "momentum_buffer") if arch == "odd" else ("adam", "exp_avg")
    arch = ODD_NET if arch == "odd" else arch
    rng = np.random.default_rng(2)
    x = rng.random((8, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    cpu, gpu = build_model(arch, seed=4), build_model(arch, seed=4, xp=cp)
    ocpu, ogpu = make_optimizer(optimizer), make_optimizer(optimizer)
    lc, dc = softmax_cross_entropy(cpu.forward(x, train=True), y)
    xg, yg = cp.asarray(x), cp.asarray(y)
    ledger = getattr(cp, "_ledger", None)  # the fake's; real CuPy keeps none
    if ledger:
        ledger.reset()
    lg, dg = softmax_cross_entropy(gpu.forward(xg, train=True), yg)
    cpu.backward(dc, input_grad=False)
    gpu.backward(dg, input_grad=False)
    # no op reads a view that overlaps its own output: CuPy would copy the input first, on every step
    assert not ledger or ledger.overlap_copies == []
    assert lg == pytest.approx(lc, rel=1e-4)
    for (name, _, gc), (_, _, gg) in zip(cpu.params(), gpu.params()):
        close(gg, gc, rtol=1e-3, atol=1e-4)
    ocpu.step(cpu.params(), 1e-3)
    ogpu.step(gpu.params(), 1e-3)
    sc, sg = cpu.state_dict(), gpu.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sg.values())
    for k in sc:
        np.testing.assert_allclose(sg[k], sc[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert isinstance(ogpu.state_dict()[f"0.w.{slot}"], np.ndarray)
    p = gpu.predict_proba(x)
    assert isinstance(p, np.ndarray) and p.dtype == np.float32
    np.testing.assert_allclose(p, cpu.predict_proba(x), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("broken", ["compile", "cublas"])
def test_a_cupy_that_imports_but_cannot_run_falls_back_to_numpy_in_one_line(monkeypatch, capsys, broken):
    """Issue 15 item 2: counting devices is not enough; the probe runs a kernel, a GEMM and a copy back."""
    fakecupy.install(monkeypatch, broken=broken)
    assert not backend.cupy_available()
    assert select_device("auto") is np
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CuPy cannot run on this GPU" in err and "using NumPy" in err
    assert not backend.cupy_available()  # probed once: no second line
    assert capsys.readouterr().err == ""
    with pytest.raises(backend.EngineError, match="cannot run on the GPU"):
        select_device("gpu")


def test_no_device_is_no_gpu_without_a_message(monkeypatch, capsys):
    fakecupy.install(monkeypatch, devices=0)
    assert select_device("auto") is np
    assert capsys.readouterr().err == ""
    with pytest.raises(backend.EngineError, match="no CUDA device"):
        select_device("gpu")


def test_labels_out_of_range_are_one_clear_error(cp):
    """Issue 15 item 3: CuPy wraps an out-of-range label around (NumPy takes -1 as the last class): the loss
    checks the range where it receives the labels, host or device."""
    logits = cp.asarray(np.zeros((3, 10), np.float32))
    for bad in ([0, 10, 1], [0, -1, 1]):
        for labels in (np.array(bad), cp.asarray(np.array(bad))):
            with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).* from -?\d+ to \d+"):
                softmax_cross_entropy(logits, labels)
    loss, _ = softmax_cross_entropy(logits, np.array([0, 9, 1]))
    assert loss == pytest.approx(np.log(10))


def test_the_loss_and_a_step_cost_at_most_one_host_sync(cp):
    """Issue 15 item 5: host labels are checked for free; the loss can stay on the device; the training
    step's loss and correct count come back in one transfer."""
    if cp is not sys.modules.get("cupy") or not hasattr(cp, "_ledger"):
        pytest.skip("counts transfers through the fake's ledger")
    from pipeline import train

    rng = np.random.default_rng(0)
    logits = cp.asarray(rng.standard_normal((6, 10)).astype(np.float32))
    y = np.array([1, 2, 3, 4, 5, 9])
    cp._ledger.reset()
    loss, _ = softmax_cross_entropy(logits, y, as_float=False)
    assert cp._ledger.syncs == [] and isinstance(loss, cp.ndarray) and loss.ndim == 0
    value, correct = train.step_totals(loss, logits, y)
    assert len(cp._ledger.syncs) == 1
    assert value == pytest.approx(softmax_cross_entropy(to_numpy(logits), y)[0], rel=1e-6)
    assert correct == int((to_numpy(logits).argmax(1) == y).sum())


def test_inplace_relus_pass_the_same_object(cp):
    """Issue 15 item 5: CuPy copies an input that overlaps `out=` unless it is the very same object."""
    if not hasattr(cp, "_ledger"):
        pytest.skip("counts overlap copies through the fake's ledger")
    from pipeline.nn import activation

    x = cp.asarray(np.random.default_rng(0).standard_normal((4, 5, 5, 3)).astype(np.float32))
    expect = np.maximum(to_numpy(x), 0)
    cp._ledger.reset()
    y, cache = activation.relu_forward(x, out=x)
    d = cp.asarray(np.ones((4, 5, 5, 3), np.float32))
    dx = activation.relu_backward(d, cache, out=d)
    assert y is x and dx is d and cp._ledger.overlap_copies == []
    np.testing.assert_array_equal(to_numpy(y), expect)
    np.testing.assert_array_equal(to_numpy(dx), (expect > 0).astype(np.float32))


@pytest.mark.parametrize("arch", ["deotte", "small_bn", "lenet5"])
def test_eval_keeps_no_device_workspaces_after_predict(cp, arch):
    """Issue 15 item 5: at batch 1000 deotte's eval columns took about 1.5 GB that stayed allocated; on the
    GPU an eval pass now allocates them per layer from CuPy's pool and lets them go. The max-pool nets'
    scratch slots held theirs (about 25 MB at batch 1000) until scratch took them from the pool too."""
    if not hasattr(cp, "_ledger"):
        pytest.skip("measures live device bytes through the fake's ledger")
    import gc

    model = build_model(arch, seed=0, xp=cp)
    x = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    gc.collect()
    before = cp._ledger.live_bytes()
    model.predict_proba(x, batch_size=64)
    gc.collect()
    held = cp._ledger.live_bytes() - before
    assert held < 64 * 1024, f"predict left {held} bytes on the device"


def test_pipeline_trains_and_predicts_on_the_gpu_path(cp, tmp_path, monkeypatch):
    """A short `train` + `predict` with DEVICE=gpu matches the same run on the CPU; a training step costs
    one host sync."""
    if not hasattr(cp, "_ledger"):
        pytest.skip("runs the pipeline against the fake (a real GPU run is `make train DEVICE=gpu`)")
    from pipeline import predict, train
    from pipeline.fileio import load_npz
    from tests.test_resume import write_processed

    write_processed(tmp_path, n=80)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    settings = ["EPOCHS=1", "SEED=3", "AUGMENT=1", "ELASTIC=2", "EMA_DECAY=0.9"]  # the elastic warp and the weight average
    syncs = {}
    for device, batch in (("cpu", 16), ("gpu", 16), ("gpu", 32)):
        run = f"{device}{batch}"
        cp._ledger.reset()
        assert train.main(["--preset", "quick", "--run", run, *settings, f"BATCH_SIZE={batch}",
                           f"DEVICE={device}"]) == 0
        syncs[run] = len(cp._ledger.syncs)
        assert predict.main(["--run", run, "--device", device]) == 0
    assert syncs["cpu16"] == 0
    # 64 training images: 4 steps at batch 16, 2 at batch 32; evaluation and saving are the same
    assert syncs["gpu16"] - syncs["gpu32"] <= 2, cp._ledger.syncs
    cpu, gpu = load_npz(tmp_path / "runs" / "cpu16" / "model.npz"), load_npz(tmp_path / "runs" / "gpu16" / "model.npz")
    for k in cpu:
        np.testing.assert_allclose(gpu[k], cpu[k], rtol=1e-3, atol=1e-4, err_msg=k)
    np.testing.assert_allclose(load_npz(tmp_path / "runs" / "gpu16" / "test_probs.npz")["probs"],
                               load_npz(tmp_path / "runs" / "cpu16" / "test_probs.npz")["probs"], atol=1e-4)


def test_the_standard_recipe_stops_resumes_delivers_and_blends_on_the_gpu_path(cp, tmp_path, monkeypatch):
    """The recipe of `standard` and `overnight` (deotte_relu_bn, label smoothing, x/y zoom, the weight average,
    the last epoch) on DEVICE=gpu: a run stopped by MAX_TIME delivers its checkpoint as the Kaggle notebook does,
    then resumes to the very weights of an uninterrupted run; an ensemble blends with test-time shifts there."""
    if not hasattr(cp, "_ledger"):
        pytest.skip("runs the pipeline against the fake (a real GPU run is `make train DEVICE=gpu`)")
    from pipeline import ensemble, kaggle_env, train
    from pipeline.fileio import load_npz
    from tests.test_resume import write_processed

    write_processed(tmp_path, n=80)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    args = ["--preset", "standard", "EPOCHS=2", "BATCH_SIZE=16", "DEVICE=gpu"]
    assert train.main(["--run", "whole", *args]) == 0
    assert train.main(["--run", "cut", *args, "MAX_TIME=0.001s"]) == 3  # stops after its first step
    folder = tmp_path / "runs" / "cut"
    assert kaggle_env.deliver_best_so_far(folder, "gpu") == folder / "model.npz"
    assert train.main(["--run", "cut", *args]) == 0
    whole, cut = load_npz(tmp_path / "runs" / "whole" / "model.npz"), load_npz(folder / "model.npz")
    assert all(whole[k].tobytes() == cut[k].tobytes() for k in whole)

    assert train.main(["--preset", "overnight", "--run", "ens", "MEMBERS=2", "EPOCHS=1", "BATCH_SIZE=16",
                       "DEVICE=gpu"]) == 0
    cp._ledger.reset()
    assert ensemble.main(["--run", "ens", "--device", "gpu", "--tta"]) == 0
    assert cp._ledger.overlap_copies == []
    gpu_blend = load_npz(tmp_path / "runs" / "ens" / "test_probs.npz")["probs"]
    for member in ("0", "1"):  # predicted on the CPU instead: the same blend
        for cache in ("test_probs.npz", "test_probs_tta.npz"):
            (tmp_path / "runs" / "ens" / "members" / member / cache).unlink()
    assert ensemble.main(["--run", "ens", "--device", "cpu", "--tta"]) == 0
    np.testing.assert_allclose(gpu_blend, load_npz(tmp_path / "runs" / "ens" / "test_probs.npz")["probs"], atol=1e-4)


def test_the_fake_is_as_strict_as_cupy(monkeypatch):
    """The behaviours of CuPy that tests/fakecupy.py promises, so that the tests above mean something."""
    cp = fakecupy.install(monkeypatch)
    a = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    host = np.ones((2, 3), np.float32)
    assert not isinstance(a, np.ndarray)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    for mixed in (lambda: cp.add(a, host), lambda: a + host, lambda: host * a, lambda: np.maximum(a, host),
                  lambda: cp.concatenate([a, host]), lambda: a.dot(host.T)):
        with pytest.raises(TypeError, match="Unsupported type"):
            mixed()
    with pytest.raises(ValueError):
        a[...] = host
    total = a.sum()
    assert isinstance(total, cp.ndarray) and total.ndim == 0 and isinstance(a[0, 1], cp.ndarray)
    assert isinstance(np.sqrt(a), cp.ndarray)  # NumPy's ufuncs dispatch to the device, as CuPy's do
    with pytest.raises(AttributeError, match="no attribute 'block'"):
        cp.block  # in NumPy, not in CuPy
    assert np.isnan(to_numpy(cp.empty(4, dtype=np.float32))).all()  # device memory is garbage until written
    assert to_numpy(cp.empty(4, dtype=bool)).all()  # a mask too: not False until written
    with pytest.raises(TypeError, match="take no where"):
        cp.add(a, a, where=a > 1)  # NumPy's ufunc keywords beyond out, dtype and casting: CuPy refuses them
    cp._ledger.reset()
    assert float(total) == 15.0 and a.get().shape == (2, 3)
    assert [what for what, _ in cp._ledger.syncs] == ["float", "get"]
    b = a[:, :2]
    cp.multiply(a[:, 1:], 2, out=b)  # overlapping views of one buffer: CuPy copies the input first
    assert len(cp._ledger.overlap_copies) == 1
