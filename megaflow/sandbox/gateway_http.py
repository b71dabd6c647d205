"""An OpenAI-compatible HTTP front for the per-episode gateway (``/v1/chat/completions``).

On loopback TCP (``GatewayHTTPServer``, ``megaflow sandbox gateway``) or on a Unix socket
(``UnixGatewayServer``: what an env host serves to its no-network containers through the relay of
megaflow.env_hosts.gateway_socket).

The bearer key names the episode (megaflow.services.episode_gateway issues it); a wrong key or a
finished episode's key is 401. The gateway object is duck-typed (``complete(key, body)``), so this
module needs nothing above the plug-in layer. ``stream: true`` gets the whole reply as server-sent
events (megaflow.sandbox.gateway_stream).

Every waiting call holds one server thread, so a server answers at most ``max_calls`` chat
completions at a time; one more is refused at once with 429 and ``Retry-After`` (the OpenAI clients
and litellm wait that long and retry). ``max_calls=0``: no cap. A connection idle between requests
is closed after ``idle_timeout_s``, so kept-alive connections don't hold threads for ever.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megaflow.sandbox.gateway_stream import sse_payload

log = logging.getLogger(__name__)
MAX_BODY = 32 * 1024 * 1024
SSE_TYPE = "text/event-stream; charset=utf-8"
RETRY_AFTER_S = 1  # what a 429 (all call slots busy) asks the client to wait
IDLE_TIMEOUT_S = 120.0  # a connection that sends nothing for this long is closed (its thread ends)


class CallSlots:
    """At most ``limit`` chat completions waiting at once in one server (``limit`` 0: no cap)."""

    def __init__(self, limit: int):
        self.limit = max(0, int(limit))
        self._sem = threading.BoundedSemaphore(self.limit) if self.limit else None
        self._lock = threading.Lock()
        self.busy = 0  # calls in progress now
        self.refused = 0  # calls answered 429 so far

    def try_take(self) -> bool:
        if self._sem is not None and not self._sem.acquire(blocking=False):
            with self._lock:
                self.refused += 1
            return False
        with self._lock:
            self.busy += 1
        return True

    def give(self) -> None:
        with self._lock:
            self.busy -= 1
        if self._sem is not None:
            self._sem.release()


class _Handler(BaseHTTPRequestHandler):
    server: GatewayHTTPServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no delayed-ACK stall

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout_s)  # an idle kept-alive connection ends its thread

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("episode gateway: " + fmt, *args)

    def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        self._reply(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def _complete(self, key: str, body: Any) -> None:
        """One chat completion, as JSON or (``stream: true``) as an event stream; 429 when every slot is busy."""
        slots: CallSlots = self.server.slots
        if not slots.try_take():
            message = f"the gateway is answering its limit of {slots.limit} calls; retry after {RETRY_AFTER_S}s"
            return self._error(429, message, "rate_limit_error", {"Retry-After": str(RETRY_AFTER_S)})
        try:
            if not (isinstance(body, dict) and body.get("stream") is True):
                return self._reply(200, self.server.gateway.complete(key, body))
            return self._stream(key, body)
        finally:
            slots.give()

    def _stream(self, key: str, body: dict[str, Any]) -> None:
        """A ``stream: true`` call. A quick answer goes out whole with a Content-Length. While a call waits
        longer than the gateway's heartbeat, the event stream opens (chunked) with ``: keep-alive`` comments,
        so clients with an idle-read time-out keep waiting; a failure after that is an ``error`` event."""
        opened = False

        def keep_alive() -> None:
            nonlocal opened
            if not opened:
                self.send_response(200)
                self.send_header("Content-Type", SSE_TYPE)
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                opened = True
            self._chunk(b": keep-alive\n\n")

        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            answer = self.server.gateway.complete(key, body, heartbeat=keep_alive)
        except ConnectionError as exc:  # BrokenPipe/ConnectionReset from a keep-alive write
            if opened:  # the client hung up while the call waited: the gateway abandoned it
                log.info("episode gateway: stream client left while its call waited (%s)", exc)
                self.close_connection = True
                return
            raise
        except Exception as exc:
            if not opened:
                raise
            log.warning("episode gateway: streamed call failed after the stream opened: %s", exc)
            kind = "authentication_error" if isinstance(exc, PermissionError) else "model_error"
            error = {"error": {"message": f"{type(exc).__name__}: {exc}"[:2000], "type": kind}}
            self._chunk(b"data: " + json.dumps(error).encode() + b"\n\n")
            self._chunk(b"")
            return
        if not opened:
            return self._send(200, sse_payload(answer, usage), SSE_TYPE, {"Cache-Control": "no-cache"})
        self._chunk(sse_payload(answer, usage))
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        """One chunk of a chunked body (empty: the last one)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            return self._reply(200, {"object": "list", "data": [{"id": "megaflow", "object": "model"}]})
        self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:
        try:
            n = int(self.headers.get("Content-Length") or 0)
            if n < 0:
                raise ValueError(f"Content-Length must not be negative, got {n}")
            if n > MAX_BODY:
                return self._error(413, f"request body over {MAX_BODY} bytes", "invalid_request_error")
            body = json.loads(self.rfile.read(n) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}; use /v1/chat/completions", "not_found")
            auth = self.headers.get("Authorization") or ""
            key = auth[7:] if auth.lower().startswith("bearer ") else ""
            return self._complete(key, body)
        except PermissionError as exc:
            return self._error(401, str(exc), "authentication_error")
        except (ValueError, TypeError) as exc:
            return self._error(400, str(exc)[:2000], "invalid_request_error")
        except Exception as exc:
            log.exception("episode gateway: request failed")
            return self._error(502, f"{type(exc).__name__}: {exc}"[:2000], "model_error")


class GatewayHTTPServer(ThreadingHTTPServer):
    """Serves one gateway object over HTTP (start() for background threads)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up is normal (keep-alive connections closed at exit); anything else is logged."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            log.exception("request from %s failed", client_address)

    def __init__(
        self,
        gateway: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_calls: int = 0,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ):
        super().__init__((host, port), _Handler)
        self.gateway = gateway
        self.slots = CallSlots(max_calls)
        self.idle_timeout_s = idle_timeout_s

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}/v1"

    def start(self) -> GatewayHTTPServer:
        threading.Thread(target=self.serve_forever, daemon=True, name="megaflow-episode-gateway").start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        getattr(self.gateway, "close", lambda: None)()


class _UnixHandler(_Handler):
    disable_nagle_algorithm = False  # no TCP on a Unix socket

    def address_string(self) -> str:
        return "unix"


class UnixGatewayServer(socketserver.ThreadingUnixStreamServer):
    """Serves one gateway object over HTTP on a Unix socket (mode 0666: container users connect; the key
    in each request names its episode). A stale socket file at ``path`` is replaced."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, gateway: Any, path: str, *, max_calls: int = 0, idle_timeout_s: float = IDLE_TIMEOUT_S):
        if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
        super().__init__(path, _UnixHandler)
        os.chmod(path, 0o666)
        self.gateway = gateway
        self.slots = CallSlots(max_calls)
        self.idle_timeout_s = idle_timeout_s
        self.path = path
        self._ino = os.lstat(path).st_ino

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            log.exception("request on %s failed", self.path)

    def start(self) -> UnixGatewayServer:
        threading.Thread(target=self.serve_forever, daemon=True, name="megaflow-gateway-socket").start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        getattr(self.gateway, "close", lambda: None)()
        try:
            if os.lstat(self.path).st_ino == self._ino:  # not a newer server's socket
                os.unlink(self.path)
        except OSError:
            pass
