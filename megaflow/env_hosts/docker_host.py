"""The ``docker`` env backend: one env host's containers through the Docker SDK.

It composes the parts, each in a module of its own: containers.py (boot, plain exec, files,
remove), session.py (exec sessions: a runner already inside a container), claims.py (which
episode took which warm container), pool.py (warm pool), image_cache.py (pull, LRU eviction)
and reaper.py, plus shell.py for long-lived shell sessions.

Time limits line up (all in settings): ``command_timeout_s`` / ``eval_timeout_s`` per command,
inside the container < ``episode_budget_s`` (the agent's, kept by the engine) <
``container_lifetime_s`` (the dead-man's switch; the lease label lapses 60 s later and the
reaper removes the container) < ``episode_guard_s`` (the engine's sweep). A warm container
lives ``warm_idle_s + container_lifetime_s`` and is replaced after ``warm_idle_s`` idle, so the
one handed out always has a full lifetime left. ``pull_timeout_s`` bounds a pull and
``boot_timeout_s`` a create + start (and the wait for one of ``boot_concurrency`` boot slots).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from megaflow.core.errors import CommandTimeoutError, RetryableInfraError
from megaflow.env_hosts import labels as L
from megaflow.env_hosts import shell
from megaflow.env_hosts.base import EnvHandle, ExecResult
from megaflow.env_hosts.claims import Claims
from megaflow.env_hosts.containers import CLIENT_SLACK_S, HOME, KILL_GRACE_S, Containers, container_name, parse_user
from megaflow.env_hosts.disk import DiskLimit
from megaflow.env_hosts.errors import ImageMissingError, docker_errors
from megaflow.env_hosts.image_cache import ImageCache
from megaflow.env_hosts.pool import WarmPool
from megaflow.env_hosts.session import ExecSessions, SessionLost

log = logging.getLogger(__name__)


class DockerHost:
    """Container operations on this env host via the Docker SDK (implements ``EnvHost``).

    Redis keys owned (all optional; without ``redis_client`` the same state lives in memory):
    ``keys.env(host, "images")`` hash image -> last use (LRU), ``keys.env(host, "claims")`` hash
    container id -> JSON claim of a warm container by an episode, ``keys.env(host, "owner", id)``
    string with TTL: this instance's warm pool is alive.
    """

    backend = "docker"

    def __init__(
        self,
        docker_client,
        settings,
        *,
        name: str,
        redis_client=None,
        keys=None,
        is_live: Callable[[str], bool] | None = None,
        warm_images: list[str] | tuple[str, ...] = (),
        sessions: bool = True,
    ):
        from megaflow.core.keys import Keys

        self.client = docker_client
        self.settings = settings
        self.name = name
        self.redis = redis_client
        self.keys = keys or Keys(settings.key_prefix)
        self.is_live = is_live
        self.instance_id = uuid.uuid4().hex[:12]
        self.sessions = sessions  # open an exec session after a container's first plain exec
        self.images = ImageCache(docker_client, settings, name, redis_client=redis_client, keys=self.keys)
        self.disk = DiskLimit(docker_client, settings)
        self.containers = Containers(docker_client, settings, name, self.images, self.disk)
        self.exec_sessions = ExecSessions(
            docker_client.api, kill_grace_s=KILL_GRACE_S, cap=settings.output_cap_bytes, client_slack_s=CLIENT_SLACK_S
        )
        self.claim_store = Claims(redis_client, self.keys.env(name, "claims") if redis_client is not None else None)
        pinned = warm_images or ((settings.default_image,) if settings.env_mode == "persistent" else ())
        self.pool = WarmPool(
            settings,
            host=name,
            instance_id=self.instance_id,
            containers=self.containers,
            sessions=self.exec_sessions,
            claims=self.claim_store,
            images=self.images,
            pinned=pinned,
            log=self.log,
            on_refill=self._mark_owner_alive,
        )

    @property
    def queues(self) -> list[str]:
        """Celery queues this host's env worker consumes: shared provisioning and its own operations."""
        return ["env", f"env.{self.name}"]

    # --- images ---------------------------------------------------------------------------------
    def ensure_image(self, image: str) -> bool:
        """Make ``image`` present on this host (pull if missing) and mark it used; True if pulled."""
        return self.images.ensure(image)

    def has_image(self, image: str) -> bool:
        return self.images.has(image)

    # --- create ---------------------------------------------------------------------------------
    def create(
        self,
        episode_id: str,
        image: str,
        *,
        labels: dict[str, str] | None = None,
        mode: str = "ephemeral",
        network: bool = False,
        user: str | None = None,
        workdir: str | None = None,
    ) -> EnvHandle:
        """Start a container for an episode and return its handle.

        ``persistent`` takes a live warm container of ``image`` from this host's pool when one is
        there (and asks the pool to refill in the background), else boots one like ``ephemeral``.
        Commands run as ``user`` ("root" or "UID[:GID]"; default ``settings.container_user``); an
        unprivileged user owns its HOME and ``workdir`` (created if missing).
        """
        user = user or self.settings.container_user
        parse_user(user)  # a bad user fails here, not at the first command
        if mode not in ("ephemeral", "persistent"):
            raise ValueError(f"mode must be 'ephemeral' or 'persistent', not {mode!r}")
        labels = L.qualify(labels)
        if mode == "persistent":
            self.pool.want(image)
            if not network:
                taken = self.pool.take(image, episode_id, labels)
                self.pool.refill_async(image)
                if taken is not None:
                    entry, expiry = taken
                    self._prepare(entry.container_id, user, workdir, home=user != self.settings.container_user)
                    return self._handle(
                        entry.container_id,
                        entry.name,
                        image,
                        mode,
                        episode_id,
                        expiry,
                        warm=True,
                        user=user,
                        workdir=workdir,
                    )
        all_labels = {**labels, L.EPISODE: episode_id, L.MODE: mode}
        for attempt in (1, 2):
            self.ensure_image(image)
            try:
                cid, name, expiry = self.containers.boot(
                    image,
                    all_labels,
                    lifetime=self.settings.container_lifetime_s,
                    network=network,
                    name=container_name(self.name, episode_id),
                    user=user,
                )
                break
            except ImageMissingError:
                if attempt == 2:  # removed from under us twice: give up
                    raise
        try:
            self._prepare(cid, user, workdir)
        except Exception:
            self.remove_container(cid)
            raise
        return self._handle(cid, name, image, mode, episode_id, expiry, warm=False, user=user, workdir=workdir)

    def _prepare(self, cid: str, user: str, workdir: str | None, *, home: bool = False) -> None:
        """Give an unprivileged user its work dir (and HOME when the container was booted for another user)."""
        if parse_user(user)[0] == 0:
            return
        dirs = ([HOME] if home else []) + ([workdir] if workdir else [])
        if dirs:
            self.containers.make_dirs(cid, dirs, user)

    def _handle(
        self,
        cid: str,
        name: str,
        image: str,
        mode: str,
        episode_id: str,
        expiry: float,
        *,
        warm: bool,
        user: str,
        workdir: str | None,
    ) -> EnvHandle:
        writable = [] if parse_user(user)[0] == 0 else [HOME, "/tmp", *([workdir] if workdir else [])]
        return EnvHandle(
            backend=self.backend,
            host=self.name,
            id=cid,
            episode_id=episode_id,
            image=image,
            mode=mode,
            data={"name": name, "lease_expiry": expiry, "warm": warm, "user": user, "writable": writable},
        )

    @staticmethod
    def _user(handle: EnvHandle, user: str | None) -> str:
        """The user a command runs as: ``user``, else the handle's (root for handles from before users existed)."""
        return user or handle.data.get("user") or "root"

    # --- exec -----------------------------------------------------------------------------------
    def execute(
        self,
        handle: EnvHandle | dict,
        command: str,
        *,
        timeout: float | None = None,
        workdir: str | None = None,
        env: dict | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run ``bash -lc command`` in the container as the handle's user (or ``user``), time-limited inside.

        A command that fails or times out is a normal result (the agent sees it); a container that
        is gone or a Docker failure raises an InfraError.
        """
        timeout = self.settings.command_timeout_s if timeout is None else float(timeout)
        h = EnvHandle.coerce(handle)
        cid, user = h.id, self._user(h, user)
        had_session = cid in self.exec_sessions
        try:
            result = self.exec_sessions.run(cid, command, timeout=timeout, workdir=workdir, env=env, user=user)
        except SessionLost as exc:
            self.containers.check_running(cid)
            raise RetryableInfraError(f"exec session in {cid[:12]} broke mid-command: {exc}") from exc
        if result is not None:
            return result
        result = self.containers.exec(cid, command, timeout=timeout, workdir=workdir, env=env, user=user)
        if self.sessions and not had_session:
            self.exec_sessions.open_async(cid, user=user)  # later commands skip `docker exec`
        return result

    def evaluate(
        self,
        handle: EnvHandle | dict,
        command: str,
        *,
        timeout: float | None = None,
        workdir: str | None = None,
        env: dict | None = None,
    ) -> ExecResult:
        """Run the evaluation command; a time-out raises CommandTimeoutError (a task error)."""
        timeout = self.settings.eval_timeout_s if timeout is None else timeout
        result = self.execute(handle, command, timeout=timeout, workdir=workdir, env=env)
        if result.timed_out:
            raise CommandTimeoutError(f"evaluation ran past {timeout:g}s: {result.output[-500:]}")
        return result

    # --- long-lived shell sessions (state kept in the container, see shell.py) -------------------
    def open_session(self, handle: EnvHandle | dict, *, workdir: str | None = None, env: dict | None = None) -> str:
        sid = shell.new_session_id()
        res = self.execute(handle, shell.open_script(sid, workdir, env), timeout=self.settings.command_timeout_s)
        if res.exit_code != 0:
            from megaflow.core.errors import TaskError

            raise TaskError(f"open_session: could not start a shell session: {res.output[-500:]}")
        return sid

    def run_in_session(
        self, handle: EnvHandle | dict, session_id: str, command: str, *, timeout: float | None = None
    ) -> ExecResult:
        return self.execute(handle, shell.wrap(session_id, command), timeout=timeout)

    def close_session(self, handle: EnvHandle | dict, session_id: str) -> None:
        self.execute(handle, shell.close_script(session_id), timeout=self.settings.command_timeout_s)

    # --- files ----------------------------------------------------------------------------------
    def put_files(self, handle: EnvHandle | dict, files: dict[str, str | bytes]) -> None:
        """Write files (absolute path -> content) into the container, owned by the handle's user."""
        h = EnvHandle.coerce(handle)
        self.containers.put_files(h.id, files, user=self._user(h, None), writable=tuple(h.data.get("writable") or ()))

    def get_file(self, handle: EnvHandle | dict, path: str) -> bytes:
        """Read one regular file from the container; a missing path is a TaskError."""
        return self.containers.get_file(EnvHandle.coerce(handle).id, path)

    # --- close ----------------------------------------------------------------------------------
    def close(self, handle: EnvHandle | dict) -> None:
        """Remove the episode's container (a used warm container is never returned to the pool); idempotent."""
        self.remove_container(EnvHandle.coerce(handle).id)

    def close_episode(self, episode_id: str) -> list[str]:
        """Remove every container of ``episode_id`` on this host (its sandbox, a fresh evaluation one); ids removed."""
        gone = []
        for c in self.containers.list_mine():
            if (c.get("Labels") or {}).get(L.EPISODE) == episode_id and self.remove_container(c["Id"]):
                gone.append(c["Id"])
        return gone

    def remove_container(self, cid: str) -> bool:
        """Drop its exec session and claim and force-remove it; False when it was already gone."""
        self.exec_sessions.drop(cid)
        removed = self.containers.remove(cid)
        self.claim_store.drop(cid)
        return removed

    def claims(self) -> dict[str, dict]:
        """Container id -> claim ({episode_id, lease_expiry, labels}) of warm containers handed out."""
        return self.claim_store.all()

    # --- upkeep ---------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        log.info("env host %s: %s", self.name, message)

    def _mark_owner_alive(self) -> None:
        """Tell other instances on this host that this one's warm pool is alive (TTL key)."""
        if self.redis is not None:
            ttl = int(max(60, 2 * self.settings.host_ttl_s))
            self.redis.set(self.keys.env(self.name, "owner", self.instance_id), "1", ex=ttl)

    def owner_alive(self, owner: str) -> bool:
        """Whether the DockerHost instance ``owner`` (of this host) still keeps its warm pool."""
        if owner == self.instance_id:
            return True
        if self.redis is None:
            return False
        return bool(self.redis.exists(self.keys.env(self.name, "owner", owner)))

    def maintain(self, is_live: Callable[[str], bool] | None = None) -> dict:
        """One upkeep pass: reaper, warm-pool trim and refill, LRU image eviction. Returns counts."""
        from megaflow.env_hosts.reaper import reap

        reaped = reap(self, is_live or self.is_live)
        trimmed = self.pool.trim()
        started = self.pool.refill()
        evicted = self.images.evict(protect=self.in_use_images())
        disks = self.disk.sweep(self.containers.list_all_ids)
        return {
            "reaped": reaped,
            "warm_trimmed": trimmed,
            "warm_started": started,
            "evicted": evicted,
            "disks_released": disks,
        }

    def set_pool_sizes(self, sizes: dict[str, int]) -> dict[str, int]:
        """Apply the fleet's warm-pool sizes (image -> containers per host) within ``host_capacity``.

        Excess warm containers are removed now; missing ones start in the background. Returns the
        sizes applied (see ``WarmPool.set_sizes``).
        """
        applied = self.pool.set_sizes(sizes, self.settings.host_capacity)
        self.pool.trim()
        for image in applied:
            self.pool.refill_async(image)
        return applied

    def in_use_images(self) -> set[str]:
        """Images with a MegaFlow container on this host, or a warm pool, or the default image."""
        keep = {self.settings.default_image, *self.pool.wanted()}
        for c in self.containers.list_mine():
            keep.add(c["Labels"].get(L.IMAGE) or c["Image"])
        return keep

    def report(self) -> dict:
        """What the heartbeat registers: capacity, images present, warm containers per image, disk free.

        The engine is pinged first: with the Docker engine down the heartbeat fails, the host's
        registration lapses after ``host_ttl_s``, and the control service marks it lost (its slots
        released, its episodes re-queued on other hosts) until the engine answers again.
        """
        with docker_errors("ping the Docker engine"):
            self.client.ping()
        return {
            "host": self.name,
            "backend": self.backend,
            "capacity": self.settings.host_capacity,
            "images": self.images.present(),
            "warm": self.pool.counts(),
            "pool_sizes": {img: self.pool.size(img) for img in sorted(self.pool.wanted())},
            "disk_free_gb": round(self.images.disk_free_gb(), 2),
            "disk_limit": self.disk.describe(),
        }

    def shutdown(self) -> None:
        """Remove this instance's warm containers (on a clean worker stop)."""
        self.pool.drain()
        self.exec_sessions.drop_all()
