"""Label names MegaFlow puts on every container it creates; the reaper only touches containers carrying them."""

from __future__ import annotations

PREFIX = "megaflow."
MANAGED = PREFIX + "managed"  # "1" on every MegaFlow container
HOST = PREFIX + "host"  # env host name that owns the container
FLEET = PREFIX + "fleet"  # Settings.fleet_id: fleets sharing a Docker engine never reap each other's
RUN = PREFIX + "run"  # run / batch id (optional)
EPISODE = PREFIX + "episode"  # episode id; "" for a warm-pool container not yet handed out
USER = PREFIX + "user"
MODE = PREFIX + "mode"  # ephemeral | persistent
LEASE_EXPIRY = PREFIX + "lease_expiry"  # unix time after which the container may be removed
POOL_OWNER = PREFIX + "pool_owner"  # instance id of the DockerHost that keeps it warm
IMAGE = PREFIX + "image"

REQUIRED = (MANAGED, FLEET, HOST, EPISODE, LEASE_EXPIRY)


def qualify(labels: dict[str, str] | None) -> dict[str, str]:
    """Prefix caller labels (``{"run": "b1"}`` -> ``{"megaflow.run": "b1"}``), values as strings."""
    out: dict[str, str] = {}
    for key, value in (labels or {}).items():
        out[key if key.startswith(PREFIX) else PREFIX + key] = "" if value is None else str(value)
    return out


def is_megaflow(labels: dict[str, str] | None) -> bool:
    """True when a container carries the full MegaFlow label set (anything else is never touched)."""
    labels = labels or {}
    return labels.get(MANAGED) == "1" and all(k in labels for k in REQUIRED)
