"""Container operations on one env host through the Docker SDK: create, exec, files, evaluate, close.

Every container runs with CPU / memory / pids limits, no network unless asked, no privileges
and no Docker socket, carries MegaFlow labels, and has a dead-man's switch: its main process is
``sleep LIFETIME`` under docker-init, so it ends by itself even if every MegaFlow process dies.
Every command runs under a time limit enforced inside the container (coreutils ``timeout -k``
on the plain ``docker exec`` path, the runner itself on a warm container's exec session, see
session.py), everything it started is killed when it ends, and its output is capped (head and
tail kept).

Time limits line up (all in settings): ``command_timeout_s`` / ``eval_timeout_s`` per command,
inside the container < ``episode_budget_s`` (the agent's, kept by the engine) <
``container_lifetime_s`` (the dead-man's switch; the lease label lapses 60 s later and the
reaper removes the container) < ``episode_guard_s`` (the engine's sweep). A warm container
lives ``warm_idle_s + container_lifetime_s`` and is replaced after ``warm_idle_s`` idle, so the
one handed out always has a full lifetime left. ``pull_timeout_s`` bounds a pull and
``boot_timeout_s`` a create + start (and the wait for one of ``boot_concurrency`` boot slots).
"""

from __future__ import annotations

import io
import logging
import re
import socket
import tarfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from megaflow.env_hosts import labels as L
from megaflow.env_hosts.errors import ContainerLostError, ImageMissingError, docker_errors
from megaflow.core.errors import CommandTimeoutError, InfraError, RetryableInfraError, TaskError

KILL_GRACE_S = 5  # SIGKILL this long after SIGTERM when a command runs past its limit
CLIENT_SLACK_S = 15  # the client gives up on an exec stream this long after the in-container limit
LEASE_MARGIN_S = 60  # the lease label lapses this long after the container's main process ends
_NAME_OK = re.compile(r"[^a-zA-Z0-9_.-]+")
log = logging.getLogger(__name__)

# Runs "$2" under coreutils timeout (its own process group), then SIGKILLs whatever is left in
# that group, so a fork bomb or a stray background job cannot outlive its command. The kill is
# a builtin: it works even when the pids limit is exhausted. stderr joins stdout (in order).
_WRAPPER = (f'timeout -k {KILL_GRACE_S} "$1" bash -lc "$2" & p=$!; wait $p; rc=$?; '
            'kill -9 -- -$p 2>/dev/null; kill -9 -- -$p 2>/dev/null; exit $rc')


@dataclass
class ExecResult:
    """Outcome of one command in a container (JSON-able, sent back over Celery)."""

    exit_code: int | None
    output: str
    timed_out: bool
    duration_s: float
    truncated: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ExecResult":
        return cls(**{k: data[k] for k in ("exit_code", "output", "timed_out", "duration_s", "truncated")})


class OutputCap:
    """Keeps the first and last ``cap // 2`` bytes of a stream, counting what falls in between."""

    def __init__(self, cap: int):
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_len = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail.append(data)
        self.tail_len += len(data)
        while self.tail_len - len(self.tail[0]) >= self.tail_cap:
            self.tail_len -= len(self.tail[0])
            self.dropped += len(self.tail.popleft())
        if self.tail_len > self.tail_cap:  # trim the oldest chunk in place
            cut = self.tail_len - self.tail_cap
            self.tail[0] = self.tail[0][cut:]
            self.tail_len -= cut
            self.dropped += cut

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def text(self) -> str:
        head = bytes(self.head).decode("utf-8", "replace")
        tail = b"".join(self.tail).decode("utf-8", "replace")
        if self.dropped:
            return f"{head}\n[... {self.dropped} bytes of output omitted ...]\n{tail}"
        return head + tail


def _container_name(host: str, tag: str) -> str:
    return _NAME_OK.sub("-", f"mf-{host}-{tag}")[:100] + "-" + uuid.uuid4().hex[:6]


class DockerHost:
    """Container operations on this env host via the Docker SDK.

    Redis keys owned (all optional; without ``redis_client`` the same state lives in memory):
    ``keys.env(host, "images")`` hash image -> last use (LRU), ``keys.env(host, "claims")`` hash
    container id -> JSON claim of a warm container by an episode, ``keys.env(host, "owner", id)``
    string with TTL: this instance's warm pool is alive.
    """

    def __init__(self, docker_client, settings, *, name: str, redis_client=None, keys=None,
                 is_live: Callable[[str], bool] | None = None, warm_images: list[str] | tuple[str, ...] = (),
                 sessions: bool = True):
        from megaflow.env_hosts.image_cache import ImageCache
        from megaflow.env_hosts.pool import WarmPool
        from megaflow.core.keys import Keys

        self.client = docker_client
        self.settings = settings
        self.name = name
        self.redis = redis_client
        self.keys = keys or Keys(settings.key_prefix)
        self.is_live = is_live
        self.instance_id = uuid.uuid4().hex[:12]
        self._boot_slots = threading.BoundedSemaphore(settings.boot_concurrency)
        self._boot_api = None
        self._claims: dict[str, dict] = {}  # used when there is no Redis
        self._sessions: dict = {}  # container id -> ExecSession (warm containers; this process only)
        self._sessions_lock = threading.Lock()
        self._session_tried: set[str] = set()  # containers whose session was (being) opened in the background
        self.sessions = sessions  # open an exec session after a container's first plain exec
        self.images = ImageCache(docker_client, settings, name, redis_client=redis_client, keys=self.keys)
        self.pool = WarmPool(self, warm_images or ((settings.default_image,) if settings.env_mode == "persistent" else ()))

    @property
    def queues(self) -> list[str]:
        """Celery queues this host's env worker consumes: shared provisioning and its own operations."""
        return ["env", f"env.{self.name}"]

    # --- create ---------------------------------------------------------------------------------
    def ensure_image(self, image: str) -> bool:
        """Make ``image`` present on this host (pull if missing) and mark it used; True if pulled."""
        return self.images.ensure(image)

    def create(self, episode_id: str, image: str, *, labels: dict[str, str] | None = None,
               mode: str = "ephemeral", network: bool = False) -> dict:
        """Start a container for an episode and return its JSON-able handle.

        ``persistent`` takes a live warm container of ``image`` from this host's pool when one is
        there (and asks the pool to refill in the background), else boots one like ``ephemeral``.
        """
        if mode not in ("ephemeral", "persistent"):
            raise ValueError(f"mode must be 'ephemeral' or 'persistent', not {mode!r}")
        labels = L.qualify(labels)
        if mode == "persistent":
            self.pool.want(image)
            if not network:
                handle = self.pool.take(image, episode_id, labels)
                self.pool.refill_async(image)
                if handle is not None:
                    return handle
        all_labels = {**labels, L.EPISODE: episode_id, L.MODE: mode}
        for attempt in (1, 2):
            self.ensure_image(image)
            try:
                cid, name, expiry = self._boot(image, all_labels, lifetime=self.settings.container_lifetime_s,
                                               network=network, name=_container_name(self.name, episode_id))
                break
            except ImageMissingError:
                if attempt == 2:  # removed from under us twice: give up
                    raise
        return self._handle(cid, name, image, mode, episode_id, expiry, warm=False)

    def _handle(self, cid: str, name: str, image: str, mode: str, episode_id: str, expiry: float,
                *, warm: bool) -> dict:
        return {"container_id": cid, "name": name, "host": self.name, "image": image, "mode": mode,
                "episode_id": episode_id, "lease_expiry": expiry, "warm": warm}

    def _boot_client(self):
        if self._boot_api is None:
            from megaflow.env_hosts.images import api_with_timeout

            self._boot_api = api_with_timeout(self.client, self.settings.boot_timeout_s)
        return self._boot_api

    def _boot(self, image: str, labels: dict[str, str], *, lifetime: float, network: bool,
              name: str, auto_remove: bool = False) -> tuple[str, str, float]:
        """Create and start one container within the boot deadline; returns (id, name, lease expiry)."""
        s = self.settings
        expiry = time.time() + lifetime + LEASE_MARGIN_S
        labels = {**labels, L.MANAGED: "1", L.FLEET: self.settings.fleet_id, L.HOST: self.name, L.IMAGE: image,
                  L.LEASE_EXPIRY: f"{expiry:.0f}"}
        labels.setdefault(L.EPISODE, "")
        if not self._boot_slots.acquire(timeout=s.boot_timeout_s):
            raise RetryableInfraError(f"boot: {s.boot_concurrency} containers already booting on {self.name} "
                                      f"for {s.boot_timeout_s:.0f}s")
        api = self._boot_client()
        cid = None
        try:
            with docker_errors(f"boot of {image} on {self.name}", missing=InfraError):
                host_config = api.create_host_config(
                    nano_cpus=int(s.container_cpus * 1e9), mem_limit=s.container_memory,
                    memswap_limit=s.container_memory, pids_limit=s.container_pids,
                    network_mode="bridge" if network else "none", privileged=False, init=True,
                    auto_remove=auto_remove,
                    security_opt=["no-new-privileges"], cap_drop=["NET_RAW", "MKNOD", "AUDIT_WRITE"],
                )
                cid = api.create_container(image, ["sleep", str(int(lifetime))], name=name, labels=labels,
                                           host_config=host_config, working_dir="/", stdin_open=False,
                                           network_disabled=not network)["Id"]
                api.start(cid)
        except InfraError as exc:
            self.images._present_cache.discard(image)
            if cid is not None:
                self._remove(cid)
            if cid is None and "no such image" in str(exc).lower():
                raise ImageMissingError(f"boot of {image} on {self.name}: image missing ({exc})") from exc
            raise
        finally:
            self._boot_slots.release()
        return cid, name, expiry

    # --- exec -----------------------------------------------------------------------------------
    def execute(self, handle: dict, command: str, *, timeout: float | None = None, workdir: str | None = None,
                env: dict | None = None) -> ExecResult:
        """Run ``bash -lc command`` in the container; the time limit is enforced inside it.

        A command that fails or times out is a normal result (the agent sees it); a container that
        is gone or a Docker failure raises an InfraError.
        """
        timeout = self.settings.command_timeout_s if timeout is None else float(timeout)
        cid = handle["container_id"]
        session = self._sessions.get(cid)
        if session is not None and session.lock.acquire(blocking=False):  # busy: use plain docker exec
            try:
                result = self._exec_session(session, command, timeout=timeout, workdir=workdir, env=env)
                if result is not None:
                    return result
            finally:
                session.lock.release()
        argv = ["bash", "-c", _WRAPPER, "megaflow-exec", f"{timeout:g}s", "exec 2>&1\n" + command]
        result = self._exec(cid, argv, timeout=timeout, workdir=workdir, env=env)
        if self.sessions and session is None:
            self._open_session_async(cid)  # later commands skip `docker exec`
        return result

    def _exec_session(self, session, command: str, *, timeout: float, workdir: str | None,
                      env: dict | None) -> ExecResult | None:
        """Run through the container's exec session; None when it is unusable and nothing ran."""
        from megaflow.env_hosts.session import SessionBroken

        if session.broken:
            self._drop_session(session.container_id)
            return None
        started = time.monotonic()
        deadline = started + timeout + KILL_GRACE_S + CLIENT_SLACK_S
        try:
            session.send_command(command, timeout=timeout, workdir=workdir, env=env,
                                 cap=self.settings.output_cap_bytes)
        except SessionBroken:
            self._drop_session(session.container_id)
            return None
        try:
            reply = session.receive(deadline)
        except SessionBroken as exc:
            self._drop_session(session.container_id)
            self._check_running(session.container_id)
            raise RetryableInfraError(f"exec session in {session.container_id[:12]} broke mid-command: {exc}") from exc
        duration = time.monotonic() - started
        if reply is None:  # the client gave up; the in-container limit should have fired long before
            self._drop_session(session.container_id)
            return ExecResult(exit_code=None, output="", timed_out=True, duration_s=round(duration, 4),
                              truncated=False)
        code = reply.get("exit_code")
        dropped = int(reply.get("dropped") or 0)
        output = reply.get("head", "") + (f"\n[... {dropped} bytes of output omitted ...]\n" if dropped else "") \
            + reply.get("tail", "")
        return ExecResult(exit_code=code, output=output,
                          timed_out=code in (124, 137) and duration >= timeout * 0.95,
                          duration_s=round(duration, 4), truncated=dropped > 0)

    def _open_session(self, cid: str, *, background: bool = False) -> bool:
        """Start an exec session in ``cid`` (warm containers, off the critical path); False if unavailable."""
        from megaflow.env_hosts.session import ExecSession

        session = ExecSession.open(self.client.api, cid, kill_grace_s=KILL_GRACE_S)
        if session is None:
            return False
        with self._sessions_lock:
            if background and cid not in self._session_tried:  # closed while the session was opening
                session.close()
                return False
            self._sessions[cid] = session
        return True

    def _open_session_async(self, cid: str) -> None:
        """Open a session for ``cid`` in the background, once per container (overlaps the agent's next model call)."""
        with self._sessions_lock:
            if cid in self._session_tried or cid in self._sessions:
                return
            self._session_tried.add(cid)
        threading.Thread(target=self._open_session, args=(cid,), kwargs={"background": True},
                         name=f"exec-session-{cid[:12]}", daemon=True).start()

    def _drop_session(self, cid: str) -> None:
        with self._sessions_lock:
            session = self._sessions.pop(cid, None)
            self._session_tried.discard(cid)
        if session is not None:
            session.close()

    def _exec(self, cid: str, argv: list[str], *, timeout: float, workdir: str | None, env: dict | None) -> ExecResult:
        api = self.client.api
        cap = OutputCap(self.settings.output_cap_bytes)
        started = time.monotonic()
        deadline = started + timeout + KILL_GRACE_S + CLIENT_SLACK_S
        client_gave_up = False
        with docker_errors(f"exec in {cid[:12]}"):
            exec_id = api.exec_create(cid, argv, stdout=True, stderr=True, workdir=workdir,
                                      environment={k: str(v) for k, v in (env or {}).items()} or None)["Id"]
            sock = api.exec_start(exec_id, socket=True)
            raw = getattr(sock, "_sock", sock)
            try:
                client_gave_up = not _read_frames(raw, cap, deadline)
            finally:
                sock.close()
            info = api.exec_inspect(exec_id)
        duration = time.monotonic() - started
        code = None if info.get("Running") else info.get("ExitCode")
        # 124: timeout sent TERM; 137: it had to KILL. Only count them when the limit really passed.
        timed_out = client_gave_up or (code in (124, 137) and duration >= timeout * 0.95)
        if code is None and not client_gave_up:
            self._check_running(cid)
        return ExecResult(exit_code=code, output=cap.text(), timed_out=timed_out,
                          duration_s=round(duration, 4), truncated=cap.truncated)

    def _check_running(self, cid: str) -> None:
        with docker_errors(f"inspect {cid[:12]}"):
            state = self.client.api.inspect_container(cid)["State"]
        if not state.get("Running"):
            raise ContainerLostError(f"container {cid[:12]} stopped ({state.get('Status')}, "
                                     f"OOMKilled={state.get('OOMKilled')}, exit {state.get('ExitCode')})")

    def evaluate(self, handle: dict, command: str, *, timeout: float | None = None,
                 workdir: str | None = None, env: dict | None = None) -> ExecResult:
        """Run the evaluation command; a time-out raises CommandTimeoutError (a task error)."""
        timeout = self.settings.eval_timeout_s if timeout is None else timeout
        result = self.execute(handle, command, timeout=timeout, workdir=workdir, env=env)
        if result.timed_out:
            raise CommandTimeoutError(f"evaluation ran past {timeout:g}s: {result.output[-500:]}")
        return result

    # --- files ----------------------------------------------------------------------------------
    def put_files(self, handle: dict, files: dict[str, str | bytes]) -> None:
        """Write files (absolute path -> content) into the container as one tar archive."""
        buf = io.BytesIO()
        now = time.time()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for path, content in files.items():
                if not path.startswith("/"):
                    raise TaskError(f"put_files: path must be absolute, got {path!r}")
                data = content.encode() if isinstance(content, str) else bytes(content)
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size, info.mtime = len(data), now
                info.mode = 0o755 if data.startswith(b"#!") else 0o644
                tar.addfile(info, io.BytesIO(data))
        with docker_errors(f"put_files into {handle['container_id'][:12]}"):
            ok = self.client.api.put_archive(handle["container_id"], "/", buf.getvalue())
        if not ok:
            raise InfraError(f"put_files into {handle['container_id'][:12]}: Docker refused the archive")

    def get_file(self, handle: dict, path: str) -> bytes:
        """Read one regular file from the container; a missing path is a TaskError."""
        import docker.errors

        with docker_errors(f"get_file from {handle['container_id'][:12]}"):
            try:
                stream, _ = self.client.api.get_archive(handle["container_id"], path)
            except docker.errors.NotFound as exc:
                self._check_running(handle["container_id"])  # a gone container is an infra error
                raise TaskError(f"get_file: {path} does not exist in the container") from exc
            data = b"".join(stream)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise TaskError(f"get_file: {path} is not a regular file")
            return tar.extractfile(member).read()

    # --- close ----------------------------------------------------------------------------------
    def close(self, handle: dict) -> None:
        """Remove the episode's container (a used warm container is never returned to the pool); idempotent."""
        self._remove(handle["container_id"])
        self._drop_claim(handle["container_id"])

    def _remove(self, cid: str) -> bool:
        import docker.errors

        self._drop_session(cid)
        try:
            with docker_errors(f"remove {cid[:12]}"):
                try:
                    self.client.api.remove_container(cid, force=True, v=True)
                    return True
                except docker.errors.NotFound:
                    return False
                except docker.errors.APIError as exc:
                    if exc.status_code == 409 and "already in progress" in str(exc):
                        return False
                    raise
        except ContainerLostError:
            return False

    # --- claims of warm containers (labels cannot change after create) --------------------------
    def _claims_key(self) -> str:
        return self.keys.env(self.name, "claims")

    def _record_claim(self, cid: str, claim: dict) -> None:
        import json

        if self.redis is not None:
            self.redis.hset(self._claims_key(), cid, json.dumps(claim))
        else:
            self._claims[cid] = claim

    def _drop_claim(self, cid: str) -> None:
        if self.redis is not None:
            self.redis.hdel(self._claims_key(), cid)
        else:
            self._claims.pop(cid, None)

    def claims(self) -> dict[str, dict]:
        """Container id -> claim ({episode_id, lease_expiry, labels}) of warm containers handed out."""
        import json

        if self.redis is not None:
            return {k if isinstance(k, str) else k.decode(): json.loads(v)
                    for k, v in self.redis.hgetall(self._claims_key()).items()}
        return dict(self._claims)

    # --- upkeep ---------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        log.info("env host %s: %s", self.name, message)

    def _mark_owner_alive(self) -> None:
        """Tell other instances on this host that this one's warm pool is alive (TTL key)."""
        if self.redis is not None:
            ttl = int(max(60, 2 * self.settings.host_ttl_s))
            self.redis.set(self.keys.env(self.name, "owner", self.instance_id), "1", ex=ttl)

    def maintain(self, is_live: Callable[[str], bool] | None = None) -> dict:
        """One upkeep pass: reaper, warm-pool trim and refill, LRU image eviction. Returns counts."""
        from megaflow.env_hosts.reaper import reap

        reaped = reap(self, is_live or self.is_live)
        trimmed = self.pool.trim()
        started = self.pool.refill()
        evicted = self.images.evict(protect=self.in_use_images())
        return {"reaped": reaped, "warm_trimmed": trimmed, "warm_started": started, "evicted": evicted}

    def in_use_images(self) -> set[str]:
        """Images with a MegaFlow container on this host, or a warm pool, or the default image."""
        keep = {self.settings.default_image, *self.pool.wanted()}
        with docker_errors("list containers"):
            for c in self.client.api.containers(all=True, filters={"label": [f"{L.HOST}={self.name}",
                                                                                  f"{L.FLEET}={self.settings.fleet_id}"]}):
                keep.add(c["Labels"].get(L.IMAGE) or c["Image"])
        return keep

    def report(self) -> dict:
        """What the heartbeat registers: capacity, images present, warm containers per image, disk free."""
        return {"host": self.name, "capacity": self.settings.host_capacity, "images": self.images.present(),
                "warm": self.pool.counts(), "disk_free_gb": round(self.images.disk_free_gb(), 2)}

    def shutdown(self) -> None:
        """Remove this instance's warm containers (on a clean worker stop)."""
        self.pool.drain()
        for cid in list(self._sessions):
            self._drop_session(cid)


def _read_frames(raw: socket.socket, cap: OutputCap, deadline: float) -> bool:
    """Read Docker's multiplexed exec stream (8-byte frame headers) into ``cap`` until EOF.

    Returns False when ``deadline`` passed first (a process inside kept the stream open).
    """
    buf = b""
    need = 8
    header = True
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        raw.settimeout(min(remaining, 5.0))
        try:
            chunk = raw.recv(65536)
        except (socket.timeout, TimeoutError):
            continue
        if not chunk:
            return True
        buf += chunk
        while len(buf) >= need:
            if header:
                need = int.from_bytes(buf[4:8], "big")
                buf = buf[8:]
                header = False
                if need == 0:
                    need, header = 8, True
            else:
                cap.feed(buf[:need])
                buf = buf[need:]
                need, header = 8, True
