"""The sandbox API over HTTP: a small threaded server (loopback by default) and its client transport.

Routes: ``POST /sandboxes`` creates one ({user, image?, workdir?, wait_s?} -> {id, token, ...});
``POST /sandboxes/<id>/<op>`` runs a SWE-ReX operation (``create_session``, ``run_in_session``,
``close_session``, ``execute``, ``read_file``, ``write_file``, ``upload``, ``close``;
``GET .../is_alive``) with the sandbox's token in ``X-API-Key``. SWE-ReX's own routes at the root
(``/execute``, ``/upload``, ...) work too: there the token alone names the sandbox, so SWE-ReX's
``RemoteRuntime(host=..., port=..., auth_token=token)`` drives a MegaFlow sandbox unchanged. Errors
of an operation are status 511 with SWE-ReX's ``swerexception`` body (and MegaFlow's own under
``megaflow``); a wrong token is 401, an unknown sandbox 404, no capacity 429.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import zipfile
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from megaflow.sandbox import errors as E
from megaflow.sandbox.models import OPERATIONS

log = logging.getLogger(__name__)
MAX_BODY = 100 * 1024 * 1024
OPS = (*OPERATIONS, "upload", "close", "is_alive")
_STATUS = (
    (E.SandboxRequestError, 422),
    (E.SandboxAuthError, 401),
    (E.SandboxNotFoundError, 404),
    (E.SandboxCapacityError, 429),
)


def _upload_files(content_type: str, body: bytes) -> dict:
    """SWE-ReX's multipart upload (file, target_path, unzip) -> {"target_path", "files": {rel: base64}}."""
    msg = BytesParser(policy=email_policy).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, bytes] = {}
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True)
        fields[str(part.get_param("name", header="content-disposition"))] = (
            payload if isinstance(payload, bytes) else b""
        )
    if "file" not in fields or "target_path" not in fields:
        raise ValueError("upload needs the multipart fields 'file' and 'target_path'")
    files: dict[str, str] = {}
    if fields.get("unzip", b"false").decode().lower() == "true":
        with zipfile.ZipFile(io.BytesIO(fields["file"])) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    files[info.filename] = base64.b64encode(zf.read(info)).decode()
    else:
        files[""] = base64.b64encode(fields["file"]).decode()
    return {"target_path": fields["target_path"].decode(), "files": files}


class _Handler(BaseHTTPRequestHandler):
    server: SandboxHTTPServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no delayed-ACK stall

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("sandbox api: " + fmt, *args)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n < 0:  # rfile.read(-1) would read until the client closes, holding a thread
            raise ValueError(f"Content-Length must not be negative, got {n}")
        if n > MAX_BODY:
            raise ValueError(f"request body over {MAX_BODY} bytes")
        return self.rfile.read(n) if n else b""

    def _route(self, method: str) -> None:
        try:
            body = self._body()
            parts = [p for p in self.path.split("?", 1)[0].split("/") if p]
            service = self.server.service
            token = self.headers.get("X-API-Key") or ""
            if not parts:
                return self._reply(200, {"message": "MegaFlow sandbox API (SWE-ReX compatible)"})
            if parts == ["sandboxes"] and method == "POST":
                admin = self.server.admin_token
                if admin and self.headers.get("X-Admin-Token") != admin:
                    raise E.SandboxAuthError("creating a sandbox needs the server's admin token in X-Admin-Token")
                req = json.loads(body or b"{}")
                if not isinstance(req, dict):
                    raise ValueError("the body must be a JSON object {user, image?, workdir?, wait_s?}")
                allowed = {"user", "image", "workdir", "wait_s"}
                if set(req) - allowed:
                    raise ValueError(f"unknown fields {sorted(set(req) - allowed)}; allowed: {sorted(allowed)}")
                if "user" not in req:
                    raise E.SandboxRequestError("user is required (who the sandbox counts against)")
                return self._reply(200, service.create(**req))
            if parts[0] == "sandboxes" and len(parts) in (2, 3):
                sid, op = parts[1], parts[2] if len(parts) == 3 else "info"
            elif len(parts) == 1:  # SWE-ReX's routes: the token names the sandbox
                sid, op = service.sandbox_for_token(token) or "", parts[0]
                if not sid:
                    raise E.SandboxAuthError("X-API-Key is not the token of an open sandbox")
            else:
                return self._reply(404, {"detail": f"no route {self.path}"})
            if op == "info":
                return self._reply(200, service.get(sid, token))
            if op not in OPS:
                return self._reply(404, {"detail": f"unknown operation {op!r}; known: {', '.join(OPS)}"})
            if op == "close":
                service.close(sid, token)
                return self._reply(200, {})
            ctype = self.headers.get("Content-Type") or ""
            if op == "upload" and ctype.startswith("multipart/"):
                req = _upload_files(ctype, body)
            else:
                req = json.loads(body or b"{}")
            timeout = req.get("timeout") if isinstance(req, dict) else None
            return self._reply(200, service.call(sid, token, op, req, timeout=timeout))
        except E.SandboxError as exc:
            for cls, status in _STATUS:
                if isinstance(exc, cls):
                    return self._reply(status, {"detail": str(exc)})
            t = E.to_transfer(exc)
            return self._reply(511, {"swerexception": E.swerex_transfer(t), "megaflow": t})
        except (ValueError, ValidationError, TypeError) as exc:
            return self._reply(422, {"detail": str(exc)[:2000]})
        except Exception as exc:
            log.exception("sandbox api: %s %s failed", method, self.path)
            return self._reply(500, {"detail": f"{type(exc).__name__}: {exc}"[:2000]})


class SandboxHTTPServer(ThreadingHTTPServer):
    """The HTTP server over a sandbox service (``Transport`` plus ``sandbox_for_token``, ``get``, ``sweep``).

    A background thread closes sandboxes idle past their time-out every ``sweep_s`` seconds.
    """

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up is normal (keep-alive connections closed at exit); anything else is logged."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            log.exception("request from %s failed", client_address)

    def __init__(
        self,
        service: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        admin_token: str | None = None,
        sweep_s: float = 5.0,
    ):
        super().__init__((host, port), _Handler)
        self.service = service
        self.admin_token = admin_token
        self.sweep_s = sweep_s
        self._stop = threading.Event()
        self._bg: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}"

    def _sweeper(self) -> None:
        while not self._stop.wait(self.sweep_s):
            try:
                self.service.sweep()
            except Exception as exc:
                log.warning("sandbox sweep failed: %s", exc)

    def start(self) -> SandboxHTTPServer:
        """Serve in background threads (for tests and embedding)."""
        for target in (self.serve_forever, self._sweeper):
            t = threading.Thread(target=target, daemon=True, name="megaflow-sandbox-api")
            t.start()
            self._bg.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.shutdown()
        self.server_close()


class HttpTransport:
    """``Transport`` over the HTTP API (for ``Sandbox`` / ``MegaflowDeployment`` in another process)."""

    def __init__(self, url: str, *, admin_token: str | None = None, timeout_margin_s: float = 60.0):
        import httpx

        self.url = url.rstrip("/")
        self.admin_token = admin_token
        self.margin = timeout_margin_s
        self.client = httpx.Client(timeout=httpx.Timeout(600.0 + timeout_margin_s, connect=10.0))

    def _post(self, path: str, body: dict, headers: dict[str, str], timeout: float | None = None) -> Any:
        kwargs: dict[str, Any] = {"timeout": timeout + self.margin} if timeout else {}
        resp = self.client.post(self.url + path, json=body, headers=headers, **kwargs)
        data = resp.json() if resp.content else {}
        if resp.status_code == 511:
            raise E.from_transfer(data.get("megaflow") or data.get("swerexception") or {})
        for cls, status in _STATUS:
            if resp.status_code == status:
                raise cls(data.get("detail", ""))
        if resp.status_code >= 400:
            raise E.SandboxError(f"HTTP {resp.status_code} from {path}: {data.get('detail', data)}")
        return data

    def create(self, *, user: str, image: str | None = None, workdir: str | None = None, wait_s: float = 0.0) -> dict:
        body = {
            "user": user,
            "wait_s": wait_s,
            **({"image": image} if image else {}),
            **({"workdir": workdir} if workdir else {}),
        }
        headers = {"X-Admin-Token": self.admin_token} if self.admin_token else {}
        return self._post("/sandboxes", body, headers, timeout=wait_s + 600.0)

    def call(self, sandbox_id: str, token: str, op: str, request: dict, *, timeout: float | None = None) -> dict:
        return self._post(f"/sandboxes/{sandbox_id}/{op}", request, {"X-API-Key": token}, timeout)

    def close(self, sandbox_id: str, token: str) -> None:
        self._post(f"/sandboxes/{sandbox_id}/close", {}, {"X-API-Key": token})
