"""The tuning table (pipeline/nn/tuning.py): every entry is justified and used, and nothing else in the
engine hides a threshold of its own."""
import ast
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.nn import conv, tuning
from tests.test_nn_ops import assert_conv_backward_equals_naive

NN = Path(__file__).resolve().parents[1] / "pipeline" / "nn"


def entries():
    """{name: comment lines above it} for every constant of tuning.py."""
    lines = (NN / "tuning.py").read_text().splitlines()
    found = {}
    for node in ast.parse("\n".join(lines)).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            comment, k = [], node.lineno - 2
            while k >= 0 and lines[k].startswith("#"):
                comment.insert(0, lines[k].lstrip("# "))
                k -= 1
            found[node.targets[0].id] = " ".join(comment)
    return found


def test_every_entry_has_its_measurement_or_says_it_has_none():
    table = entries()
    assert len(table) >= 10
    for name, comment in table.items():
        assert name.isupper(), name
        assert re.search(r"\d.*(ms|MiB|MB|x)\b|not recorded; re-measure with make bench", comment), name


def test_every_entry_is_read_by_the_engine():
    sources = {p.name: p.read_text() for p in NN.glob("*.py") if p.name != "tuning.py"}
    for name in entries():
        users = [f for f, text in sources.items() if re.search(rf"\btuning\.{name}\b", text)]
        assert users, f"tuning.{name} is used nowhere in pipeline/nn"


def test_no_op_file_keeps_a_threshold_of_its_own():
    """Module-level numeric constants outside tuning.py would be thresholds the table misses."""
    for path in NN.glob("*.py"):
        if path.name == "tuning.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Constant, ast.BinOp)):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
                value = node.value
                numeric = isinstance(value, ast.BinOp) or (isinstance(value, ast.Constant)
                                                           and isinstance(value.value, (int, float))
                                                           and not isinstance(value.value, bool))
                assert not (numeric and any(n.isupper() for n in names)), f"{path.name}: {names}"


@pytest.mark.parametrize("route", ["correlation", "rows", "shifted"])
def test_each_stride1_backward_route_the_table_can_pick_equals_naive(monkeypatch, route):
    """Forcing each route through the table (not by calling it directly) gives the naive gradients."""
    forced = {"correlation": dict(CORRELATION_MIN_CHANNELS=0, CORRELATION_MAX_INPUT_RATIO=10.0),
              "rows": dict(CORRELATION_MIN_CHANNELS=99, ROWS_MAX_CHANNELS=99, ROWS_MAX_WIDTH_KERNELS=99),
              "shifted": dict(CORRELATION_MIN_CHANNELS=99, ROWS_MAX_CHANNELS=0)}[route]
    monkeypatch.setattr(tuning, "KEEP_COLUMNS_BYTES", 0)
    for name, value in forced.items():
        monkeypatch.setattr(tuning, name, value)
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((3, 9, 8, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal(4)
    pad = (1, 1, 0, 1)
    expected = route if route == "correlation" else "columns"
    assert conv.backward_route(w.shape, x.shape, 1, pad, True, False, True, np) == expected
    if route != "correlation":
        assert conv.input_grad_route(w.shape, x.shape, 1, pad, np) == route
    assert_conv_backward_equals_naive(rng, x, w, b, pad)


def test_the_one_thread_weight_gradient_route():
    w_shape = (5, 5, 1, 6)  # lenet5's first convolution: K = 26 columns, 6 filters
    assert conv.backward_route(w_shape, (128, 28, 28, 1), 1, 2, True, True, False, np) == "columns, one thread"
    assert conv.backward_route(w_shape, (128, 28, 28, 1), 1, 2, True, True, True, np) == "columns"      # dx too
    assert conv.backward_route(w_shape, (128, 28, 28, 1), 1, 2, True, False, False, np) == "columns"    # rebuilt
    assert conv.backward_route((3, 3, 32, 32), (128, 26, 26, 32), 1, 0, False, False, True, np) == "correlation"
