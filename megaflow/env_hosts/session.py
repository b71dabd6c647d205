"""Exec sessions: a command runner already started inside a warm container, so its first exec costs no `docker exec`.

A plain ``docker exec`` costs tens to hundreds of milliseconds (runc enters the container's
namespaces and cgroups each time). A warm container gets, off the critical path, one long-lived
``docker exec -i python3 RUNNER`` whose stdin/stdout stay attached to this process; each command
is then one JSON line in and one JSON line out. The runner starts every command exactly like
the plain path (the same wrapper: ``timeout -k``, process-group kill afterwards, stderr joined,
output capped head+tail), so results do not depend on which path ran them.

A session lives in the process that opened it (the env worker); anywhere else, or for an image
without python3, execution falls back to plain ``docker exec``.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time

RUNNER = r"""
import json, os, select, subprocess, sys, time
wrapper = sys.argv[1]
out = sys.stdout
for line in sys.stdin:
    req = json.loads(line)
    if req.get("ping"):
        out.write('{"pong": 1}\n'); out.flush(); continue
    cap = int(req["cap"]); head_cap = cap // 2; tail_cap = cap - head_cap
    head = bytearray(); tail = bytearray(); dropped = 0
    env = dict(os.environ); env.update(req.get("env") or {})
    try:
        p = subprocess.Popen(["bash", "-c", wrapper, "megaflow-exec", req["timeout"], req["command"]],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             cwd=req.get("workdir") or None, env=env)
    except OSError as exc:
        out.write(json.dumps({"exit_code": 126, "head": str(exc), "tail": "", "dropped": 0}) + "\n"); out.flush()
        continue
    fd = p.stdout.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            room = head_cap - len(head)
            if room > 0:
                head += chunk[:room]; chunk = chunk[room:]
            tail += chunk
            if len(tail) > tail_cap:
                dropped += len(tail) - tail_cap; del tail[:len(tail) - tail_cap]
        elif p.poll() is not None:
            break  # exited; a stray process may still hold the pipe open
    rc = p.wait()
    p.stdout.close()
    out.write(json.dumps({"exit_code": rc, "head": head.decode("utf-8", "replace"),
                          "tail": tail.decode("utf-8", "replace"), "dropped": dropped}) + "\n")
    out.flush()
"""


class SessionBroken(Exception):
    """The session's stream ended or misbehaved; the caller falls back to plain docker exec."""


class ExecSession:
    """One long-lived runner in a container, driven over a hijacked docker exec stream."""

    def __init__(self, container_id: str, sock, raw: socket.socket):
        self.container_id = container_id
        self._sock = sock
        self._raw = raw
        self._buf = b""  # demultiplexed stdout not yet consumed
        self._pending = b""  # raw bytes of an incomplete frame
        self.lock = threading.Lock()
        self.broken = False

    @classmethod
    def open(cls, api, container_id: str, wrapper: str, *, timeout: float = 10.0) -> "ExecSession | None":
        """Start the runner and check it answers; None when it cannot run here (e.g. no python3)."""
        try:
            exec_id = api.exec_create(container_id, ["python3", "-u", "-c", RUNNER, wrapper], stdin=True,
                                      stdout=True, stderr=True)["Id"]
            sock = api.exec_start(exec_id, socket=True)
            session = cls(container_id, sock, getattr(sock, "_sock", sock))
            session._send({"ping": 1})
            if session._recv(time.monotonic() + timeout).get("pong") != 1:
                session.close()
                return None
            return session
        except Exception:  # noqa: BLE001 - any failure means: use plain docker exec
            return None

    def idle_ok(self) -> bool:
        """Liveness of an idle session: nothing may be waiting on its stream (EOF or stray bytes mean broken)."""
        if self.broken:
            return False
        try:
            ready, _, _ = select.select([self._raw], [], [], 0)
        except (OSError, ValueError):
            return False
        return not ready

    def send_command(self, command: str, *, timeout: float, workdir: str | None, env: dict | None,
                     cap: int) -> None:
        """Hand one command to the runner (SessionBroken here means it did not run)."""
        self._send({"command": "exec 2>&1\n" + command, "timeout": f"{timeout:g}s", "workdir": workdir,
                    "env": {k: str(v) for k, v in (env or {}).items()}, "cap": cap})

    def receive(self, deadline: float) -> dict | None:
        """The runner's reply ({exit_code, head, tail, dropped}), or None when ``deadline`` passed first."""
        return self._recv(deadline)

    def _send(self, message: dict) -> None:
        try:
            self._raw.settimeout(10)
            self._raw.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            self.broken = True
            raise SessionBroken(f"send failed: {exc}") from exc

    def _recv(self, deadline: float) -> dict | None:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.broken = True  # a reply may still arrive later: never reuse this stream
                return None
            self._raw.settimeout(min(remaining, 5.0))
            try:
                chunk = self._raw.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError as exc:
                self.broken = True
                raise SessionBroken(f"receive failed: {exc}") from exc
            if not chunk:
                self.broken = True
                raise SessionBroken("the runner's stream ended")
            self._demux(chunk)
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError as exc:
            self.broken = True
            raise SessionBroken(f"bad reply from the runner: {line[:200]!r}") from exc

    def _demux(self, chunk: bytes) -> None:
        data = self._pending + chunk
        while len(data) >= 8:
            size = int.from_bytes(data[4:8], "big")
            if len(data) < 8 + size:
                break
            if data[0] == 1:  # stdout; stderr (2) carries only runner crashes
                self._buf += data[8:8 + size]
            data = data[8 + size:]
        self._pending = data

    def close(self) -> None:
        self.broken = True
        try:
            self._sock.close()
        except OSError:
            pass
