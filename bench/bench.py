"""Engine vs PyTorch CPU: training and inference throughput, peak memory, BLAS in use (`make bench`).

    python -m bench.bench [--repeats 5] [--quick] [--layers] [--batch 128] [--infer-batch 1000]

Both engines run in this one process on the same cores, timed alternately (ours, torch, ours, torch, ...)
so that load from other processes hits both alike; each figure is the median of the timed repeats after a
warm-up. PyTorch gets as many intra-op threads as the BLAS behind NumPy reports (threadpoolctl), and both
run with OMP_WAIT_POLICY=PASSIVE. So that this cannot flatter us, PyTorch is also timed alone in a child
process with its own defaults (its thread count, no OMP_WAIT_POLICY), printed as "torch defaults" with our
ratio against it, just above the last line.
Peak RSS is measured in child processes, one per (engine, arch, mode), each importing only its own engine,
so the figures do not include the other engine's libraries.

The last line printed is the one to quote (ratios ours / PyTorch, > 1 means we are faster):
    bench: deotte train x{R1} infer x{R2} | lenet5 train x{R3} infer x{R4}

The PyTorch twin of an architecture is built here from the same spec list (ARCHITECTURES[name]) and the
weights are copied across; tests/test_torch_parity.py uses the same twin to check that both compute the same
logits, loss, gradients and optimizer steps.
"""
import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from pipeline.errors import UserError, cli_main

ARCHS = ("deotte", "lenet5")  # the order of the summary line
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------------------
# The PyTorch twin: NCHW modules built from our NHWC spec list, and the layout conversions between the two.

def _pair(v):
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def keras_same_pads(size, kernel, stride):
    """Keras/TensorFlow 'same' padding on one axis -> (before, after); the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def torch_twin(spec, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, dtype=None):
    """Build the PyTorch equivalent of a spec list.

    Returns (net, links): net is an nn.Sequential with one entry per spec entry (so net[k] is layer k),
    taking NCHW input; links maps layer index k -> {"kind": "conv"|"dense"|"bn", "module": the module
    holding the parameters, "flat_hwc": (H, W, C) of the Flatten feeding a dense layer, else None}.
    """
    import torch
    from torch import nn

    dtype = dtype or torch.float32
    shape = tuple(input_shape)          # (H, W, C) for images, (F,) after flatten/global pooling
    flat_hwc = None                     # set by a flatten of a spatial map; used by the next dense
    modules, links = [], {}
    for k, layer in enumerate(spec):
        kind = str(layer["type"]).lower()
        if kind in ("conv2d", "conv"):
            h, w, cin = shape
            kh, kw = _pair(layer["kernel"])
            sh, sw = _pair(layer.get("stride", 1))
            padding = layer.get("padding", "valid")
            if padding == "same":
                top, bottom = keras_same_pads(h, kh, sh)
                left, right = keras_same_pads(w, kw, sw)
            elif padding == "valid":
                top = bottom = left = right = 0
            else:
                top = bottom = left = right = int(padding)
            conv = nn.Conv2d(cin, int(layer["filters"]), (kh, kw), stride=(sh, sw),
                             bias=bool(layer.get("bias", True)), dtype=dtype)
            module = conv
            if top or bottom or left or right:
                module = nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), conv)
            shape = ((h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1, conv.out_channels)
            links[k] = {"kind": "conv", "module": conv, "flat_hwc": None}
        elif kind in ("dense", "linear"):
            units = int(layer.get("units", num_classes))
            module = nn.Linear(int(np.prod(shape)), units, bias=bool(layer.get("bias", True)), dtype=dtype)
            links[k] = {"kind": "dense", "module": module, "flat_hwc": flat_hwc}
            shape, flat_hwc = (units,), None
        elif kind in ("batchnorm", "bn"):
            bn_cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
            module = bn_cls(shape[-1], eps=float(layer.get("eps", 1e-5)),
                            momentum=float(layer.get("momentum", 0.1)), dtype=dtype)
            links[k] = {"kind": "bn", "module": module, "flat_hwc": None}
        elif kind == "relu":
            module = nn.ReLU()
        elif kind in ("leaky_relu", "leakyrelu"):
            module = nn.LeakyReLU(float(layer.get("alpha", 0.01)))
        elif kind in ("maxpool", "maxpool2d", "avgpool", "avgpool2d"):
            size = _pair(layer.get("size", 2))
            stride = _pair(layer.get("stride", size))
            pool_cls = nn.MaxPool2d if kind.startswith("max") else nn.AvgPool2d
            module = pool_cls(size, stride)
            h, w, c = shape
            shape = ((h - size[0]) // stride[0] + 1, (w - size[1]) // stride[1] + 1, c)
        elif kind in ("global_avgpool", "globalavgpool"):
            module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            shape = (shape[-1],)
        elif kind == "dropout":
            module = nn.Dropout(float(layer.get("rate", 0.5)))
        elif kind == "flatten":
            module = nn.Flatten()
            if len(shape) == 3 and shape[0] * shape[1] > 1:
                flat_hwc = shape        # our flatten is HWC order, torch's is CHW
            shape = (int(np.prod(shape)),)
        else:
            raise ValueError(f"layer {k}: no PyTorch twin for type '{kind}'")
        modules.append(module)
    return nn.Sequential(*modules), links


# Our parameter name suffix -> the torch attribute holding it, per kind of layer.
_TORCH_ATTR = {
    "conv": {"w": "weight", "b": "bias"},
    "dense": {"w": "weight", "b": "bias"},
    "bn": {"gamma": "weight", "beta": "bias", "running_mean": "running_mean", "running_var": "running_var"},
}


def to_torch_layout(link, suffix, a):
    """One of our arrays (NHWC conventions) -> the same values in torch's layout (numpy in, numpy out)."""
    a = np.asarray(a)
    if suffix != "w":
        return a
    if link["kind"] == "conv":                              # (kh, kw, Cin, Cout) -> (Cout, Cin, kh, kw)
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if link["flat_hwc"] is not None:                        # rows in HWC order -> CHW order
        h, w, c = link["flat_hwc"]
        a = a.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
    return np.ascontiguousarray(a.T)                        # (in, out) -> (out, in)


def to_our_layout(link, suffix, a):
    """The inverse of to_torch_layout."""
    a = np.asarray(a)
    if suffix != "w":
        return a
    if link["kind"] == "conv":
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    a = a.T
    if link["flat_hwc"] is not None:
        h, w, c = link["flat_hwc"]
        a = a.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
    return np.ascontiguousarray(a)


def _torch_tensors(links):
    """Yield (our name, link, suffix, torch tensor or None) for every parameter and BN statistic."""
    for k, link in sorted(links.items()):
        for suffix, attr in _TORCH_ATTR[link["kind"]].items():
            yield f"{k}.{suffix}", link, suffix, getattr(link["module"], attr)


def load_into_torch(links, state):
    """Copy our state_dict (params and BN running stats, numpy) into the twin. Every key must be used."""
    import torch

    used = set()
    for name, link, suffix, tensor in _torch_tensors(links):
        if tensor is None:                                  # a layer built without bias
            continue
        value = torch.from_numpy(to_torch_layout(link, suffix, state[name]))
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: ours {tuple(value.shape)} vs torch {tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(value)
        used.add(name)
    extra = set(state) - used
    if extra:
        raise ValueError(f"state entries with no place in the twin: {sorted(extra)}")


def torch_state(links):
    """The twin's params and BN running stats in our names and layout (numpy)."""
    return {name: to_our_layout(link, suffix, tensor.detach().cpu().numpy())
            for name, link, suffix, tensor in _torch_tensors(links) if tensor is not None}


def torch_grads(links):
    """The twin's parameter gradients (after backward) in our names and layout (numpy)."""
    import torch

    return {name: to_our_layout(link, suffix, tensor.grad.detach().cpu().numpy())
            for name, link, suffix, tensor in _torch_tensors(links)
            if isinstance(tensor, torch.nn.Parameter) and tensor.grad is not None}


def torch_params(links):
    """(our name, torch Parameter) for every trainable tensor, in our order (for optimizer param groups)."""
    import torch

    return [(name, tensor) for name, _, _, tensor in _torch_tensors(links) if isinstance(tensor, torch.nn.Parameter)]


def nhwc_to_torch(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------------------------------------
# Timing

def blas_info():
    """threadpoolctl's view of the loaded BLAS / OpenMP libraries (list of dicts)."""
    from threadpoolctl import threadpool_info

    return threadpool_info()


def numpy_blas_threads():
    """Threads of the BLAS behind NumPy (call before torch is imported, so it is the only BLAS loaded)."""
    blas = [lib for lib in blas_info() if lib.get("user_api") == "blas"]
    if not blas:
        return os.cpu_count() or 1
    return int(blas[0]["num_threads"])


def describe_libraries(info):
    lines = []
    for lib in info:
        kernel = lib.get("architecture") or lib.get("corename") or lib.get("threading_layer") or "-"
        lines.append(f"  {lib.get('user_api')}: {lib.get('internal_api')} {lib.get('version')} "
                     f"kernel={kernel} threads={lib.get('num_threads')} ({os.path.basename(lib.get('filepath', ''))})")
    return lines


def random_batch(n, seed=0):
    """Random images (n, 28, 28, 1) float32 and labels (n,) int64."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + INPUT_SHAPE, dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=n)
    return x, y


def ours_steps(arch, batch, infer_batch, seed=0):
    """(train_step, infer_step) closures for our engine: Adam, float32, NumPy."""
    from pipeline.nn import build_model, make_optimizer, softmax_cross_entropy

    model = build_model(arch, seed=seed, dtype=np.float32, xp=np)
    opt = make_optimizer("adam")
    x, y = random_batch(batch, seed)
    xi, _ = random_batch(infer_batch, seed + 1)

    def train_step():
        logits = model.forward(x, train=True)
        _, dlogits = softmax_cross_entropy(logits, y)
        model.backward(dlogits, input_grad=False)   # as training does; torch skips it too
        opt.step(model.params(), 1e-3)

    # predict_proba makes one inference copy (BatchNorms folded, a snapshot of the weights) per call and runs
    # every batch of the test set through it (28 of 1000): so one copy here, not one per timed batch
    inference = model.for_inference()

    def infer_step():
        inference.forward(xi, train=False)

    return train_step, infer_step


def torch_steps(arch, batch, infer_batch, seed=0):
    """(train_step, infer_step) closures for the PyTorch twin on the same data: Adam, float32, CPU."""
    import torch
    import torch.nn.functional as F

    from pipeline.nn import ARCHITECTURES

    torch.manual_seed(seed)
    net, _ = torch_twin(ARCHITECTURES[arch])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = random_batch(batch, seed)
    xi, _ = random_batch(infer_batch, seed + 1)
    x, y, xi = nhwc_to_torch(x), torch.from_numpy(y), nhwc_to_torch(xi)

    def train_step():
        net.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    def infer_step():
        net.eval()
        with torch.inference_mode():
            net(xi)

    return train_step, infer_step


def time_alternating(fns, repeats, batches, warmup=1):
    """Run each fn `warmup` times, then `repeats` rounds of A B A B, each round timing `batches` calls.

    fns: dict label -> callable. Returns dict label -> list of seconds per call (one per repeat).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            for _ in range(batches):
                fn()
            times[label].append((time.perf_counter() - start) / batches)
    return times


def measure_arch(arch, batch=128, infer_batch=1000, repeats=5, batches=3, warmup=1):
    """Images/s of ours and torch, train and infer: {"train": {"ours": ips, "torch": ips}, "infer": {...}}."""
    ours_train, ours_infer = ours_steps(arch, batch, infer_batch)
    torch_train, torch_infer = torch_steps(arch, batch, infer_batch)
    result = {}
    for mode, size, ours, theirs, n in (("train", batch, ours_train, torch_train, batches),
                                        ("infer", infer_batch, ours_infer, torch_infer, max(1, batches // 2))):
        times = time_alternating({"ours": ours, "torch": theirs}, repeats, n, warmup)
        result[mode] = {label: size / statistics.median(t) for label, t in times.items()}
    return result


def ratio(result, mode):
    return result[mode]["ours"] / result[mode]["torch"]


def summary_line(results):
    """The bench's last line: ratios ours / PyTorch for each arch of ARCHS."""
    parts = [f"{arch} train x{ratio(results[arch], 'train'):.2f} infer x{ratio(results[arch], 'infer'):.2f}"
             for arch in ARCHS]
    return "bench: " + " | ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Memory: one child process per (engine, arch, mode), so each peak holds only that engine's libraries.

def _rss_child(engine, arch, mode, size, threads):
    """Body of the child: import one engine, run two steps of `mode`, print peak RSS (MiB) as JSON."""
    if engine == "torch":
        import torch

        torch.set_num_threads(threads)
        make = torch_steps
    else:
        make = ours_steps
        from pipeline.nn import configure_threads

        configure_threads()  # as the parent does for its timing
    import pipeline.nn  # noqa: F401  (imports counted in the baseline)
    baseline = peak_rss_mib()
    train_step, infer_step = make(arch, size, size)
    step = train_step if mode == "train" else infer_step
    for _ in range(2):
        step()
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak_rss_mib()}))


def peak_rss_mib():
    """This process's peak resident set size in MiB.

    VmHWM where /proc has it: getrusage's ru_maxrss survives exec on Linux, so a child forked from a big
    parent would report at least the parent's size; VmHWM belongs to the new address space only.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def peak_rss_child(engine, arch, mode, size, threads=1):
    """Peak RSS in MiB of a fresh process running two `mode` steps of `engine` on `arch`, plus its baseline
    after imports: {"baseline_mib": ..., "peak_mib": ...}."""
    cmd = [sys.executable, "-m", "bench.bench", "--rss-child", f"{engine},{arch},{mode},{size},{threads}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {engine} {arch} {mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# PyTorch with its own defaults: alone in a child process, its default thread count, no OMP_WAIT_POLICY.

def _torch_defaults_child(batch, infer_batch, repeats, batches, warmup):
    """Body of the child: images/s of the PyTorch twins alone, printed as JSON {arch: {mode: ips}, "threads": n}."""
    import torch

    result = {"threads": torch.get_num_threads()}
    for arch in ARCHS:
        train_step, infer_step = torch_steps(arch, batch, infer_batch)
        result[arch] = {}
        for mode, size, step, n in (("train", batch, train_step, batches),
                                    ("infer", infer_batch, infer_step, max(1, batches // 2))):
            times = time_alternating({"torch": step}, repeats, n, warmup)["torch"]
            result[arch][mode] = size / statistics.median(times)
    print(json.dumps(result))


def torch_defaults(batch, infer_batch, repeats, batches, warmup):
    """{arch: {mode: images/s}, "threads": n} of PyTorch alone in a fresh process with its default settings."""
    cmd = [sys.executable, "-m", "bench.bench", "--torch-defaults-child",
           f"{batch},{infer_batch},{repeats},{batches},{warmup}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"torch defaults child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_defaults_line(results, defaults):
    """One line: PyTorch's images/s with its defaults, and ours / that."""
    ips = " | ".join(f"{arch} train {defaults[arch]['train']:.0f} infer {defaults[arch]['infer']:.0f}"
                     for arch in ARCHS)
    ratios = " | ".join(f"{arch} train x{results[arch]['train']['ours'] / defaults[arch]['train']:.2f} "
                        f"infer x{results[arch]['infer']['ours'] / defaults[arch]['infer']:.2f}" for arch in ARCHS)
    return (f"torch defaults: {ips} img/s (alone in its own process, {defaults['threads']} threads, "
            f"no OMP_WAIT_POLICY); ours / that: {ratios}")


# ----------------------------------------------------------------------------------------------------------

def print_layer_table(arch, batch, repeats):
    from pipeline.nn import build_model
    from pipeline.nn.profile import format_profile, profile_layers

    model = build_model(arch, seed=0, dtype=np.float32, xp=np)
    x, y = random_batch(batch)
    rows = profile_layers(model, x, y, repeats)
    print(f"\nper-layer time of one training step, ours, {arch}, batch {batch}, median of {repeats}:")
    for line in format_profile(rows).splitlines():
        print("  " + line)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 5; 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and batches, no memory children")
    p.add_argument("--layers", action="store_true", help="also print ours per-layer forward/backward for deotte")
    p.add_argument("--batch", type=int, default=128, help="training batch size (default 128)")
    p.add_argument("--infer-batch", type=int, default=1000, help="inference batch size (default 1000)")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    p.add_argument("--torch-defaults-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.repeats < 1 or args.batch < 1 or args.infer_batch < 1:
        raise UserError("--repeats, --batch and --infer-batch must be positive")
    return args


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.torch_defaults_child:  # before the OMP_WAIT_POLICY below: this child measures PyTorch's defaults
        batch, infer_batch, repeats, batches, warmup = (int(v) for v in args.torch_defaults_child.split(","))
        _torch_defaults_child(batch, infer_batch, repeats, batches, warmup)
        return 0
    # PyTorch's OpenMP threads spin after each op by default and steal the core our next step needs when
    # both engines share a process; passive waiting leaves PyTorch's own speed as it was (docs/PERFORMANCE.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.rss_child:
        engine, arch, mode, size, threads = args.rss_child.split(",")
        _rss_child(engine, arch, mode, int(size), int(threads))
        return 0

    if importlib.util.find_spec("torch") is None:
        raise UserError("PyTorch is not installed: `make bench` needs the dev requirements (make venv)")
    load_before = os.getloadavg()[0]
    threads = numpy_blas_threads()     # before torch is imported: only NumPy's BLAS is loaded
    batches = 1 if args.quick else 3
    warmup = 1                         # the first step allocates buffers and optimizer state
    memory = {}                        # first, while this process is small and holds no torch
    if not args.quick:
        print("measuring peak memory in child processes ...", file=sys.stderr, flush=True)
        for arch in ARCHS:
            for mode, size in (("train", args.batch), ("infer", args.infer_batch)):
                for engine in ("ours", "torch"):
                    memory[arch, mode, engine] = peak_rss_child(engine, arch, mode, size, threads)

    from pipeline.nn import configure_threads

    configure_threads()                # as training does: NumPy's BLAS held to one thread, the engine's own
    import torch

    torch.set_num_threads(threads)

    print(f"numpy {np.__version__}, torch {torch.__version__} (intra-op threads {torch.get_num_threads()}, "
          f"mkldnn {torch.backends.mkldnn.is_available()}), cpu count {os.cpu_count()}")
    print("BLAS / OpenMP libraries loaded (threadpoolctl):")
    for line in describe_libraries(blas_info()):
        print(line)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        if var in os.environ:
            print(f"  {var}={os.environ[var]}")

    results = {}
    for arch in ARCHS:
        print(f"timing {arch} ...", file=sys.stderr, flush=True)
        results[arch] = measure_arch(arch, args.batch, args.infer_batch, args.repeats, batches, warmup)

    print(f"\nimages/s, median of {args.repeats} repeats x {batches} batches "
          f"(train: batch {args.batch}, fwd+bwd+Adam; infer: batch {args.infer_batch}, eval mode), float32")
    header = f"  {'arch':<8}{'mode':<7}{'ours':>10}{'torch':>10}{'ratio':>8}"
    if memory:
        header += f"{'ours MiB':>10}{'torch MiB':>11}"
    print(header)
    for arch in ARCHS:
        for mode in ("train", "infer"):
            r = results[arch][mode]
            line = f"  {arch:<8}{mode:<7}{r['ours']:>10.0f}{r['torch']:>10.0f}{ratio(results[arch], mode):>8.2f}"
            if memory:
                line += (f"{memory[arch, mode, 'ours']['peak_mib']:>10.0f}"
                         f"{memory[arch, mode, 'torch']['peak_mib']:>11.0f}")
            print(line)
    if memory:
        base = {e: min(m["baseline_mib"] for (_, _, eng), m in memory.items() if eng == e) for e in ("ours", "torch")}
        print(f"  MiB = peak RSS of a child process running only that engine (2 steps of that mode); "
              f"after imports alone: ours {base['ours']:.0f}, torch {base['torch']:.0f}")
    print(f"  this process (both engines, all figures above): peak RSS {peak_rss_mib():.0f} MiB")
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) before {load_before:.1f}, after {load_after:.1f}, on {os.cpu_count()} cores"
          + (": other work competed for the cores, the figures are unreliable"
             if max(load_before, load_after) > (os.cpu_count() or 1) + 1 else ""))

    if args.layers:
        print_layer_table("deotte", args.batch, max(3, args.repeats // 2))
    print("timing torch alone with its defaults ...", file=sys.stderr, flush=True)
    defaults = torch_defaults(args.batch, args.infer_batch, args.repeats, batches, warmup)
    print(torch_defaults_line(results, defaults))
    print(summary_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
