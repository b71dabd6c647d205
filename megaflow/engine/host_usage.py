"""What env hosts report about their machines: the ``usage`` part of each env worker's health report.

The heartbeat (megaflow.workers.process) writes process CPU seconds and resident memory and the
machine's load and available memory into ``Keys.worker_health("env", "env@<host>")``; the metrics
endpoint and the autoscaler's utilisation samples read them from here.
"""

from __future__ import annotations

import json

import redis

from megaflow.core.keys import Keys
from megaflow.core.wire import node_name


def env_host_usage(redis_client: redis.Redis, keys: Keys, hosts: list[str]) -> dict[str, dict[str, float]]:
    """Host -> its env worker's last usage report (process CPU and memory, machine load and free memory)."""
    raw = redis_client.mget([keys.worker_health("env", node_name("env", h)) for h in hosts]) if hosts else []
    out: dict[str, dict[str, float]] = {}
    for host, text in zip(hosts, raw, strict=True):
        try:
            usage = json.loads(text).get("usage") if text else None
        except (ValueError, AttributeError):
            usage = None
        if isinstance(usage, dict):
            out[host] = {k: float(v) for k, v in usage.items() if isinstance(v, (int, float))}
    return out
