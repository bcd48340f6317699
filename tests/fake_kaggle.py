"""A fake Kaggle API server on 127.0.0.1 (an ephemeral port, a thread) for driving the real `kaggle` client.

It speaks what kaggle 2.2.4 / kagglesdk 0.1.37 send: `POST <base>/v1/<service>/<Method>` with a camelCase
JSON body, HTTP basic (username/key) or bearer (access token) auth; answers are JSON, errors look like
Kaggle's `{"code": 403, "message": "..."}`. Blob traffic is plain: GET /blobs/<name> (downloads, after a
302) and PUT /upload/<token> (submission bytes). Request lines may be absolute URLs, so the server also
works as the HTTP proxy of a client run with KAGGLE_API_ENVIRONMENT=LOCALHOST in a subprocess.

Every request is recorded (method, path, RPC name, JSON body, whether an Authorization header came and of
which kind: never its value). Faults are scripted per test with `fail(...)` and `cut_short(...)`.
Bounded: after MAX_REQUESTS requests every answer is a 500, so a client stuck in a loop ends.

    with FakeKaggle(username="user", key="k", files={"train.csv": "..."}) as fake:
        fake.fail("DownloadDataFiles", 503, times=2)
        ... drive the client at fake.url ...
        fake.rpcs()  -> ["DownloadDataFiles", "DownloadDataFiles", "DownloadDataFiles"]
"""
import base64
import io
import json
import os
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

COMPETITION = "digit-recognizer"
MAX_REQUESTS = 200
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")   # and their upper-case forms


def isolate(tmp_path, monkeypatch):
    """No real credentials, proxies or kernel settings reach a test: an empty HOME, no KAGGLE_*/DIGIT_*
    variables, and data/, runs/, submissions/ under tmp_path/root. Returns the empty home folder."""
    for name in list(os.environ):
        if name.startswith(("KAGGLE_", "DIGIT_")) or name.lower() in PROXY_VARS:
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path / "root"))
    return home


@dataclass
class Fault:
    """Answer requests matching `target` (an RPC name or a path prefix) with `status`, `times` times."""
    target: str
    status: int = 500
    times: int = 1
    message: str = ""
    in_body: bool = False   # HTTP 200 with {"code": status} in the JSON, as Kaggle sometimes answers
    keep: float = -1.0      # >= 0: a cut-short body, this fraction of the bytes then the connection closes


@dataclass
class Recorded:
    method: str
    path: str
    rpc: str | None
    body: object
    auth: str | None        # "basic", "bearer" or None: whether credentials came, never what they were
    proxied: bool           # the request line held an absolute URL (the client used us as its proxy)


@dataclass
class KernelState:
    statuses: list = field(default_factory=lambda: ["COMPLETE"])   # answered in turn, the last one repeats
    failure_message: str = ""
    outputs: dict = field(default_factory=dict)                      # file name -> bytes
    log: str = ""
    pushed: list = field(default_factory=list)                       # SaveKernel bodies


def competition_zip(files):
    """The competition archive: {name: text} zipped, as Kaggle's download sends it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), files[name])
    return buf.getvalue()


class FakeKaggle:
    def __init__(self, username="fake-user", key=None, token=None, files=None, kernel=None):
        self.username, self.key, self.token = username, key, token
        self.blobs = {f"{COMPETITION}.zip": competition_zip(files or {})}
        self.kernel = kernel or KernelState()
        self.requests: list[Recorded] = []
        self.uploads: dict[str, bytes] = {}
        self.submissions: list[dict] = []
        self.faults: list[Fault] = []
        self.overflow = False
        self.on_request = None   # a test's callback(Recorded), called before each answer (e.g. to look at disk)
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    # -------------------------------------------------------------- scripting
    def fail(self, target, status, times=1, message="", in_body=False):
        """The next `times` requests to `target` get `status` (Kaggle's JSON error body)."""
        self.faults.append(Fault(target, status, times, message or f"fake error {status}", in_body))

    def cut_short(self, target, times=1, keep=0.5):
        """The next `times` GETs of `target` send Content-Length in full but only `keep` of the bytes."""
        self.faults.append(Fault(target, 200, times, keep=keep))

    def rpcs(self):
        """The RPC names, or 'METHOD /path' for blob traffic, in the order they came."""
        return [r.rpc or f"{r.method} {r.path}" for r in self.requests]

    def bodies(self, rpc):
        return [r.body for r in self.requests if r.rpc == rpc]

    # -------------------------------------------------------------- lifecycle
    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        fake = self

        class Handler(_Handler):
            server_fake = fake

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                # a handler still writing to a client that gave up (the timeout tests) outlives its test: its
                # traceback went to stderr, into whichever test captured it then (a flaky one-line check)
                fake.handler_errors.append(sys.exc_info()[1])

        self.handler_errors = []
        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -------------------------------------------------------------- internals
    def _take_fault(self, rpc, path):
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and (fault.target == rpc or (rpc is None and path.startswith(fault.target))):
                    fault.times -= 1
                    return fault
        return None

    def _auth_ok(self, header):
        kind, _, value = (header or "").partition(" ")
        if kind == "Basic" and self.key is not None:
            return base64.b64decode(value.encode()).decode(errors="replace") == f"{self.username}:{self.key}"
        if kind == "Bearer" and self.token is not None:
            return value == self.token
        return False


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeKaggle = None
    protocol_version = "HTTP/1.0"   # one request per connection: a cut-short body ends with the close
    timeout = 10                    # a client that stops talking cannot hold a thread forever

    def log_message(self, *args):   # quiet: pytest shows what tests print
        pass

    # -------------------------------------------------------------- plumbing
    def _target(self):
        """(path, host, proxied) of the request line, which is an absolute URL when we act as a proxy."""
        if self.path.startswith("http://") or self.path.startswith("https://"):
            parts = urlsplit(self.path)
            return parts.path, parts.netloc, True
        return urlsplit(self.path).path, self.headers.get("Host", ""), False

    def _send(self, status, payload=b"", content_type="application/json", headers=(), length=None):
        body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _error(self, status, message, in_body=False):
        self._send(200 if in_body else status, {"code": status, "message": message})

    def _handle(self):
        fake = self.server_fake
        path, host, proxied = self._target()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        rpc = path.rsplit("/", 1)[-1] if "/v1/" in path else None
        try:
            body = json.loads(raw) if rpc and raw else (len(raw) if raw else None)
        except ValueError:
            body = "<not json>"
        auth_header = self.headers.get("Authorization")
        auth = auth_header.split(" ", 1)[0].lower() if auth_header else None
        shown = {**body, "token": "***"} if rpc == "IntrospectToken" and isinstance(body, dict) else body
        with fake._lock:  # the log holds no credential: the token a client asks about is masked too
            fake.requests.append(Recorded(self.command, path, rpc, shown, auth, proxied))
            if len(fake.requests) > MAX_REQUESTS:
                fake.overflow = True
        if fake.overflow:
            return self._error(500, "fake Kaggle: request budget exhausted")
        if fake.on_request is not None:
            fake.on_request(fake.requests[-1])
        if rpc is not None and not fake._auth_ok(auth_header):
            return self._error(401, "Unauthenticated")
        fault = fake._take_fault(rpc, path)
        if fault is not None and fault.keep < 0:
            return self._error(fault.status, fault.message, fault.in_body)
        base = f"http://{host}"
        if rpc is not None:
            handler = getattr(self, f"rpc_{rpc}", None)
            if handler is None:
                return self._error(404, f"fake Kaggle does not implement {rpc}")
            return handler(body if isinstance(body, dict) else {}, base)
        if self.command == "GET" and path.startswith("/blobs/"):
            return self._blob(path[len("/blobs/"):], fault)
        if self.command == "PUT" and path.startswith("/upload/"):
            fake.uploads[path[len("/upload/"):]] = raw
            return self._send(200, {})
        return self._error(404, f"no route for {self.command} {path}")

    def _blob(self, name, fault):
        data = self.server_fake.blobs.get(name)
        if data is None:
            return self._error(404, f"no blob {name}")
        if fault is not None:  # cut short: promise every byte, send a part, hang up
            self._send(200, data[:int(len(data) * fault.keep)], "application/octet-stream", length=len(data))
            self.close_connection = True
            return None
        return self._send(200, data, "application/octet-stream")

    do_GET = do_POST = do_PUT = _handle

    # -------------------------------------------------------------- competitions.CompetitionApiService
    def rpc_DownloadDataFiles(self, body, base):
        if body.get("competitionName") != COMPETITION:
            return self._error(404, f"competition {body.get('competitionName')!r} not found")
        return self._send(302, b"", "text/plain", headers=[("Location", f"{base}/blobs/{COMPETITION}.zip")])

    def rpc_ListDataFiles(self, body, base):
        files = zipfile.ZipFile(io.BytesIO(self.server_fake.blobs[f"{COMPETITION}.zip"])).infolist()
        return self._send(200, {"files": [{"name": f.filename, "totalBytes": f.file_size} for f in files]})

    def rpc_StartSubmissionUpload(self, body, base):
        fake = self.server_fake
        token = f"blob-token-{len(fake.uploads) + len(fake.submissions) + 1}"
        return self._send(200, {"token": token, "createUrl": f"{base}/upload/{token}"})

    def rpc_CreateSubmission(self, body, base):
        fake = self.server_fake
        token = body.get("blobFileTokens")
        if token not in fake.uploads:
            return self._error(400, f"no uploaded file for token {token!r}")
        fake.submissions.append({"bytes": fake.uploads[token], "description": body.get("submissionDescription")})
        return self._send(200, {"message": "Successfully submitted to Digit Recognizer",
                                "ref": 1000 + len(fake.submissions)})

    def rpc_GetSubmissionLimits(self, body, base):
        return self._send(200, {"dailySubmissionLimit": 5, "remainingDailySubmissions": 5})

    # -------------------------------------------------------------- security.OAuthService
    def rpc_IntrospectToken(self, body, base):
        fake = self.server_fake
        active = body.get("token") == fake.token
        return self._send(200, {"active": active, "username": fake.username if active else ""})

    # -------------------------------------------------------------- kernels.KernelsApiService
    def rpc_SaveKernel(self, body, base):
        kernel = self.server_fake.kernel
        kernel.pushed.append(body)
        slug = body.get("slug", "")
        owner = slug.split("/", 1)[0]
        if owner != self.server_fake.username:
            return self._error(403, f"Permission 'kernels.create' was denied for {owner}")
        answer = {"ref": f"/code/{slug}", "url": f"https://www.kaggle.com/code/{slug}",
                  "versionNumber": len(kernel.pushed)}
        if slug in body.get("kernelDataSources", []) and len(kernel.pushed) == 1:
            answer["invalidKernelSources"] = [slug]  # its own output, before it has ever run: there is none
        return self._send(200, answer)

    def rpc_GetKernelSessionStatus(self, body, base):
        kernel = self.server_fake.kernel
        status = kernel.statuses.pop(0) if len(kernel.statuses) > 1 else kernel.statuses[0]
        answer = {"status": status}
        if kernel.failure_message and status == "ERROR":
            answer["failureMessage"] = kernel.failure_message
        return self._send(200, answer)

    def rpc_ListKernelSessionOutput(self, body, base):
        kernel = self.server_fake.kernel
        slug = body.get("kernelSlug", "")
        files = []
        for name in sorted(kernel.outputs):
            blob = f"kernels/{slug}/{name}"
            self.server_fake.blobs[blob] = kernel.outputs[name]
            files.append({"fileName": name, "url": f"{base}/blobs/{blob}"})
        return self._send(200, {"files": files, "log": kernel.log, "nextPageToken": ""})


def point_client_at(monkeypatch, server):
    """Test-only hook, in process: the client's PROD endpoint (https://api.kaggle.com) becomes the fake server."""
    from kagglesdk import kaggle_env

    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.PROD, server.url)


def proxy_env(server, base_env):
    """Test-only hook, for a subprocess: the client talks to http://localhost/api through the fake server as proxy."""
    env = {k: v for k, v in base_env.items() if not k.startswith("KAGGLE_") and k.lower() not in PROXY_VARS}
    env.update(KAGGLE_API_ENVIRONMENT="LOCALHOST", HTTP_PROXY=server.url)
    return env
