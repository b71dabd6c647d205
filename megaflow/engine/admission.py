"""Admission: take what the resource manager admits and send each episode's first task."""

from __future__ import annotations

from megaflow.core import states, wire
from megaflow.engine.episodes import EpisodeEngine, to_host
from megaflow.engine.resources import ResourceManager


def admit(engine: EpisodeEngine, resources: ResourceManager, max_n: int = 100) -> int:
    """Admit what capacity allows (FIFO, three tiers reserved atomically); return how many started."""
    total = 0
    while True:
        admissions = resources.admit(max_n)
        for a in admissions:
            try:
                ep = engine.load(a.episode_id, history=False)
            except Exception:
                resources.release(a.episode_id)
                continue
            ok = engine.advance(
                ep,
                keep_step=True,
                state=states.ADMITTED,
                phase="admitted",
                fields={"host": a.host},
                event_fields={"host": a.host},
                next_task=to_host(wire.ENV_PROVISION, a.host),
            )
            if ok:
                total += 1
            else:  # cancelled or finished while queued
                resources.release(a.episode_id)
        if len(admissions) < max_n:
            return total
