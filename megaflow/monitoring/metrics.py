"""Prometheus metrics of MegaFlow's own state, read from Redis on each scrape.

Flower's ``/metrics`` covers Celery (task runtimes, worker events); this endpoint covers what
only MegaFlow knows: Celery queue lengths (with the broker's key prefix), the admission FIFO,
slots used per tier, warm pools, live episodes by state, and the elastic fleet (hosts by state,
target, pending launches, per-host used slots, host-hours and cost; ``fleet_families``). ``collect()`` returns the text
exposition format (written by hand, no extra dependency); ``serve_metrics()`` serves it from a
small threaded HTTP server (``megaflow metrics``, or the control service on ``metrics_port``).

Access: with ``metrics_user`` and ``metrics_password`` set every request needs HTTP basic auth (401
otherwise); bound to any address but loopback the endpoint refuses to start without them (ConfigError),
as Flower does.

Keys read (never written): the Celery queues ``<prefix>:celery:<queue>`` (plus their priority
lists) and ``<prefix>:celery:unacked``; the resource manager's keys through
``ResourceManager.capacity()``; ``<prefix>:live`` and each live episode's hash field ``state``;
the elastic keys through ``megaflow.elastic.usage.fleet_gauges``.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis

from megaflow.core import states
from megaflow.core.errors import ConfigError
from megaflow.core.keys import Keys
from megaflow.core.settings import Settings
from megaflow.core.wire import AGENT_QUEUE, ENV_QUEUE, MODEL_QUEUE, env_host_queue
from megaflow.engine.host_usage import env_host_usage

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# kombu's Redis transport keeps one list per priority step; priority 0 is the bare queue name.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
_CHUNK = 1000
NOT_TERMINAL = [s for s in states.ORDER if s not in states.TERMINAL]

Sample = tuple[dict[str, str], float]


def celery_prefix(settings: Settings) -> str:
    """The broker's ``global_keyprefix`` (see ``celery_app.create_app``)."""
    return f"{settings.key_prefix}:celery:"


def queue_keys(settings: Settings, queue: str) -> list[str]:
    """The Redis lists holding one Celery queue's messages, one per priority step."""
    base = celery_prefix(settings) + queue
    return [base if p == 0 else f"{base}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


class Exposition:
    """Builds Prometheus text exposition format, one metric family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, help_: str, samples: Iterable[Sample], kind: str = "gauge") -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                body = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{body}}} {_number(value)}")
            else:
                self.lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def collect(redis_client: redis.Redis, settings: Settings, keys: Keys) -> str:
    """Every MegaFlow gauge, in Prometheus text format (``redis_client`` must decode responses)."""
    from megaflow.engine.resources import ResourceManager

    started = time.perf_counter()
    cap = ResourceManager(redis_client, settings, keys).capacity()
    hosts = cap["hosts"]
    out = Exposition()

    queues = [MODEL_QUEUE, AGENT_QUEUE, ENV_QUEUE] + sorted({env_host_queue(h["name"]) for h in hosts})
    pipe = redis_client.pipeline(transaction=False)
    for q in queues:
        for key in queue_keys(settings, q):
            pipe.llen(key)
    pipe.hlen(celery_prefix(settings) + "unacked")
    res = pipe.execute()
    n = len(PRIORITY_STEPS)
    out.family(
        "megaflow_queue_length",
        "Messages waiting in a Celery queue (all priorities).",
        [({"queue": q}, sum(res[i * n : (i + 1) * n])) for i, q in enumerate(queues)],
    )
    out.family(
        "megaflow_celery_unacked", "Messages taken by workers and not yet acknowledged (all queues).", [({}, res[-1])]
    )

    queue = cap["queue"]
    out.family("megaflow_admission_backlog", "Episodes waiting in the admission FIFO.", [({}, queue["length"])])
    out.family(
        "megaflow_admission_oldest_wait_seconds",
        "How long the oldest waiting episode has waited.",
        [({}, queue["oldest_wait_s"])],
    )
    out.family(
        "megaflow_admission_admitted_not_started",
        "Episodes admitted (slots reserved) whose first task has not run yet.",
        [({}, queue["admitted_not_started"])],
    )

    used: list[Sample] = [({"tier": "global", "name": "global"}, cap["global"]["used"])]
    limit: list[Sample] = [({"tier": "global", "name": "global"}, cap["global"]["limit"])]
    for u in cap["users"]:
        used.append(({"tier": "user", "name": u["user"]}, u["used"]))
        limit.append(({"tier": "user", "name": u["user"]}, u["limit"]))
    for h in hosts:
        used.append(({"tier": "host", "name": h["name"]}, h["used"]))
        limit.append(({"tier": "host", "name": h["name"]}, h["capacity"]))
    out.family("megaflow_slots_used", "Slots held (live leases) per tier: global, user, host.", used)
    out.family("megaflow_slots_limit", "Slot limit per tier: global limit, user quota, host capacity.", limit)
    out.family(
        "megaflow_user_queued",
        "Episodes waiting in the FIFO per user.",
        [({"user": u["user"]}, u["queued"]) for u in cap["users"]],
    )

    out.family(
        "megaflow_env_host_up",
        "1 if the env host's heartbeat is recent, else 0.",
        [({"host": h["name"]}, 1 if h["alive"] else 0) for h in hosts],
    )
    out.family(
        "megaflow_env_host_drained",
        "1 if the env host takes no new episodes.",
        [({"host": h["name"]}, 1 if h["drained"] else 0) for h in hosts],
    )
    out.family(
        "megaflow_env_host_booting",
        "Containers being created on the env host.",
        [({"host": h["name"]}, h["booting"]) for h in hosts],
    )
    out.family(
        "megaflow_env_host_disk_free_gigabytes",
        "Disk free for images on the env host.",
        [({"host": h["name"]}, h["disk_free_gb"]) for h in hosts],
    )
    usage = env_host_usage(redis_client, keys, [h["name"] for h in hosts])
    for name, help_text, field, scale in (
        ("megaflow_env_host_cpu_seconds", "CPU seconds the env host's worker process used so far.", "cpu_s", 1),
        ("megaflow_env_host_memory_rss_bytes", "Resident memory of the env host's worker process.", "rss_mb", 2**20),
        ("megaflow_env_host_load1", "One-minute load average of the env host's machine.", "load1", 1),
        (
            "megaflow_env_host_memory_available_bytes",
            "Memory available on the env host's machine.",
            "mem_available_mb",
            2**20,
        ),
    ):
        out.family(name, help_text, [({"host": h}, u[field] * scale) for h, u in sorted(usage.items()) if field in u])
    out.family(
        "megaflow_warm_pool_size",
        "Warm (started, unclaimed) containers per env host and image.",
        [({"host": h["name"], "image": image}, n) for h in hosts for image, n in sorted(h["warm"].items())],
    )

    if settings.elastic or redis_client.exists(f"{settings.key_prefix}:elastic:fleet"):
        fleet_families(out, redis_client, settings, hosts)

    counts = episode_states(redis_client, keys)
    counts[states.QUEUED] = counts.get(states.QUEUED, 0) + queue["length"]
    names = NOT_TERMINAL + sorted(set(counts) - set(NOT_TERMINAL))
    out.family(
        "megaflow_episodes",
        "Unfinished episodes by state (queued ones from the FIFO, the rest live).",
        [({"state": s}, counts.get(s, 0)) for s in names],
    )

    out.family(
        "megaflow_scrape_duration_seconds",
        "Time this scrape spent reading Redis.",
        [({}, round(time.perf_counter() - started, 6))],
    )
    return out.text()


def fleet_families(out: Exposition, redis_client: redis.Redis, settings: Settings, hosts: list[dict]) -> None:
    """The elastic fleet's gauges (``megaflow.elastic.usage.fleet_gauges``), beside the per-host ones above."""
    from megaflow.core.errors import ConfigError
    from megaflow.elastic.config import ElasticConfig
    from megaflow.elastic.usage import fleet_gauges

    try:
        cfg = ElasticConfig.from_settings(settings)
    except ConfigError as exc:  # the control service refuses to start on it; a scrape still answers
        log.warning("metrics: %s; fleet cost uses no prices", exc)
        cfg = ElasticConfig(prices={})
    g = fleet_gauges(redis_client, settings.key_prefix, cfg)
    last = g["last_sample"] or {}
    out.family(
        "megaflow_fleet_hosts",
        "Env hosts the autoscaler manages, by state (launching, active, draining, removed).",
        [({"state": st}, n) for st, n in g["hosts_by_state"].items()],
    )
    out.family(
        "megaflow_fleet_serving_hosts",
        "Registered env hosts that are alive and not drained (static and autoscaled).",
        [({}, sum(1 for h in hosts if h["alive"] and not h["drained"]))],
    )
    out.family(
        "megaflow_fleet_target_hosts",
        "Env hosts the autoscaler wants (its last decision; -1 before the first).",
        [({}, last.get("target", -1))],
    )
    out.family(
        "megaflow_fleet_pending_launches",
        "Hosts launched and not yet registered.",
        [({}, g["hosts_by_state"]["launching"])],
    )
    out.family(
        "megaflow_fleet_queue_length",
        "Episodes waiting in the admission FIFO at the autoscaler's last tick.",
        [({}, last.get("queued", 0))],
    )
    out.family(
        "megaflow_fleet_host_used_slots",
        "Slots held per env host, with its instance type ('static' for hosts the autoscaler did not start).",
        [
            ({"host": h["name"], "instance_type": g["instance_types"].get(h["name"], "static")}, h["used"])
            for h in hosts
        ],
    )
    out.family(
        "megaflow_fleet_host_hours",
        "Host-hours of autoscaled hosts since the records began, by instance type.",
        [({"instance_type": t}, v) for t, v in sorted(g["host_hours"].items())],
    )
    out.family(
        "megaflow_fleet_cost",
        "Estimated cost of autoscaled hosts (host-hours x elastic.prices), by instance type.",
        [({"instance_type": t}, v) for t, v in sorted(g["cost"].items())],
    )
    out.family(
        "megaflow_fleet_warm_pool_target",
        "Warm containers per host the automatic mode choice asks for, by image.",
        [({"image": image}, n) for image, n in sorted(g["pools"].items())],
    )


def episode_states(redis_client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Live episodes (the ``live`` sorted set) counted by their ``state`` field."""
    counts: dict[str, int] = {}
    ids = redis_client.zrange(keys.live, 0, -1)
    for i in range(0, len(ids), _CHUNK):
        pipe = redis_client.pipeline(transaction=False)
        for eid in ids[i : i + _CHUNK]:
            pipe.hget(keys.episode(str(eid)), "state")
        for state in pipe.execute():
            if state is None or state in states.TERMINAL:  # expired or finishing between two reads
                continue
            counts[state] = counts.get(state, 0) + 1
    return counts


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP or ``localhost``) is reachable from this machine only."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or "" (every interface): assume other machines reach it


def metrics_auth(settings: Settings, address: str) -> str | None:
    """The ``Authorization`` header value a request must carry, or None (loopback without credentials).

    Raises ConfigError when credentials are half set, or missing on an address beyond loopback."""
    user = settings.metrics_user or ""
    password = settings.metrics_password.get_secret_value() if settings.metrics_password else ""
    if bool(user) != bool(password):
        raise ConfigError(
            "the metrics endpoint needs both MEGAFLOW_METRICS_USER and MEGAFLOW_METRICS_PASSWORD, or neither"
        )
    if ":" in user:
        raise ConfigError("MEGAFLOW_METRICS_USER must not contain ':' (HTTP basic auth splits user and password there)")
    if not user:
        if not is_loopback(address):
            raise ConfigError(
                f"the metrics endpoint would listen on {address or 'every interface'!r} "
                "(MEGAFLOW_METRICS_ADDRESS / --address), reachable from other machines, without credentials: "
                "set MEGAFLOW_METRICS_USER and MEGAFLOW_METRICS_PASSWORD (Prometheus: basic_auth in the scrape "
                "config), or listen on 127.0.0.1"
            )
        return None
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class MetricsServer(ThreadingHTTPServer):
    """Serves ``/metrics`` from a thread of its own; ``close()`` stops it and its Redis client."""

    daemon_threads = True

    def __init__(self, settings: Settings, address: str, port: int):
        self.auth = metrics_auth(settings, address)  # before anything is opened or bound
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = redis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=10, health_check_interval=30
        )
        super().__init__((address, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self.serve_forever, name="megaflow-metrics", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.server_close()
        self.redis.close()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        expected = self.server.auth
        if expected is not None:
            given = self.headers.get("Authorization") or ""
            if not hmac.compare_digest(given.encode(), expected.encode()):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="megaflow metrics"')
                denied = b"credentials required (HTTP basic auth: MEGAFLOW_METRICS_USER / MEGAFLOW_METRICS_PASSWORD)\n"
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(denied)))
                self.end_headers()
                self.wfile.write(denied)
                return
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._reply(
                200, "text/html; charset=utf-8", '<html><body><a href="/metrics">MegaFlow metrics</a></body></html>\n'
            )
            return
        if path != "/metrics":
            self._reply(404, "text/plain; charset=utf-8", "not found; try /metrics\n")
            return
        srv = self.server
        try:
            body = collect(srv.redis, srv.settings, srv.keys)
        except redis.RedisError as exc:
            log.warning("metrics scrape failed: %s", exc)
            self._reply(503, "text/plain; charset=utf-8", f"Redis unavailable: {exc}\n")
            return
        self._reply(200, CONTENT_TYPE, body)

    def _reply(self, code: int, ctype: str, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("metrics %s - %s", self.address_string(), fmt % args)


def serve_metrics(settings: Settings, port: int | None = None, address: str | None = None) -> MetricsServer:
    """Start the metrics endpoint in a background thread and return it (``.port``, ``.close()``)."""
    server = MetricsServer(
        settings,
        settings.metrics_address if address is None else address,
        settings.metrics_port if port is None else port,
    )
    return server.start()


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _number(v: Any) -> str:
    f = float(v)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


def start_for_service(settings: Settings) -> MetricsServer | None:
    """The endpoint a long-running service (control) starts on ``metrics_port``; None when that is 0
    or the port is taken (metrics are worth a warning, not a service that will not start). Missing
    credentials beyond loopback are a ConfigError: the service refuses to start."""
    if not settings.metrics_port:
        return None
    metrics_auth(settings, settings.metrics_address)
    try:
        server = serve_metrics(settings)
    except OSError as exc:
        log.warning(
            "metrics endpoint not started on %s:%s: %s (set MEGAFLOW_METRICS_PORT, or 0 for none)",
            settings.metrics_address,
            settings.metrics_port,
            exc,
        )
        return None
    log.info("metrics on http://%s:%s/metrics", settings.metrics_address, server.port)
    return server
