"""A thin wrapper over the official `kaggle` client (2.2.4): credentials, competition download, submit.

Why a wrapper: importing `kaggle` without credentials prints a help text and its `authenticate()` calls
exit(1); its errors are raw HTTP exceptions. Here the client is imported only once credentials exist,
its stdout noise is captured, and every failure becomes one UserError line that never holds a secret.
"""
import contextlib
import io
import json
import os
from pathlib import Path

from pipeline.errors import UserError

COMPETITION = "digit-recognizer"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
CREDENTIAL_HELP = ("put kaggle.json in ~/.kaggle (or KAGGLE_CONFIG_DIR), or set KAGGLE_USERNAME and KAGGLE_KEY, "
                   "or KAGGLE_API_TOKEN")


def _home() -> Path:
    return Path(os.path.expanduser("~"))


def _config_dirs():
    """Where the client looks for kaggle.json: KAGGLE_CONFIG_DIR, else ~/.kaggle, else the XDG folder."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return [Path(os.environ["KAGGLE_CONFIG_DIR"])]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or _home() / ".config") / "kaggle"
    return [_home() / ".kaggle", xdg]


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
    if any((folder / "kaggle.json").is_file() for folder in _config_dirs()):
        return True
    return any(path.is_file() and path.stat().st_size > 0 for path in _token_files())


def _secrets():
    """Every credential value we can see, so that none is ever echoed back."""
    found = [os.environ.get(name) for name in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    for folder in _config_dirs():
        try:
            found.append(json.loads((folder / "kaggle.json").read_text()).get("key"))
        except (OSError, ValueError, AttributeError):
            pass
    for path in _token_files()[:2]:
        try:
            found.append(path.read_text().strip())
        except OSError:
            pass
    return [s for s in found if isinstance(s, str) and len(s) >= 4]


def scrub(text) -> str:
    """`text` with every known credential value replaced by ***."""
    text = str(text)
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def explain(exc, doing) -> UserError:
    """Map a client exception to one user-facing line (`doing` says what we were doing)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status == 401:
        return UserError(f"Kaggle refused the credentials while {doing} (HTTP 401): check them ({CREDENTIAL_HELP})")
    if status == 403:
        return UserError(f"Kaggle answered 403 Forbidden while {doing}: accept the competition rules at "
                         f"{RULES_URL} with the account of these credentials, then try again")
    if status == 404:
        return UserError(f"Kaggle answered 404 Not Found while {doing}: competition '{COMPETITION}' not found")
    if status is not None:
        return UserError(f"Kaggle answered HTTP {status} while {doing}: {scrub(exc)}")
    kind = type(exc).__name__
    if "Connection" in kind or "Timeout" in kind or isinstance(exc, OSError):
        return UserError(f"could not reach Kaggle while {doing}: {scrub(exc)}")
    return UserError(f"the Kaggle client failed while {doing}: {kind}: {scrub(exc)}")


@contextlib.contextmanager
def _quiet():
    """Swallow the client's prints (help texts, progress) so our stages say things their own way."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        yield out


def _client():
    """An authenticated KaggleApi; the import happens here, never at module import."""
    if not has_credentials():
        raise UserError(f"no Kaggle credentials: {CREDENTIAL_HELP}")
    try:
        with _quiet():
            # lazy: importing kaggle runs its own login, which prints help and exits without credentials
            from kaggle.api.kaggle_api_extended import KaggleApi
            api = KaggleApi()
            api.authenticate()
    except SystemExit:
        raise UserError(f"the Kaggle client found no usable credentials: {CREDENTIAL_HELP}") from None
    except ImportError as exc:
        raise UserError(f"the kaggle package is not installed ({exc}): run `make venv`") from None
    except Exception as exc:  # noqa: BLE001 (token introspection talks to the server)
        raise explain(exc, "logging in") from None
    return api


def download_competition(folder) -> list:
    """Download the competition's files into `folder` (zip archives as the server sends them).

    Returns the paths of the files that appeared in `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    api = _client()
    try:
        with _quiet():
            api.competition_download_files(COMPETITION, path=str(folder), force=True, quiet=True)
    except SystemExit:
        raise UserError("the Kaggle client gave up while downloading the competition files") from None
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, f"downloading competition '{COMPETITION}'") from None
    return sorted(p for p in folder.iterdir() if p.is_file())


def submit(csv_path, message) -> str:
    """Upload a submission CSV to the competition; returns the server's message.

    The client does not raise when the upload fails: it returns "Could not submit to competition".
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: no such submission file")
    api = _client()
    try:
        with _quiet() as out:
            response = api.competition_submit(str(csv_path), message, COMPETITION, quiet=True)
    except SystemExit:
        raise UserError("the Kaggle client gave up while submitting") from None
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, "submitting") from None
    text = getattr(response, "message", response)
    text = "" if text is None else str(text)
    failed = getattr(api, "COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE", "Could not submit to competition")
    if not text or text.startswith(failed) or text.lower().startswith("could not"):
        printed = [line for line in out.getvalue().splitlines() if line.strip()]
        detail = f" ({scrub(printed[-1])})" if printed else ""
        raise UserError(f"Kaggle did not accept the submission: {scrub(text) or 'no answer'}{detail}")
    return scrub(text)
