"""Role workers: ``megaflow worker model|agent|env``, each with the pool that suits its work.

- model: threads (I/O bound HTTP calls), many in flight
- agent: threads by default (decisions are short; no IPC per task), or a small prefork pool
         (``agent_pool=prefork``) for CPU-heavy custom agents
- env:   threads (container API calls); consumes ``env`` and its own ``env.<host>``; runs the host
         heartbeat (registration, lease renewal) and, on a thread of its own, its upkeep (warm pool,
         image eviction, reaper)
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaflow.core import states, wire
from megaflow.core.settings import Settings
from megaflow.services.installed import serve_gateway_socket
from megaflow.services.root import Root

log = logging.getLogger(__name__)

ROLES = ("model", "agent", "env")
# A worker's young-generation GC threshold (Python's default is 700 allocations). At the default the
# cyclic collector ran every few tasks in a worker with hundreds of threads; with this and the
# start-up objects frozen out of every collection, an env worker spent ~10% less CPU per episode at
# N=3,000 (bench/scale.py, one env host with it against one without, same runs).
GC_YOUNG_THRESHOLD = 20_000


@dataclass
class RolePlan:
    """How one role's worker runs: pool kind, concurrency and queues."""

    role: str
    pool: str
    concurrency: int
    queues: list[str]
    name: str


def plan(role: str, settings: Settings, *, host: str | None = None, concurrency: int | None = None) -> RolePlan:
    if role not in ROLES:
        raise ValueError(f"unknown worker role {role!r}: choose one of {', '.join(ROLES)}")
    host = host or settings.host_name
    if role == "model":
        return RolePlan(
            role, "threads", concurrency or settings.model_concurrency, [wire.MODEL_QUEUE], wire.node_name(role, host)
        )
    if role == "agent":
        return RolePlan(
            role,
            settings.agent_pool,
            concurrency or settings.agent_concurrency,
            [wire.AGENT_QUEUE],
            wire.node_name(role, host),
        )
    return RolePlan(
        role,
        "threads",
        concurrency or settings.env_concurrency,
        [wire.ENV_QUEUE, wire.env_host_queue(host)],
        wire.node_name(role, host),
    )


def machine_usage() -> dict[str, float]:
    """This worker's CPU seconds and resident memory, and its machine's load and available memory
    (from /proc; what the fleet's metrics and utilisation samples show per host)."""
    out: dict[str, float] = {}
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        out["cpu_s"] = round((int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), 2)
        out["rss_mb"] = round(int(stat[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
        out["load1"] = round(os.getloadavg()[0], 2)
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                out["mem_available_mb"] = round(int(line.split()[1]) / 1024, 1)
    except (OSError, IndexError, ValueError):
        pass
    return out


# KEYS: episode hashes; ARGV[1]: this host, ARGV[2..]: the final states. Returns the (1-based)
# positions of the episodes that do not run here: gone, final, or placed on another host.
GONE_LUA = """
local final = {}
for i = 2, #ARGV do final[ARGV[i]] = true end
local gone = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'state', 'host')
  if not v[1] or final[v[1]] or v[2] ~= ARGV[1] then gone[#gone + 1] = i end
end
return gone
"""


class LiveEpisodes:
    """Whether episodes still run here: not final, and placed on this host (a moved one is not ours).

    Called with one episode id it asks Redis once (the same script); ``many`` asks for a set of them in one script call
    per 1,000 (the reaper's pass over a host with thousands of sandboxes), which answers with the
    few that no longer run. A pipeline of one ``HMGET`` per episode cost the worker ~20 us of Python
    per episode in every pass: ~8% of an env worker's GIL samples at N=10,000 (py-spy).
    """

    CHUNK = 1000

    def __init__(self, root: Root):
        self.root = root
        self._gone = root.redis.register_script(GONE_LUA)
        self._final = sorted(states.TERMINAL)

    def __call__(self, episode_id: str) -> bool:
        return episode_id in self.many({episode_id})  # the script is the one definition of "live here"

    def many(self, episode_ids: set[str]) -> set[str]:
        ids, live = sorted(episode_ids), set[str]()
        episode = self.root.keys.episode
        for i in range(0, len(ids), self.CHUNK):
            chunk = ids[i : i + self.CHUNK]
            gone = self._gone(keys=[episode(eid) for eid in chunk], args=[self.root.host, *self._final])
            live.update(chunk)
            live.difference_update(chunk[int(n) - 1] for n in gone)
        return live


class Heartbeat(threading.Thread):
    """Reports the worker's health to Redis; on env workers also keeps the host registered.

    A failing beat (Redis or the container engine down) is logged in one line per back-off, and
    retried until it works again.
    """

    def __init__(self, root: Root, node: str, queues: list[str], concurrency: int):
        super().__init__(name="megaflow-heartbeat", daemon=True)
        self.root = root
        self.node = node
        self.queues = queues
        self.concurrency = concurrency
        self.stop = threading.Event()
        self.gateway_socket: Any = None  # env hosts: the episode gateway on the containers' Unix socket
        self.interval = max(0.5, min(root.settings.lease_s, root.settings.host_ttl_s) / 4)
        self.maintain_every = max(self.interval, 10.0)
        self.pool_sizes: dict[str, int] | None = None  # the fleet's published warm pools, last applied
        self.is_live = LiveEpisodes(root)

    def beat(self) -> None:
        root = self.root
        report: dict = {}
        failed: Exception | None = None
        if root.role == "env":
            try:  # the worker's own health is written even when its container engine fails
                self.apply_pool_sizes()
                report = root.env_host.report()
            except Exception as exc:
                failed = exc
        root.redis.set(
            root.keys.worker_health(root.role, self.node),
            json.dumps(
                {
                    "role": root.role,
                    "name": self.node,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "queues": self.queues,
                    "concurrency": self.concurrency,
                    "ts": time.time(),
                    "usage": machine_usage(),
                    **({"sandbox_starts": report["sandbox_starts"]} if "sandbox_starts" in report else {}),
                }
            ),
            ex=int(self.interval * 4) + 1,
        )
        if failed is not None:
            raise failed
        if root.role == "env":
            joined = root.resources.register_host(
                root.host,
                capacity=report.get("capacity", root.settings.host_capacity),
                images=report.get("images", []),
                warm=report.get("warm", {}),
                disk_free_gb=report.get("disk_free_gb", 0.0),
            )
            held = root.resources.renew_host(root.host)
            if joined:  # a host joining (or back after its heartbeat lapsed) is an admission event
                root.lifecycle.admit()
            if root.resources.leaving(root.host) and held == 0 and not root.resources.host_loss.live_on({root.host}):
                self.leave()

    def apply_pool_sizes(self) -> None:
        """Hand the fleet's published warm-pool sizes (``E:pools``) to the env backend when they change."""
        setter = getattr(self.root.env_host, "set_pool_sizes", None)
        if setter is None:
            return
        from megaflow.elastic.modes import published_pools

        sizes = published_pools(self.root.redis, self.root.settings.key_prefix)
        if sizes != self.pool_sizes:
            applied = setter(sizes)
            log.info("env host %s: warm pools %s (fleet asked for %s)", self.root.host, applied, sizes)
            self.pool_sizes = sizes

    def leave(self) -> None:
        """Told to leave and drained: unregister, then stop this worker (a warm shutdown)."""
        log.warning("env host %s drained after being told to leave: stopping", self.root.host)
        self.root.resources.remove_host(self.root.host)
        self.stop.set()
        os.kill(os.getpid(), signal.SIGTERM)

    def run(self) -> None:
        if self.root.role == "env":  # upkeep on a thread of its own: a slow pass never delays a beat
            threading.Thread(target=self.maintain_loop, name="megaflow-maintain", daemon=True).start()
        failures = 0
        while not self.stop.is_set():
            try:
                self.beat()
                if failures:
                    log.warning("heartbeat of %s works again after %d failed attempts", self.node, failures)
                failures = 0
            except Exception as exc:
                failures += 1
                if failures & (failures - 1) == 0:  # one line at attempts 1, 2, 4, 8, ...
                    log.warning(
                        "heartbeat of %s failed (%s: %s); attempt %d, retrying every %.1fs",
                        self.node,
                        type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "",
                        failures,
                        self.interval,
                    )
                log.debug("heartbeat failure", exc_info=True)
            # retry at the beat's own period: a host must beat again within its TTL once Redis is back
            self.stop.wait(self.interval)

    def maintain_loop(self) -> None:
        """The env host's upkeep (reaper, warm pools, image eviction) every ``maintain_every`` seconds.

        Apart from the beat: a pass that takes long (container removals and warm boots on a loaded
        machine) would otherwise hold the next beat past ``host_ttl_s``, and the host would be judged
        lost with its episodes moved to new attempts.
        """
        failures = 0
        while not self.stop.wait(self.maintain_every):
            try:
                self.root.env_host.maintain(is_live=self.is_live)
                failures = 0
            except Exception as exc:
                failures += 1
                if failures & (failures - 1) == 0:  # one line at failures 1, 2, 4, 8, ...
                    log.warning("maintenance of env host %s failed (attempt %d): %s", self.root.host, failures, exc)
                log.debug("maintenance failure", exc_info=True)

    def stop_and_shutdown(self) -> None:
        """Stop beating; an env worker's warm containers go with it."""
        self.stop.set()
        if self.gateway_socket is not None:
            self.gateway_socket.stop()
        if self.root.role == "env":
            try:
                self.root.env_host.shutdown()
            except Exception:
                log.exception("env host shutdown failed; the reaper will remove what is left")


def host_name_taken(redis_client, key_prefix: str, node: str, host: str) -> str | None:
    """Why env host ``host`` must not start (another live worker serves it), or None.

    Two workers with one host name would share its queue, so an operation on a container could
    reach the worker that does not hold it. A worker beating under the same node name elsewhere
    (another machine, beat within its TTL), or a live process on this machine, holds the name; a
    crashed one's last report (its pid gone) does not.
    """
    from megaflow.core.keys import Keys

    raw = redis_client.get(Keys(key_prefix).worker_health("env", node))
    if not raw:
        return None
    try:
        info = json.loads(raw)
        pid, machine = int(info.get("pid", 0)), str(info.get("host", ""))
    except (ValueError, TypeError, AttributeError):
        return None
    if machine == socket.gethostname():
        if pid == os.getpid():
            return None
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None
        if state == "Z" or (b"megaflow" not in cmd and b"celery" not in cmd):
            return None
    age = max(0.0, time.time() - float(info.get("ts", 0) or 0))
    return (
        f"env host name {host!r} is in use by another worker (pid {pid} on {machine or '?'}, last beat "
        f"{age:.0f}s ago): two workers with one host name would share its queue. Start this one with "
        "another --host (MEGAFLOW_HOST_NAME), or stop that one first."
    )


def start_heartbeat(root: Root, node: str) -> Heartbeat:
    """Reap what a crash left (env hosts), then start this worker's heartbeat thread."""
    p = plan(root.role, root.settings, host=root.host) if root.role in ROLES else None
    hb = Heartbeat(root, node, p.queues if p else [], p.concurrency if p else 0)
    if root.role == "env":
        try:
            root.env_host.maintain(is_live=hb.is_live)
        except Exception as exc:
            log.warning("first maintenance of env host %s failed: %s", root.host, exc)
        try:
            hb.gateway_socket = serve_gateway_socket(root)
        except OSError as exc:
            log.warning("env host %s: no episode gateway socket (%s); installed agents get no model", root.host, exc)
    hb.start()
    return hb


def run_worker(
    role: str, settings: Settings, *, host: str | None = None, concurrency: int | None = None, loglevel: str = "INFO"
) -> None:
    """Start one role's Celery worker in this process (blocks until it stops)."""
    from megaflow.engine import delivery
    from megaflow.workers import celery_app as app_module
    from megaflow.workers import pool, tasks

    p = plan(role, settings, host=host, concurrency=concurrency)
    app_module.configure(settings)
    if not settings.task_log:  # Celery's "received" / "succeeded" INFO lines, two per step (retries: tasks.py)
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(loglevel.upper())))
    tasks.set_identity(role, host or settings.host_name if role == "env" else settings.host_name)
    # steps run in this process: their deliveries' unacked records are written by their first read
    delivery.defer_appends = p.pool == "threads"
    if p.pool == "threads":
        app_module.app.conf.worker_pool = pool.POOL
    # what is loaded by now lives as long as the process: no collection needs to look at it again
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    app_module.app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(p.queues),
            # the threads pool is MegaFlow's (megaflow.workers.pool): Celery's CLI takes a pool class only
            # through the app's worker_pool setting, which stands in for its default ("prefork")
            *(["--pool", p.pool] if p.pool != "threads" else []),
            "--concurrency",
            str(p.concurrency),
            "--hostname",
            p.name,
            *(["--task-events"] if settings.task_events else []),
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )
