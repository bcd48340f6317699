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
    for fwd, bwd in ((pool.maxpool_forward, pool.maxpool_backward), (pool.avgpool_forward, pool.avgpool_backward)):
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


def test_model_step_and_state_agree_with_numpy(cp):
    """Same seed: same weights, same dropout masks, same loss, gradients and Adam step on both backends."""
    rng = np.random.default_rng(2)
    x = rng.random((8, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    cpu, gpu = build_model("deotte", seed=4), build_model("deotte", seed=4, xp=cp)
    ocpu, ogpu = make_optimizer("adam"), make_optimizer("adam")
    lc, dc = softmax_cross_entropy(cpu.forward(x), y)
    lg, dg = softmax_cross_entropy(gpu.forward(cp.asarray(x)), cp.asarray(y))
    assert lg == pytest.approx(lc, rel=1e-4)
    cpu.backward(dc, input_grad=False)
    gpu.backward(dg, input_grad=False)
    for (name, _, gc), (_, _, gg) in zip(cpu.params(), gpu.params()):
        close(gg, gc, rtol=1e-3, atol=1e-4)
    ocpu.step(cpu.params(), 1e-3)
    ogpu.step(gpu.params(), 1e-3)
    sc, sg = cpu.state_dict(), gpu.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sg.values())
    for k in sc:
        np.testing.assert_allclose(sg[k], sc[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert isinstance(ogpu.state_dict()["0.w.exp_avg"], np.ndarray)
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
    with pytest.raises(backend.UserError, match="cannot run on the GPU"):
        select_device("gpu")


def test_no_device_is_no_gpu_without_a_message(monkeypatch, capsys):
    fakecupy.install(monkeypatch, devices=0)
    assert select_device("auto") is np
    assert capsys.readouterr().err == ""
    with pytest.raises(backend.UserError, match="no CUDA device"):
        select_device("gpu")
