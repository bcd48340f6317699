"""fetch and submit through the real `kaggle` client (2.2.4 + kagglesdk) against the fake Kaggle server.

Every test checks what the client sent (tests.fake_kaggle records it) and that the dummy key appears in
no output and no file we wrote. Faults: 401, 403 (as HTTP 403 and inside an HTTP 200 body), 5xx retried
with backoff then given up on, a download cut short, a submission refused, an upload refused.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import fetch, kaggle_api, runs, submit
from pipeline.errors import UserError
from pipeline.fileio import write_json
from tests.fake_kaggle import FakeKaggle, isolate, point_client_at, proxy_env

REPO = Path(__file__).resolve().parent.parent
USER = "fake-user"
SECRET = "fake-kaggle-key-8b1e4a7f02"
TOKEN = "fake-access-token-c93d0e5a71"
FILES = {"train.csv": "label,pixel0\n1,0\n7,255\n", "test.csv": "pixel0\n0\n12\n",
         "sample_submission.csv": "ImageId,Label\n1,0\n2,0\n"}
DOWNLOAD = ["DownloadDataFiles", "GET /blobs/digit-recognizer.zip"]
TINY = 0.001  # base delay of the retries in tests: backoff without sleeping seconds


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch):
    """No real credentials or proxies; data/, runs/ and submissions/ under tmp_path/root."""
    isolate(tmp_path, monkeypatch)
    return tmp_path / "root"


@pytest.fixture
def fake(monkeypatch):
    """The fake Kaggle, reached in process, and the dummy credentials of its one user."""
    server = FakeKaggle(username=USER, key=SECRET, token=TOKEN, files=FILES).start()
    point_client_at(monkeypatch, server)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    yield server
    server.stop()
    assert not server.overflow, "the client looped past the fake server's request budget"


def assert_no_secret(root, *texts):
    """Neither the key nor the token in any text or in any file under root."""
    for text in texts:
        assert SECRET not in text and TOKEN not in text
    for path in Path(root).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and TOKEN.encode() not in data, path


def assert_nothing_left(root):
    """data/raw empty and no download temp folder beside it."""
    data = root / "data"
    assert not (data / "raw").exists() or not any((data / "raw").iterdir())
    assert not data.exists() or [p.name for p in data.iterdir() if p.name != "raw"] == []


# ---------------------------------------------------------------- download

def test_download_unzips_into_raw(fake, root, capsys):
    raw = root / "data" / "raw"
    during = []  # data/ and data/raw while the archive is being sent: it lands beside raw, never inside
    fake.on_request = lambda r: during.append((sorted(p.name for p in raw.parent.iterdir()), sorted(raw.iterdir())))
    assert fetch.main(["--source", "kaggle"]) == 0
    out = capsys.readouterr()
    assert during[-1][1] == [] and any(name.startswith(".kaggle-download-") for name in during[-1][0])
    assert sorted(p.name for p in raw.iterdir()) == sorted([*FILES, fetch.SOURCE_RECORD])
    for name, text in FILES.items():
        assert (raw / name).read_text() == text
    assert [p.name for p in (root / "data").iterdir()] == ["raw"]  # the temp folder is gone
    assert fake.rpcs() == DOWNLOAD
    post, get = fake.requests
    assert (post.method, post.path, post.body) == ("POST", "/v1/competitions.CompetitionApiService/DownloadDataFiles",
                                                   {"competitionName": "digit-recognizer"})
    assert post.auth == "basic" and get.method == "GET"
    assert_no_secret(root, out.out, out.err)


def test_access_token_is_introspected_then_sent_as_bearer(fake, root, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)
    kaggle_api.download_competition(root / "download")
    assert "IntrospectToken" in fake.rpcs() and fake.rpcs()[-2:] == DOWNLOAD
    assert fake.bodies("IntrospectToken")[-1] == {"token": "***"}  # sent in the body, masked in the log
    assert fake.requests[-2].auth == "bearer"


def test_5xx_is_retried_with_exponential_backoff(fake, root, monkeypatch, capsys):
    waits = []
    monkeypatch.setattr(kaggle_api.time, "sleep", waits.append)
    fake.fail("DownloadDataFiles", 503, times=2)
    fetch.fetch_kaggle(root / "data" / "raw", base_delay=0.5)
    assert waits == [0.5, 1.0]
    assert fake.rpcs() == ["DownloadDataFiles"] * 2 + DOWNLOAD
    err = capsys.readouterr().err
    assert "Kaggle: HTTP 503 while downloading competition 'digit-recognizer'; trying again in 0.5 s (retry 1/3)" in err
    assert sorted(p.name for p in (root / "data" / "raw").iterdir()) == sorted([*FILES, fetch.SOURCE_RECORD])


def test_5xx_gives_up_after_the_retries(fake, root):
    fake.fail("DownloadDataFiles", 502, times=50, message="Bad gateway")
    with pytest.raises(UserError) as info:
        fetch.fetch_kaggle(root / "data" / "raw", base_delay=TINY)
    assert str(info.value) == ("Kaggle answered HTTP 502 while downloading competition 'digit-recognizer' "
                               "(gave up after 4 tries): Bad gateway")
    assert fake.rpcs() == ["DownloadDataFiles"] * (kaggle_api.RETRIES + 1)
    assert_nothing_left(root)


def test_bad_credentials_are_one_line(fake, root, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_KEY", "wrong-" + SECRET)
    assert fetch.main(["--source", "kaggle"]) == 2
    out = capsys.readouterr()
    assert out.err == ("error: Kaggle refused the credentials while downloading competition 'digit-recognizer' "
                       f"(HTTP 401): check them ({kaggle_api.CREDENTIAL_HELP})\n")
    assert fake.rpcs() == ["DownloadDataFiles"]  # a 401 is not retried
    assert_nothing_left(root)
    assert_no_secret(root, out.out, out.err)


@pytest.mark.parametrize("in_body", [False, True], ids=["http-403", "code-403-in-http-200"])
def test_rules_not_accepted(fake, root, capsys, in_body):
    fake.fail("DownloadDataFiles", 403, message="You must accept this competition's rules", in_body=in_body)
    assert fetch.main(["--source", "kaggle"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: Kaggle answered 403 Forbidden while downloading competition 'digit-recognizer': accept "
                   "the competition rules at https://www.kaggle.com/competitions/digit-recognizer/rules with the "
                   "account of these credentials, then try again\n")
    assert_nothing_left(root)


def test_cut_short_download_is_retried(fake, root):
    fake.cut_short("/blobs/digit-recognizer.zip", times=1)
    fetch.fetch_kaggle(root / "data" / "raw", base_delay=TINY)
    assert fake.rpcs() == DOWNLOAD * 2
    assert (root / "data" / "raw" / "train.csv").read_text() == FILES["train.csv"]


def test_cut_short_download_leaves_nothing(fake, root):
    raw = root / "data" / "raw"
    fake.cut_short("/blobs/digit-recognizer.zip", times=50, keep=0.5)
    size = len(fake.blobs["digit-recognizer.zip"])
    with pytest.raises(UserError) as info:
        fetch.fetch_kaggle(raw, base_delay=TINY)
    assert str(info.value) == ("the download from Kaggle was cut short while downloading competition "
                               f"'digit-recognizer' (gave up after 4 tries): {size // 2} of {size} bytes arrived; "
                               "nothing was kept, try again")
    assert fake.rpcs() == DOWNLOAD * (kaggle_api.RETRIES + 1)
    assert_nothing_left(root)


def test_a_failed_download_keeps_the_earlier_files(fake, root):
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.csv").write_text("earlier\n")
    fake.fail("DownloadDataFiles", 500, times=50)
    with pytest.raises(UserError, match="HTTP 500"):
        fetch.fetch_kaggle(raw, base_delay=TINY)
    assert [p.name for p in raw.iterdir()] == ["train.csv"] and (raw / "train.csv").read_text() == "earlier\n"


def test_download_from_the_command_line_through_a_proxy(root):
    """A fresh process: KAGGLE_API_ENVIRONMENT=LOCALHOST and HTTP_PROXY, the test-only way in for the CLI."""
    with FakeKaggle(username=USER, key=SECRET, files=FILES) as server:
        env = proxy_env(server, os.environ)
        env.update(KAGGLE_USERNAME=USER, KAGGLE_KEY=SECRET, PYTHONPATH=str(REPO))
        ok = subprocess.run([sys.executable, "-m", "pipeline.fetch", "--source", "kaggle"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
        env["KAGGLE_KEY"] = "wrong"
        refused = subprocess.run([sys.executable, "-m", "pipeline.fetch", "--raw", str(root / "other")], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (root / "data" / "raw").iterdir()) == sorted([*FILES, fetch.SOURCE_RECORD])
    assert server.rpcs()[:2] == DOWNLOAD and all(r.proxied for r in server.requests)
    assert server.requests[0].path == "/api/v1/competitions.CompetitionApiService/DownloadDataFiles"
    assert refused.returncode == 2 and refused.stderr.startswith("error: Kaggle refused the credentials")
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert_no_secret(root, ok.stdout, ok.stderr, refused.stdout, refused.stderr)


# ---------------------------------------------------------------- submit

def _trained_run(root, name="r1", n=5):
    """The files `submit` reads: meta.json's test_rows and the run's test_probs.npz (no training needed)."""
    write_json(root / "data" / "processed" / "meta.json", {"test_rows": n})
    probs = np.eye(10, dtype=np.float32)[np.arange(n) % 10]
    runs.Run(name).write_probs(probs)  # recorded as made from the data of now
    write_json(root / "runs" / name / "summary.json", {"arch": "seed_small", "best_val_acc": 0.9912})


def test_submit_uploads_and_reports_the_answer(fake, root, capsys):
    _trained_run(root)
    assert submit.main(["--run", "r1", "--message", "first"]) == 0
    out = capsys.readouterr()
    csv = root / "submissions" / "submission.csv"
    assert "Successfully submitted to Digit Recognizer" in out.out
    assert fake.rpcs() == ["StartSubmissionUpload", "PUT /upload/blob-token-1", "CreateSubmission"]
    start = fake.bodies("StartSubmissionUpload")[0]
    assert start["competitionName"] == "digit-recognizer" and start["fileName"] == "submission.csv"
    assert start["contentLength"] == csv.stat().st_size
    # the client reads the date of the private copy it uploads, made after the CSV was written
    assert int(csv.stat().st_mtime) <= start["lastModifiedEpochSeconds"] <= time.time()
    assert fake.bodies("CreateSubmission") == [{"competitionName": "digit-recognizer", "blobFileTokens": "blob-token-1",
                                                "submissionDescription": "first | run r1 (seed_small), val acc 99.12%"}]
    assert fake.submissions[0]["bytes"] == csv.read_bytes()
    assert fake.requests[1].auth is None  # the upload URL is signed: no credentials go to the storage
    assert_no_secret(root, out.out, out.err)


def test_refused_submission_is_one_line_and_keeps_the_csv(fake, root, capsys):
    _trained_run(root)
    fake.fail("CreateSubmission", 400, message="You have exceeded your daily submission limit")
    assert submit.main(["--run", "r1"]) == 2
    out = capsys.readouterr()
    assert out.err == ("error: Kaggle answered HTTP 400 while submitting: "
                       "You have exceeded your daily submission limit\n")
    # complete, nothing partial (.run and .submission.json: the run it was written from)
    assert sorted(p.name for p in (root / "submissions").iterdir()) == [".run", ".submission.json", ".upload.lock",
                                                                        "submission.csv"]
    assert_no_secret(root, out.out, out.err)


def test_submit_retries_before_the_upload_but_never_the_creation(fake, root, capsys):
    csv = root / "submission.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("ImageId,Label\n1,3\n")
    fake.fail("StartSubmissionUpload", 503, times=1)
    assert kaggle_api.submit(csv, "retry", base_delay=TINY) == "Successfully submitted to Digit Recognizer"
    assert fake.rpcs() == ["StartSubmissionUpload"] * 2 + ["PUT /upload/blob-token-1", "CreateSubmission"]

    fake.requests.clear()
    fake.fail("CreateSubmission", 500, times=5)
    with pytest.raises(UserError) as info:
        kaggle_api.submit(csv, "no double", base_delay=TINY)
    assert fake.rpcs().count("CreateSubmission") == 1
    assert str(info.value) == ("Kaggle answered HTTP 500 while submitting: fake error 500; not retried, since Kaggle "
                               "may have acted on it: check https://www.kaggle.com/competitions/digit-recognizer/"
                               "submissions before submitting again")


def test_refused_upload_is_explained(fake, root):
    csv = root / "submission.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("ImageId,Label\n1,3\n")
    fake.fail("/upload/", 403, message="signature expired")
    with pytest.raises(UserError) as info:
        kaggle_api.submit(csv, "x", base_delay=TINY)
    assert str(info.value) == "Kaggle did not accept the submission: Could not submit to competition"
    assert "CreateSubmission" not in fake.rpcs()


def test_secrets_are_scrubbed_in_every_form(monkeypatch):
    import base64

    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    header = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    assert kaggle_api.scrub(f"key {SECRET} header Basic {header}") == "key *** header Basic ***"


# ---------------------------------------------------------------- misuse (issue 12)

def test_a_world_readable_kaggle_json_is_warned_about(fake, root, monkeypatch, capsys):
    folder = Path(os.environ["HOME"]) / ".kaggle"
    folder.mkdir()
    (folder / "kaggle.json").write_text(json.dumps({"username": USER, "key": SECRET}))
    (folder / "kaggle.json").chmod(0o644)
    kaggle_api.download_competition(root / "download")
    err = capsys.readouterr().err
    assert "warning: Your Kaggle API key is readable by other users" in err and "chmod 600" in err
    assert SECRET not in err


def test_a_name_that_does_not_resolve_is_not_retried(monkeypatch):
    import socket

    import requests
    from urllib3.exceptions import MaxRetryError, NameResolutionError

    waits, tries = [], []

    def action():
        tries.append(1)
        reason = NameResolutionError("www.kaggle.com", None, socket.gaierror(-3, "Temporary failure in name resolution"))
        raise requests.ConnectionError(MaxRetryError(None, "/v1/x", reason=reason))

    with pytest.raises(UserError, match="does not resolve") as info:
        kaggle_api.with_retries(action, "downloading", retries=3, base_delay=5, sleep=waits.append)
    assert tries == [1] and waits == []
    assert "\n" not in str(info.value)


def test_fetch_kaggle_replaces_an_offline_copy_and_records_its_source(fake, root, capsys):
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    for name in ("train.csv", "test.csv", "test_labels.csv"):
        (raw / name).write_text("offline\n")
    (raw / fetch.SOURCE_RECORD).write_text(json.dumps({"source": "mnist"}))
    assert fetch.main(["--source", "kaggle", "--if-needed"]) == 0
    assert "holds the competition from source mnist; fetching it from kaggle" in capsys.readouterr().out
    assert (raw / "train.csv").read_text() == FILES["train.csv"] and not (raw / "test_labels.csv").exists()
    assert fetch.current_source(raw) == "kaggle"
    requests = len(fake.requests)
    assert fetch.main(["--source", "kaggle", "--if-needed"]) == 0  # now it is there: nothing to do
    assert len(fake.requests) == requests


def test_a_stalled_connection_is_given_up_in_one_line_not_waited_on_for_ever(fake, root, monkeypatch):
    # the client sends every request without a timeout: a server that stops answering hung `make fetch` for ever
    import time

    monkeypatch.setattr(kaggle_api, "TIMEOUT", (5, 0.3))
    fake.on_request = lambda request: time.sleep(1.5) if request.rpc == "DownloadDataFiles" else None
    started = time.monotonic()
    with pytest.raises(UserError, match=r"could not reach Kaggle while downloading .*gave up after 2 tries"):
        kaggle_api.download_competition(root / "download", retries=1, base_delay=0.01)
    assert time.monotonic() - started < 10


def test_a_submission_whose_answer_never_came_says_it_may_have_been_made(fake, root, monkeypatch):
    # a connection lost after CreateSubmission went out read "could not reach Kaggle": the user submitted again
    import time

    csv = root / "submission.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("ImageId,Label\n1,3\n")
    monkeypatch.setattr(kaggle_api, "TIMEOUT", (5, 0.3))
    fake.on_request = lambda request: time.sleep(1.5) if request.rpc == "CreateSubmission" else None
    with pytest.raises(UserError, match="not retried, since Kaggle may have acted on it"):
        kaggle_api.submit(csv, "x", base_delay=TINY)
    assert fake.rpcs().count("CreateSubmission") == 1
