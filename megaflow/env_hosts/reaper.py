"""Reaper: remove this host's containers that a crash or a lost episode left behind.

Removed: containers of this host whose episode is finished or unknown (``is_live`` says False),
whose lease lapsed, or warm-pool containers whose owning DockerHost instance is gone. Never
touched: containers without the full MegaFlow label set, or labelled for another host.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from megaflow.env_hosts import labels as L


def reap(host, is_live: Callable[[str], bool] | None = None) -> list[str]:
    """One pass over this host's containers; returns the ids removed.

    ``host`` is a DockerHost (its public parts: containers, claims, pool, owner_alive, remove_container).
    ``is_live(episode_id)`` says whether an episode still runs (None: only lapsed leases and
    orphaned warm containers are removed).
    """
    now = time.time()
    containers = host.containers.list_mine()
    claims = host.claims()
    removed: list[str] = []
    for c in containers:
        labels = c.get("Labels") or {}
        if (
            not L.is_megaflow(labels)
            or labels.get(L.HOST) != host.name
            or labels.get(L.FLEET) != host.settings.fleet_id
        ):
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
            mine = owner == host.instance_id
            if mine and (host.pool.owns(cid) or now - c.get("Created", now) < host.settings.boot_timeout_s):
                continue
            if not mine and host.owner_alive(owner):
                continue
            why = "warm container of a gone pool"
        if host.remove_container(cid):
            removed.append(cid)
        host.log(f"reaped {cid[:12]} ({why})")
    existing = {c["Id"] for c in containers}
    for cid in claims:  # claims of containers that no longer exist
        if cid not in existing:
            host.claim_store.drop(cid)
    return removed
