"""The engine's threads (pipeline/nn/threads.py): the splitter, named scratch slots, and BLAS left alone
until a stage calls configure()."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.nn import threads, tuning

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def three_threads(monkeypatch):
    """3 engine threads, splits forced on tiny work (BLAS is held as training holds it)."""
    monkeypatch.setattr(tuning, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(tuning, "GEMM_MIN_FLOPS", 0)
    monkeypatch.setattr(tuning, "BLOCK_BYTES", 64)
    threads.configure(3)
    yield
    threads.set_num_threads(None)


@pytest.mark.parametrize("n,parts,blocks", [(10, 3, None), (10, 3, 9), (7, 2, 7), (2, 3, 3), (1, 1, 1), (0, 1, None),
                                            (100, 4, 12)])
def test_split_covers_every_row_once_in_order(n, parts, blocks):
    seen = []
    lock = threading.Lock()

    def fn(rows, t):
        with lock:
            seen.append((rows.start, rows.stop, t))
        return list(range(rows.start, rows.stop))

    results = threads.split(fn, n, parts, blocks)
    assert [i for block in results for i in block] == list(range(n))  # every row once, block order
    assert len(results) == max(1, blocks or parts)
    assert {t for _, _, t in seen} <= set(range(max(parts, 1)))


def test_split_gives_each_thread_consecutive_blocks_and_its_part_index():
    ran = {}

    def fn(rows, t):
        ran[rows.start] = (t, threading.current_thread().name, threads.part_index())
        return rows

    threads.set_num_threads(3)
    try:
        threads.split(fn, 12, 3, blocks=6)
    finally:
        threads.set_num_threads(None)
    parts = [ran[s][0] for s in sorted(ran)]
    assert parts == [0, 0, 1, 1, 2, 2]
    assert all(t == index for t, _, index in ran.values())  # part_index() inside fn is its t
    assert ran[0][1] == threading.current_thread().name       # part 0 runs on the caller
    assert threads.part_index() == 0                          # and is left as it was


def test_nested_splits_run_inline_on_their_part(three_threads):
    inner = []

    def outer(rows, t):
        names = threads.parallel_rows(lambda r: threading.current_thread().name, 50, np.zeros((50, 1000)))
        inner.append((t, set(names), threading.current_thread().name))
        return rows

    threads.parallel_batches(outer, 9, np.zeros((9, 100_000)))
    assert sorted(t for t, _, _ in inner) == [0, 1, 2]
    assert all(names == {mine} for _, names, mine in inner)  # every nested block ran on the part's thread


def test_row_passes_and_gemms_equal_the_serial_ones(three_threads):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((37, 19)), rng.standard_normal((19, 11))
    x = rng.standard_normal((24, 5, 7))
    out = np.empty_like(x)
    blocks = threads.parallel_rows(lambda r: np.multiply(x[r], 2.0, out=out[r]) is not None, 24, x)
    assert len(blocks) > 3 and len(blocks) % 3 == 0  # more blocks than threads, as many per thread
    np.testing.assert_array_equal(out, 2.0 * x)
    np.testing.assert_array_equal(threads.gemm(a, b), a @ b)  # rows split: each row computed as alone
    c = rng.standard_normal((37, 11))
    np.testing.assert_allclose(threads.gemm_tn(a, c), a.T @ c, rtol=1e-12)  # a sum over row ranges
    parts = threads.parallel_batches(lambda rows, t: (rows, t), 24, x, flops=1)
    assert [t for _, t in parts] == [0, 1, 2] and parts[0][0].start == 0 and parts[-1][0].stop == 24


def test_small_or_non_numpy_work_is_not_split():
    calls = []
    assert threads.parallel_rows(lambda r: calls.append(r) or "one", 100, np.zeros(10)) == ["one"]
    assert calls == [slice(0, 100)]
    assert threads.parallel_rows(lambda r: r, 100, [0.0] * 10 ** 6) == [slice(0, 100)]  # not a numpy array


def test_scratch_slots_are_named_and_private_to_a_thread():
    a = threads.scratch("test.a", (4, 3), np.float32)
    b = threads.scratch("test.b", (4, 3), np.float32)
    assert not np.shares_memory(a, b)
    assert np.shares_memory(threads.scratch("test.a", (2, 2), np.float32), a)  # reused between calls
    other = []
    worker = threading.Thread(target=lambda: other.append(threads.scratch("test.a", (4, 3), np.float32)))
    worker.start()
    worker.join()
    assert not np.shares_memory(other[0], a)
    with pytest.raises(TypeError, match="named"):
        threads.scratch(0, (2,), np.float32)


def test_bad_thread_count_is_refused(monkeypatch):
    from pipeline.nn.errors import EngineError

    monkeypatch.setenv("PIPELINE_NN_THREADS", "two")
    threads.set_num_threads(None)
    with pytest.raises(EngineError, match="PIPELINE_NN_THREADS"):
        threads.num_threads()
    monkeypatch.setenv("PIPELINE_NN_THREADS", "3")
    assert threads.num_threads() == 3
    monkeypatch.delenv("PIPELINE_NN_THREADS")
    threads.set_num_threads(None)


def test_configure_refuses_a_bad_thread_count_when_the_stage_starts(monkeypatch):
    from pipeline.nn.errors import EngineError

    monkeypatch.setenv("PIPELINE_NN_THREADS", "0")
    try:
        with pytest.raises(EngineError, match="PIPELINE_NN_THREADS"):
            threads.configure()
    finally:
        monkeypatch.delenv("PIPELINE_NN_THREADS")
        threads.set_num_threads(None)


def test_threads_splitting_at_once_make_one_pool(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    made = []

    class SlowPool(ThreadPoolExecutor):  # widens the window between "no pool yet" and "pool made"
        def __init__(self, *args, **kwargs):
            made.append(self)
            time.sleep(0.05)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(threads, "ThreadPoolExecutor", SlowPool)
    threads.set_num_threads(3)
    try:
        results = []
        callers = [threading.Thread(target=lambda: results.append(threads.split(lambda r, t: r, 6, 3)))
                   for _ in range(4)]
        for c in callers:
            c.start()
        for c in callers:
            c.join()
        assert len(made) == 1
        assert results == [[slice(0, 2), slice(2, 4), slice(4, 6)]] * 4
    finally:
        threads.set_num_threads(None)
        for pool in made[1:]:  # the old code's extra pools
            pool.shutdown(wait=True)


def test_workspace_named_slots_are_apart_from_the_threads_memory():
    from pipeline.nn.memory import Workspace

    ws = Workspace()
    kept = ws.slot("kept").array((8,), np.float32)
    for t in range(3):
        assert not np.shares_memory(ws.for_thread(t).array((8,), np.float32), kept)
    assert ws.slot("kept") is ws.slot("kept") and ws.for_thread(1) is ws.for_thread(1)
    with pytest.raises(TypeError, match="slot"):
        ws.for_thread("kept")  # a name is not a thread


BLAS_THREADS = """
import json
import numpy as np
from threadpoolctl import threadpool_info
def blas():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
before = blas()
import pipeline.nn
from pipeline.nn import build_model, softmax_cross_entropy
model = build_model("lenet5", seed=0)
x = np.random.default_rng(0).random((64, 28, 28, 1)).astype(np.float32)
model.backward(softmax_cross_entropy(model.forward(x, train=True), np.arange(64) % 10)[1])  # GEMMs, split or not
after_use = blas()
held = pipeline.nn.configure_threads()
print(json.dumps({"before": before, "after_use": after_use, "held": held, "configured": blas()}))
"""


def test_blas_threads_change_only_when_a_stage_configures_them():
    pytest.importorskip("threadpoolctl")
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "2", "PIPELINE_NN_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", BLAS_THREADS], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if not seen["before"]:
        pytest.skip("threadpoolctl sees no BLAS behind NumPy")
    assert seen["before"] == [2] * len(seen["before"])
    assert seen["after_use"] == seen["before"]  # importing and using the engine leaves BLAS as it was
    assert seen["held"] and seen["configured"] == [1] * len(seen["before"])
