"""A thin wrapper over the official `kaggle` client (2.2.4): credentials, competition download, submit, kernels.

Why a wrapper: importing `kaggle` without credentials prints a help text and its `authenticate()` calls
exit(1); its errors are raw HTTP exceptions. Here the client is imported only once credentials exist,
its stdout noise is captured, and every failure becomes one UserError line that never holds a secret.

Transient failures (HTTP 5xx or 429, a broken connection, a download cut short) are tried again up to
`retries` times, waiting base_delay, 2 * base_delay, 4 * base_delay ... seconds. Calls that create
something on Kaggle (CreateSubmission, SaveKernel) are never repeated: a 5xx may come after the
server acted, and a second try would spend a submission or make a second kernel version.
"""
import base64
import contextlib
import io
import os
import re
import sys
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.fileio import json_loads

COMPETITION = "digit-recognizer"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
SUBMISSIONS_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/submissions"
CREDENTIAL_HELP = ("put kaggle.json in ~/.kaggle (or KAGGLE_CONFIG_DIR), or set KAGGLE_USERNAME and KAGGLE_KEY, "
                   "or KAGGLE_API_TOKEN")
RETRIES = 3          # tries after the first one, for transient failures only
BASE_DELAY = 2.0     # seconds before the first retry; doubles each time (2, 4, 8)
TIMEOUT = (15, 300)  # seconds to connect, and at most between two reads of an answer: then a Timeout, retried
# RPCs that create something: a retry after a 5xx could submit twice or push a second version.
NOT_RETRIED = {"CreateSubmission": f"check {SUBMISSIONS_URL} before submitting again",
               "SaveKernel": "check your kernels on Kaggle before pushing again"}


def _home() -> Path:
    return Path(os.path.expanduser("~"))


def _config_dirs():
    """Where the client looks for kaggle.json: KAGGLE_CONFIG_DIR, else ~/.kaggle when that folder exists (even
    without a kaggle.json in it), else the XDG folder."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return [Path(os.environ["KAGGLE_CONFIG_DIR"])]
    if (_home() / ".kaggle").is_dir():
        return [_home() / ".kaggle"]
    return [Path(os.environ.get("XDG_CONFIG_HOME") or _home() / ".config") / "kaggle"]


def kaggle_json_problem(path):
    """Why the kaggle.json at `path` cannot log in (the client only says it found no credentials), or None."""
    try:
        data = json_loads(Path(path).read_text())
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    except ValueError as exc:  # bad JSON, or not UTF-8
        return f"is not valid JSON ({str(exc).splitlines()[0][:120]})"
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] for k in ("username", "key")):
        return 'lacks "username" or "key" (Kaggle\'s Settings > API > Create New Token writes both)'
    return None


def _token_files():
    """Access-token and OAuth files the client reads from ~/.kaggle whatever KAGGLE_CONFIG_DIR says."""
    folder = _home() / ".kaggle"
    return [folder / "access_token", folder / "access_token.txt", folder / "credentials.json"]


def has_credentials() -> bool:
    """True when the kaggle client would find credentials (nothing is imported or sent)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    for path in (folder / "kaggle.json" for folder in _config_dirs()):
        if path.is_file():
            problem = kaggle_json_problem(path)
            if problem:  # meant as credentials: said, rather than the mnist copy fetched or no upload made unsaid
                raise UserError(f"{path} {problem}: fix it, or move it away to work without Kaggle")
            return True
    return any(path.is_file() and path.stat().st_size > 0 for path in _token_files())


def _kaggle_jsons():
    """Every readable kaggle.json, as dicts, in the client's order of precedence."""
    for folder in _config_dirs():
        try:
            data = json_loads((folder / "kaggle.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            yield data


def _kaggle_json():
    """The first readable kaggle.json as a dict ({} when none)."""
    return next(_kaggle_jsons(), {})


def local_username():
    """The Kaggle username the credentials name without asking the server (KAGGLE_USERNAME or kaggle.json), or None."""
    name = os.environ.get("KAGGLE_USERNAME") or _kaggle_json().get("username")
    return name if isinstance(name, str) and name else None


def _secrets():
    """Every credential value we can see (and its HTTP basic form), so that none is ever echoed back."""
    found = [os.environ.get(name) for name in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    pairs = [(os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY"))]
    for data in _kaggle_jsons():
        found.append(data.get("key"))
        pairs.append((data.get("username"), data.get("key")))
    for path in _token_files()[:2]:
        try:
            found.append(path.read_text().strip())
        except OSError:
            pass
    for user, key in pairs:
        if isinstance(user, str) and isinstance(key, str):  # the Authorization header a verbose client prints
            found.append(base64.b64encode(f"{user}:{key}".encode()).decode())
    return sorted({s for s in found if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True)


def scrub(text) -> str:
    """`text` with every known credential value replaced by ***."""
    text = str(text)
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------- what went wrong

def _response(exc):
    """The HTTP response behind a client exception; the HTTPError of a ValueError the client raised over it."""
    response = getattr(exc, "response", None)
    if response is None and isinstance(exc, ValueError):
        response = getattr(exc.__context__, "response", None)  # kernels_status/output turn 401/403 into ValueError
    return response


def _body(response):
    """The JSON answer as a dict, or {} (Kaggle's errors look like {"code": 403, "message": "..."})."""
    try:
        body = response.json()
    except Exception:  # noqa: BLE001 (not JSON, streamed, or a stand-in without .json)
        return {}
    return body if isinstance(body, dict) else {}


def _status(exc):
    """The HTTP status Kaggle meant: the JSON "code" (sent even with HTTP 200), else the status line's."""
    response = _response(exc)
    if response is None:
        return None
    code = _body(response).get("code")
    if isinstance(code, int) and code >= 400:
        return code
    return getattr(response, "status_code", None)


def _rpc(exc):
    """The Kaggle method of the failed request ('CreateSubmission'), or None when unknown."""
    request = getattr(exc, "request", None) or getattr(_response(exc), "request", None)
    url = getattr(request, "url", None)
    return url.rstrip("/").rsplit("/", 1)[-1] if isinstance(url, str) and "/v1/" in url else None


def _cut_short(exc):
    """Did a download end before its Content-Length? (urllib3 raises, or the client's size check does)."""
    try:
        from requests.exceptions import ChunkedEncodingError
    except ImportError:
        return False
    return isinstance(exc, ChunkedEncodingError) or (
        isinstance(exc, ValueError) and "does not match expected size" in str(exc))


def _transient(exc):
    """Worth another try: a 5xx or 429 answer, a refused or broken connection, a download cut short."""
    try:
        import requests
    except ImportError:
        return False
    if _rpc(exc) in NOT_RETRIED:
        return False
    if isinstance(exc, requests.HTTPError):
        status = _status(exc)
        return status is not None and (status >= 500 or status == 429)
    if _name_not_resolved(exc):
        return False
    return isinstance(exc, (requests.ConnectionError, requests.Timeout)) or _cut_short(exc)


def _name_not_resolved(exc):
    """A DNS failure (no network, or a wrong host): waiting seconds will not resolve it."""
    import socket

    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError":
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None)]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return False


def _detail(exc):
    """What the server or the connection said, one line, scrubbed."""
    message = _body(_response(exc)).get("message") if _response(exc) is not None else None
    text = message if isinstance(message, str) and message else str(exc)
    got = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", text)
    if got:
        text = f"{got.group(1)} of {int(got.group(1)) + int(got.group(2))} bytes arrived"
    return " ".join(scrub(text).split())


def explain(exc, doing, tries=1, forbidden=None, missing=None) -> UserError:
    """Map a client exception to one user-facing line.

    `doing` says what we were doing; `tries` how many attempts were made; `forbidden` and `missing`
    replace the default 403 (accept the rules) and 404 (no such competition) messages.
    """
    status = _status(exc)
    after = f" (gave up after {tries} tries)" if tries > 1 else ""
    # a request that creates something, failed after it went out (a 5xx, a connection lost): it may have been made
    acted = f"; not retried, since Kaggle may have acted on it: {NOT_RETRIED[_rpc(exc)]}" \
        if _rpc(exc) in NOT_RETRIED else ""
    if status == 401:
        return UserError(f"Kaggle refused the credentials while {doing} (HTTP 401): check them ({CREDENTIAL_HELP})")
    if status == 403:
        return UserError(forbidden or f"Kaggle answered 403 Forbidden while {doing}: accept the competition rules at "
                                      f"{RULES_URL} with the account of these credentials, then try again")
    if status == 404:
        return UserError(missing or f"Kaggle answered 404 Not Found while {doing}: "
                                    f"competition '{COMPETITION}' not found")
    if status is not None:
        return UserError(f"Kaggle answered HTTP {status} while {doing}{after}: {_detail(exc)}"
                         f"{acted if status >= 500 else ''}")
    if _cut_short(exc):
        return UserError(f"the download from Kaggle was cut short while {doing}{after}: {_detail(exc)}; "
                         f"nothing was kept, try again")
    kind = type(exc).__name__
    if _name_not_resolved(exc):
        return UserError(f"could not reach Kaggle while {doing}: its name does not resolve (no network, or DNS "
                         f"is down); not retried: check the connection, then try again")
    if "Connection" in kind or "Timeout" in kind or isinstance(exc, OSError):
        return UserError(f"could not reach Kaggle while {doing}{after}: {scrub(exc)}{acted}")
    return UserError(f"the Kaggle client failed while {doing}: {kind}: {scrub(exc)}")


def _note(message):
    print(message, file=sys.stderr, flush=True)


def with_retries(action, doing, retries=RETRIES, base_delay=BASE_DELAY, sleep=None, log=_note, **explain_kw):
    """Run action() with the client's prints captured; transient failures are tried again (see the module doc).

    Returns what action returns and the client's captured stdout; raises one UserError otherwise.
    """
    for attempt in range(retries + 1):
        try:
            with _quiet() as out:
                return action(), out.getvalue()
        except SystemExit:
            raise UserError(f"the Kaggle client gave up while {doing}") from None
        except Exception as exc:  # noqa: BLE001 (every client failure becomes one line)
            if attempt < retries and _transient(exc):
                delay = base_delay * 2 ** attempt
                status = _status(exc)
                what = f"HTTP {status}" if status else ("download cut short" if _cut_short(exc) else type(exc).__name__)
                log(f"Kaggle: {what} while {doing}; trying again in {delay:g} s (retry {attempt + 1}/{retries})")
                (sleep or time.sleep)(delay)
                continue
            raise explain(exc, doing, tries=attempt + 1, **explain_kw) from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _quiet():
    """Swallow the client's prints (help texts, progress) so our stages say things their own way, and bound
    every request it sends in time (it sets none: a stalled connection hung the stage for ever)."""
    with contextlib.redirect_stdout(io.StringIO()) as out, _bounded_requests():
        yield out


@contextlib.contextmanager
def _bounded_requests():
    """requests.Session.send with TIMEOUT wherever the caller gave none, for the block."""
    try:
        import requests
    except ImportError:  # no client installed: _client says so
        yield
        return
    real = requests.Session.send

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = TIMEOUT
        return real(self, request, **kwargs)

    requests.Session.send = send
    try:
        yield
    finally:
        requests.Session.send = real


_API_CLASS = None


def _api_class():
    """KaggleApi whose downloads make one attempt each: with_retries does the retrying, with short waits.

    The client's own loop sleeps 2**k + random() seconds (up to a minute) and appends to the partial file.
    """
    global _API_CLASS
    if _API_CLASS is None:
        from kaggle.api.kaggle_api_extended import KaggleApi

        class OneTryDownloads(KaggleApi):
            def download_file(self, response, outfile, http_client, quiet=True, resume=False, chunk_size=1048576,
                              max_retries=5, timeout=300):
                return super().download_file(response, outfile, http_client, quiet, False, chunk_size, 0, timeout)

        _API_CLASS = OneTryDownloads
    return _API_CLASS


def _client():
    """An authenticated KaggleApi; the import happens here, never at module import."""
    if not has_credentials():
        raise UserError(f"no Kaggle credentials: {CREDENTIAL_HELP}")
    try:
        with _quiet():
            # lazy: importing kaggle runs its own login, which prints help and exits without credentials
            api = _api_class()()
            api.authenticate()
    except SystemExit:
        raise UserError(f"the Kaggle client found no usable credentials: {CREDENTIAL_HELP}") from None
    except ImportError as exc:
        raise UserError(f"the kaggle package is not installed ({exc}): run `make venv`") from None
    except Exception as exc:  # noqa: BLE001 (token introspection talks to the server)
        raise explain(exc, "logging in") from None
    _warn_readable_credentials()  # the client prints this warning to the stdout we swallow: say it ourselves
    return api


def _warn_readable_credentials():
    for folder in _config_dirs():
        path = folder / "kaggle.json"
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & 0o044:
            _note(f"warning: Your Kaggle API key is readable by other users on this system: run `chmod 600 {path}`")
        return


# ---------------------------------------------------------------- competition

def download_competition(folder, retries=RETRIES, base_delay=BASE_DELAY) -> list:
    """Download the competition's files into `folder` (zip archives as the server sends them).

    Requests: POST competitions.CompetitionApiService/DownloadDataFiles {competitionName}, answered by a
    redirect the client follows with a GET (Content-Length checked). Returns the paths in `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    api = _client()
    with_retries(lambda: api.competition_download_files(COMPETITION, path=str(folder), force=True, quiet=True),
                 f"downloading competition '{COMPETITION}'", retries, base_delay)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".kaggle-partial"))


def submit(csv_path, message, retries=RETRIES, base_delay=BASE_DELAY) -> str:
    """Upload a submission CSV to the competition; returns the server's message.

    Requests: StartSubmissionUpload {competitionName, contentLength, lastModifiedEpochSeconds, fileName}
    -> {token, createUrl}; PUT createUrl with the bytes; CreateSubmission {competitionName, blobFileTokens,
    submissionDescription} -> {message, ref}. The client does not raise when the PUT fails: it returns
    "Could not submit to competition", turned into a UserError here.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: no such submission file")
    api = _client()
    response, printed = with_retries(lambda: api.competition_submit(str(csv_path), message, COMPETITION, quiet=True),
                                     "submitting", retries, base_delay)
    text = getattr(response, "message", response)
    text = "" if text is None else str(text)
    failed = getattr(api, "COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE", "Could not submit to competition")
    if not text or text.startswith(failed) or text.lower().startswith("could not"):
        lines = [line for line in printed.splitlines() if line.strip()]
        detail = f" ({scrub(lines[-1])})" if lines else ""
        raise UserError(f"Kaggle did not accept the submission: {scrub(text) or 'no answer'}{detail}")
    return scrub(text)


# ---------------------------------------------------------------- kernels

def _kernel_errors(kernel_id):
    return {"forbidden": f"Kaggle answered 403 Forbidden for kernel '{kernel_id}': it belongs to another account "
                         f"or the id in kernel-metadata.json is wrong",
            "missing": f"Kaggle answered 404 Not Found: no kernel '{kernel_id}' (push it first: `make kernel-push`)"}


def kernel_owner():
    """The username Kaggle knows these credentials by (asks the server for an access token's owner)."""
    api = _client()
    return api.get_config_value("username") or local_username()


def push_kernel(folder, kernel_id, retries=RETRIES, base_delay=BASE_DELAY) -> dict:
    """Push the kernel folder (kernel-metadata.json + notebook): {ref, url, version}.

    Request: POST kernels.KernelsApiService/SaveKernel {slug, newTitle, text, language, kernelType,
    isPrivate, enableGpu, enableInternet, competitionDataSources, ...}; never repeated (see NOT_RETRIED).
    """
    api = _client()
    response, _ = with_retries(lambda: api.kernels_push(str(folder)), f"pushing kernel '{kernel_id}'",
                               retries, base_delay, **_kernel_errors(kernel_id))
    error = getattr(response, "error", None)
    if error:
        raise UserError(f"Kaggle refused kernel '{kernel_id}': {scrub(error)}")
    invalid = list(getattr(response, "invalid_competition_sources", None) or [])
    if invalid:
        raise UserError(f"kernel '{kernel_id}' was pushed but Kaggle could not attach {', '.join(invalid)}: accept "
                        f"the competition rules at {RULES_URL}, then push again")
    invalid = list(getattr(response, "invalid_kernel_sources", None) or [])
    if invalid:
        raise UserError(f"kernel '{kernel_id}' was pushed but Kaggle could not attach the output of "
                        f"{', '.join(invalid)}: a kernel has an output to attach once one of its versions has run "
                        f"(push without CONTINUE=1 first)")
    return {"ref": response.ref, "url": response.url, "version": response.version_number}


def kernel_status(kernel_id, retries=RETRIES, base_delay=BASE_DELAY):
    """(status, failure message or None) of the kernel's latest run; status is lower case:
    queued, running, complete, error, cancel_requested, cancel_acknowledged or new_script.

    Request: POST kernels.KernelsApiService/GetKernelSessionStatus {userName, kernelSlug}.
    """
    api = _client()
    response, _ = with_retries(lambda: api.kernels_status(kernel_id), f"asking the status of kernel '{kernel_id}'",
                               retries, base_delay, **_kernel_errors(kernel_id))
    status = getattr(response.status, "name", str(response.status)).lower()
    return status, (scrub(response.failure_message) if response.failure_message else None)


def download_kernel_output(kernel_id, folder, file_pattern=None, retries=RETRIES, base_delay=BASE_DELAY) -> list:
    """Download the files of the kernel's latest run whose names match `file_pattern` (a regex) into `folder`.

    Requests: POST kernels.KernelsApiService/ListKernelSessionOutput {userName, kernelSlug, pageSize}
    -> {files: [{fileName, url}], log}; a GET of each matching url. The client writes the run's log as
    <slug>.log beside them. Returns the paths in `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    api = _client()
    with_retries(lambda: api.kernels_output(kernel_id, str(folder), file_pattern=file_pattern, force=True, quiet=True),
                 f"downloading the output of kernel '{kernel_id}'", retries, base_delay, **_kernel_errors(kernel_id))
    return sorted(p for p in folder.iterdir() if p.is_file())
