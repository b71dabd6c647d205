"""The decisions as pure functions of observed state: how many env hosts, and which mode per image.

No Redis and no clock here: the autoscaler observes, these decide, the autoscaler acts. That keeps
every rule testable on plain numbers and reusable by the bench's model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megaflow.elastic.config import ElasticConfig


@dataclass
class FleetState:
    """What the autoscaler sees at one tick."""

    queued: int  # episodes in the FIFO
    oldest_wait_s: float  # admission lag: how long the oldest queued episode has waited
    live: int  # episodes holding slots (admitted, not finished)
    hosts: int  # env hosts that take work (alive, not drained)
    pending: int  # hosts launched that have not joined yet
    capacity_per_host: int  # slots per env host
    episode_s: float  # mean episode length seen recently (or the configured guess)


@dataclass
class Decision:
    """The target and why; ``delta`` > 0 adds hosts, < 0 drains that many."""

    target: int
    delta: int
    reason: str
    inputs: dict = field(default_factory=dict)


def desired_hosts(st: FleetState, cfg: ElasticConfig) -> Decision:
    """Hosts the fleet needs now, between ``min_hosts`` and ``max_hosts``.

    Slots for every live and queued episode, unless the backlog drains on the current hosts
    before a new one could boot; one more host when the oldest wait passes the lag threshold.
    """
    cap = max(1, st.capacity_per_host)
    have = st.hosts + st.pending
    by_slots = math.ceil((st.live + st.queued) / cap)
    # hosts that finish the work within target_wait_s: each host runs cap episodes per episode_s
    waves = max(1.0, cfg.target_wait_s / st.episode_s)
    by_time = math.ceil((st.live + st.queued) / (cap * waves))
    target, reason = min(by_slots, max(by_time, math.ceil(st.live / cap))), "demand"
    drain_here_s = st.queued * st.episode_s / (max(1, st.hosts) * cap)
    if target > have and st.hosts > 0 and drain_here_s <= cfg.boot_s:
        target, reason = have, "backlog drains before a new host would boot"
    if st.queued > 0 and st.oldest_wait_s > cfg.lag_threshold_s and target <= have:
        target, reason = have + 1, f"admission lag {st.oldest_wait_s:.0f}s > {cfg.lag_threshold_s:.0f}s"
    if st.queued == 0 and st.live == 0:
        reason = "idle"
    clamped = min(cfg.max_hosts, max(cfg.min_hosts, target))
    if clamped != target:
        reason += f" (clamped to [{cfg.min_hosts}, {cfg.max_hosts}])"
    inputs = {
        "queued": st.queued,
        "oldest_wait_s": round(st.oldest_wait_s, 3),
        "live": st.live,
        "hosts": st.hosts,
        "pending": st.pending,
        "capacity_per_host": cap,
        "episode_s": round(st.episode_s, 3),
    }
    return Decision(target=clamped, delta=clamped - have, reason=reason, inputs=inputs)


@dataclass
class ModeChoice:
    """Execution mode for one image and the warm pool per host it asks for (0 when ephemeral)."""

    image: str
    mode: str
    pool_per_host: int
    reason: str


def choose_mode(
    image: str, waiting: int, arrived: int, hosts: int, cfg: ElasticConfig, forced: str | None = None
) -> ModeChoice:
    """Persistent (warm pool) when ``waiting + arrived`` reaches ``persistent_min_demand``, else ephemeral.

    ``waiting``: episodes of the image in the FIFO; ``arrived``: submitted within ``demand_window_s``.
    The pool per host covers the image's share of demand spread over the hosts, at most ``max_pool``.
    A spec's own mode (``forced``) always wins.
    """
    if forced in ("ephemeral", "persistent"):
        pool = 0 if forced == "ephemeral" else max(1, min(cfg.max_pool, math.ceil(max(waiting, 1) / max(hosts, 1))))
        return ModeChoice(image, forced, pool, "forced by the spec")
    demand = waiting + arrived
    if not cfg.auto_mode or demand < cfg.persistent_min_demand:
        why = "auto mode off" if not cfg.auto_mode else f"demand {demand} < {cfg.persistent_min_demand}"
        return ModeChoice(image, "ephemeral", 0, why)
    pool = max(1, min(cfg.max_pool, math.ceil(demand / max(hosts, 1) / 2)))
    return ModeChoice(image, "persistent", pool, f"demand {demand} >= {cfg.persistent_min_demand}")
