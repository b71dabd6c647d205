"""Reaper: remove this host's containers that a crash or a lost episode left behind.

Removed: containers of this host whose episode is finished or unknown (``is_live`` says False),
whose lease lapsed, or warm-pool containers whose owning DockerHost instance is gone. Never
touched: containers without the full MegaFlow label set, or labelled for another host.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from megaflow.env_hosts import labels as L
from megaflow.env_hosts.base import live_among


def reap(host, is_live: Callable[[str], bool] | None = None) -> list[str]:
    """One pass over this host's containers; returns the ids removed.

    ``host`` is a DockerHost (its public parts: containers, claims, pool, owner_alive, remove_container).
    ``is_live(episode_id)`` says whether an episode still runs (None: only lapsed leases and
    orphaned warm containers are removed).
    """
    now = time.time()
    containers = host.containers.list_mine()
    claims = host.claims()
    ours = [c for c in containers if _ours(host, c.get("Labels") or {})]
    # one batched question for every episode these containers belong to, not one per container
    live = live_among(is_live, {e for c in ours if (e := _episode_of(c, claims))}) if is_live is not None else None
    removed: list[str] = []
    for c in ours:
        labels = c.get("Labels") or {}
        cid = c["Id"]
        try:
            expiry = float(labels.get(L.LEASE_EXPIRY) or 0)
        except ValueError:
            expiry = 0.0
        episode = _episode_of(c, claims)
        claim = claims.get(cid)
        if claim:
            expiry = min(expiry, float(claim.get("lease_expiry") or expiry))
        if now > expiry:
            why = "lease lapsed"
        elif episode:
            if live is None or episode in live:
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


def _ours(host, labels: dict) -> bool:
    """A container with the full MegaFlow label set, of this host and this fleet."""
    return L.is_megaflow(labels) and labels.get(L.HOST) == host.name and labels.get(L.FLEET) == host.settings.fleet_id


def _episode_of(container: dict, claims: dict) -> str:
    """The episode a container serves: its claim's (a warm container handed out), else its label's."""
    claim = claims.get(container["Id"])
    return (claim.get("episode_id") if claim else None) or (container.get("Labels") or {}).get(L.EPISODE) or ""
