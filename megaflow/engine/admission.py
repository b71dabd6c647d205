"""Admission: take what the resource manager admits and send each episode's first task."""

from __future__ import annotations

from megaflow.core import states, wire
from megaflow.engine.episodes import EpisodeEngine, to_host
from megaflow.engine.resources import ResourceManager

ADMIT_CHUNK = 250  # episodes reserved by one admission script, then loaded and advanced in two pipelines


def admit(engine: EpisodeEngine, resources: ResourceManager, max_n: int = ADMIT_CHUNK) -> int:
    """Admit what capacity allows (FIFO, three tiers reserved atomically); return how many started.

    Each round reserves up to ``max_n`` episodes in one script, reads them in one pipeline and
    advances them (state ADMITTED, first task sent) in another, so admitting a 30,000-episode
    batch costs a few hundred round trips, not two per episode.
    """
    total = 0
    while True:
        admissions = resources.admit(max_n)
        try:
            eps = engine.load_many([a.episode_id for a in admissions])
        except Exception:
            for a in admissions:
                resources.release(a.episode_id)
            raise
        changes = []
        for a in admissions:
            ep = eps.get(a.episode_id)
            if ep is None:  # gone (expired) while queued
                resources.release(a.episode_id)
                continue
            change = dict(
                keep_step=True,
                state=states.ADMITTED,
                phase="admitted",
                fields={"host": a.host},
                event_fields={"host": a.host},
                next_task=to_host(wire.ENV_PROVISION, a.host),
            )
            changes.append((ep, change))
        for (ep, _change), ok in zip(changes, engine.advance_many(changes)):
            if ok:
                total += 1
            else:  # cancelled or finished while queued
                resources.release(ep.id)
        if len(admissions) < max_n:
            return total
