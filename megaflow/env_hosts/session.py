"""Exec sessions: a command runner already started inside a warm container, so its first exec costs no `docker exec`.

A plain ``docker exec`` costs tens to hundreds of milliseconds (runc enters the container's
namespaces and cgroups each time). A warm container gets, when it boots, one long-lived
``docker exec -i python3 RUNNER`` whose stdin/stdout stay attached to this process (any other
container gets one in the background after its first plain exec); each command is then one JSON
line in and one JSON line out. The runner gives every command the plain path's
semantics itself, with fewer processes: ``bash -lc`` in its own process group, TERM at the time
limit and KILL after the grace (exit 124 / 137 like coreutils ``timeout -k``), the group killed
after the command ends, stderr joined, output capped head+tail. The host tests run on both paths.

A session lives in the process that opened it (the env worker); anywhere else, or for an image
without python3, execution falls back to plain ``docker exec``.
"""

from __future__ import annotations

import inspect
import json
import select
import socket
import threading
import time

from megaflow.env_hosts.base import OMITTED, ExecResult, OutputCap

RUNNER_BODY = r"""
out = sys.stdout
def killpg(pid, sig):
    try:
        os.killpg(pid, sig)
    except OSError:
        pass
bound = False  # bound to its owner: when the owner's stream ends, stop the container (warm pool)
for line in sys.stdin:
    req = json.loads(line)
    if "bind" in req:
        bound = bool(req["bind"])
    if req.get("ping") or "bind" in req:
        out.write('{"pong": 1}\n'); out.flush(); continue
    cap = OutputCap(int(req["cap"]))
    env = dict(os.environ); env.update(req.get("env") or {})
    try:
        p = subprocess.Popen(["bash", "-lc", req["command"]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, cwd=req.get("workdir") or None, env=env,
                             start_new_session=True)
    except OSError as exc:
        out.write(json.dumps({"exit_code": 126, "output": str(exc), "truncated": False}) + "\n"); out.flush()
        continue
    fd = p.stdout.fileno()
    deadline = time.monotonic() + float(req["timeout"]); grace = float(req["grace"])
    termed = killed = False; eof = False
    while True:
        now = time.monotonic()
        if not termed and now >= deadline:
            killpg(p.pid, signal.SIGTERM); termed = True
        elif termed and not killed and now >= deadline + grace:
            killpg(p.pid, signal.SIGKILL); killed = True
        wake = deadline if not termed else deadline + grace if not killed else now + 0.2
        wait = max(0.0, min(0.2, wake - now))
        if eof:
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            break
        ready, _, _ = select.select([fd], [], [], wait)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                eof = True; continue
            cap.feed(chunk)
        elif p.poll() is not None:
            break  # exited; a stray process may still hold the pipe open
    rc = p.wait()
    killpg(p.pid, signal.SIGKILL)  # whatever the command left in its group (fork bombs, stray jobs)
    p.stdout.close()
    rc = (137 if killed else 124) if termed else (128 - rc if rc < 0 else rc)
    out.write(json.dumps({"exit_code": rc, "output": cap.text(), "truncated": cap.truncated}) + "\n")
    out.flush()
if bound:
    os.kill(1, signal.SIGTERM)  # docker-init passes it on to `sleep`: the container ends
"""


# The runner: OutputCap's own source (the one implementation of the cap) plus the loop above.
RUNNER = (
    "from __future__ import annotations\nimport json, os, select, signal, subprocess, sys, time\n"
    "from collections import deque\n" + f"OMITTED = {OMITTED!r}\n" + inspect.getsource(OutputCap) + RUNNER_BODY
)


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
        self.kill_grace_s = 5.0
        self.user = "root"  # commands run as this user

    @classmethod
    def open(
        cls, api, container_id: str, *, kill_grace_s: float, timeout: float = 10.0, user: str = "root"
    ) -> ExecSession | None:
        """Start the runner as ``user`` and check it answers; None when it cannot run here (e.g. no python3)."""
        from megaflow.env_hosts.containers import user_env

        try:
            exec_id = api.exec_create(
                container_id,
                ["python3", "-u", "-c", RUNNER],
                stdin=True,
                stdout=True,
                stderr=True,
                user=user,
                environment=user_env(user, None),
            )["Id"]
            sock = api.exec_start(exec_id, socket=True)
            session = cls(container_id, sock, getattr(sock, "_sock", sock))
            session.kill_grace_s = kill_grace_s
            session.user = user
            session._send({"ping": 1})
            if (session._recv(time.monotonic() + timeout) or {}).get("pong") != 1:
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

    def ping(self, timeout: float = 2.0, *, bind: bool | None = None) -> bool:
        """Round trip to the runner: proves the container runs commands right now (a liveness check).

        ``bind=True`` makes the runner stop its container when this stream ends (the owning process
        died: an unclaimed warm container must not outlive its pool); ``bind=False`` undoes it.
        """
        if self.broken or not self.idle_ok():
            return False
        try:
            self._send({"ping": 1} if bind is None else {"bind": bind})
            return (self._recv(time.monotonic() + timeout) or {}).get("pong") == 1
        except SessionBroken:
            return False

    def send_command(self, command: str, *, timeout: float, workdir: str | None, env: dict | None, cap: int) -> None:
        """Hand one command to the runner (SessionBroken here means it did not run)."""
        self._send(
            {
                "command": "exec 2>&1\n" + command,
                "timeout": timeout,
                "grace": self.kill_grace_s,
                "workdir": workdir,
                "env": {k: str(v) for k, v in (env or {}).items()},
                "cap": cap,
            }
        )

    def receive(self, deadline: float) -> dict | None:
        """The runner's reply ({exit_code, output, truncated}), or None when ``deadline`` passed first."""
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
            except TimeoutError:
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
                self._buf += data[8 : 8 + size]
            data = data[8 + size :]
        self._pending = data

    def close(self) -> None:
        self.broken = True
        try:
            self._sock.close()
        except OSError:
            pass


class SessionLost(Exception):
    """The session broke while a command ran in it: the command may or may not have run."""


class ExecSessions:
    """The exec sessions this process holds, by container id (warm containers, and others after a first exec)."""

    def __init__(self, api, *, kill_grace_s: float, cap: int, client_slack_s: float):
        self.api = api
        self.kill_grace_s = kill_grace_s
        self.cap = cap
        self.client_slack_s = client_slack_s
        self._sessions: dict[str, ExecSession] = {}
        self._tried: set[str] = set()  # containers whose session was (being) opened in the background
        self._lock = threading.Lock()

    def get(self, cid: str) -> ExecSession | None:
        return self._sessions.get(cid)

    def __contains__(self, cid: str) -> bool:
        return cid in self._sessions

    def open(self, cid: str, *, user: str, background: bool = False) -> bool:
        """Start a session in ``cid`` running commands as ``user``; False when unavailable or closed while opening."""
        session = ExecSession.open(self.api, cid, kill_grace_s=self.kill_grace_s, user=user)
        if session is None:
            return False
        with self._lock:
            if background and cid not in self._tried:  # closed while the session was opening
                session.close()
                return False
            self._sessions[cid] = session
        return True

    def open_async(self, cid: str, *, user: str) -> None:
        """Open a session for ``cid`` in the background, once per container (overlaps the agent's next model call)."""
        with self._lock:
            if cid in self._tried or cid in self._sessions:
                return
            self._tried.add(cid)
        threading.Thread(
            target=self.open,
            args=(cid,),
            kwargs={"user": user, "background": True},
            name=f"exec-session-{cid[:12]}",
            daemon=True,
        ).start()

    def drop(self, cid: str) -> None:
        with self._lock:
            session = self._sessions.pop(cid, None)
            self._tried.discard(cid)
        if session is not None:
            session.close()

    def drop_all(self) -> None:
        for cid in list(self._sessions):
            self.drop(cid)

    def ping(self, cid: str, *, bind: bool | None = None, wait: float = 2.0) -> bool | None:
        """Round trip through ``cid``'s runner (see ExecSession.ping); None when it has no session."""
        session = self._sessions.get(cid)
        if session is None:
            return None
        if not session.lock.acquire(timeout=wait):
            return False
        try:
            return session.ping(bind=bind)
        finally:
            session.lock.release()

    def run(
        self, cid: str, command: str, *, timeout: float, workdir: str | None, env: dict | None, user: str
    ) -> ExecResult | None:
        """Run through ``cid``'s session; None when there is none, it runs as another user, is busy or unusable.

        Raises SessionLost when the session broke mid-command.
        """
        session = self._sessions.get(cid)
        if session is None or session.user != user:
            return None
        if not session.lock.acquire(blocking=False):  # busy: use plain docker exec
            return None
        try:
            if session.broken:
                self.drop(cid)
                return None
            started = time.monotonic()
            deadline = started + timeout + self.kill_grace_s + self.client_slack_s
            try:
                session.send_command(command, timeout=timeout, workdir=workdir, env=env, cap=self.cap)
            except SessionBroken:
                self.drop(cid)
                return None
            try:
                reply = session.receive(deadline)
            except SessionBroken as exc:
                self.drop(cid)
                raise SessionLost(str(exc)) from exc
        finally:
            session.lock.release()
        duration = time.monotonic() - started
        if reply is None:  # the client gave up; the in-container limit should have fired long before
            self.drop(cid)
            return ExecResult(exit_code=None, output="", timed_out=True, duration_s=round(duration, 4), truncated=False)
        code = reply.get("exit_code")
        return ExecResult(
            exit_code=code,
            output=reply.get("output", ""),
            timed_out=code in (124, 137) and duration >= timeout * 0.95,
            duration_s=round(duration, 4),
            truncated=bool(reply.get("truncated")),
        )
