"""Reaper: remove this host's containers that a crash or a lost episode left behind.

Removed: containers of this host whose episode is finished or unknown (``is_live`` says False),
whose lease lapsed, or warm-pool containers whose owning DockerHost instance is gone. Never
touched: containers without the full MegaFlow label set, or labelled for another host.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from megaflow.env_hosts import labels as L
from megaflow.env_hosts.errors import docker_errors


def _owner_alive(host, owner: str) -> bool:
    if owner == host.instance_id:
        return True
    if host.redis is None:
        return False
    return bool(host.redis.exists(host.keys.env(host.name, "owner", owner)))


def reap(host, is_live: Callable[[str], bool] | None = None) -> list[str]:
    """One pass over this host's containers; returns the ids removed.

    ``is_live(episode_id)`` says whether an episode still runs (None: only lapsed leases and
    orphaned warm containers are removed).
    """
    now = time.time()
    with docker_errors("list containers"):
        containers = host.client.api.containers(all=True, filters={"label": [f"{L.HOST}={host.name}",
                                                                              f"{L.FLEET}={host.settings.fleet_id}",
                                                                              f"{L.MANAGED}=1"]})
    claims = host.claims()
    removed: list[str] = []
    for c in containers:
        labels = c.get("Labels") or {}
        if (not L.is_megaflow(labels) or labels.get(L.HOST) != host.name
                or labels.get(L.FLEET) != host.settings.fleet_id):
            continue
        cid = c["Id"]
        try:
            expiry = float(labels.get(L.LEASE_EXPIRY) or 0)
        except ValueError:
            expiry = 0.0
        episode = labels.get(L.EPISODE) or ""
        claim = claims.get(cid)
        if claim:
            episode = claim.get("episode_id") or episode
            expiry = min(expiry, float(claim.get("lease_expiry") or expiry))
        if now > expiry:
            why = "lease lapsed"
        elif episode:
            if is_live is None or is_live(episode):
                continue
            why = f"episode {episode} finished or unknown"
        else:  # a warm container not handed out
            owner = labels.get(L.POOL_OWNER, "")
            if owner == host.instance_id and (host.pool.owns(cid) or now - c.get("Created", now) < host.settings.boot_timeout_s):
                continue
            if owner != host.instance_id and _owner_alive(host, owner):
                continue
            why = "warm container of a gone pool"
        if host._remove(cid):
            removed.append(cid)
        if claim:
            host._drop_claim(cid)
        host.log(f"reaped {cid[:12]} ({why})")
    # claims of containers that no longer exist
    existing = {c["Id"] for c in containers}
    for cid in claims:
        if cid not in existing:
            host._drop_claim(cid)
    return removed
