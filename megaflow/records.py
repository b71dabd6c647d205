"""The recorder: turns the event stream into task and event documents in the metadata store.

It reads the ``events`` stream through a consumer group (at-least-once), writes idempotently
(event documents keyed by stream id; task documents merged by episode id), then acknowledges.
Entries left pending by a dead recorder are claimed after ``claim_idle_ms``. Once every consumer
group of the stream has acknowledged an entry (and it is older than ``retain_s``), ``trim`` drops it:
the metadata store holds it from then on, so the stream costs Redis memory only for what is not yet
recorded, instead of growing to ``events_maxlen`` (several KB per finished episode).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis

from megaflow.core.keys import Keys
from megaflow.stores.base import MetadataStore

log = logging.getLogger(__name__)

GROUP = "recorder"
TRIM_EVERY_S = 2.0  # how often ``run`` trims recorded entries off the stream
CLAIM_EVERY_S = 5.0  # how often ``run`` claims entries a dead recorder left pending (idle >= claim_idle_ms)
LINGER_S = 0.1  # after a batch, ``run`` lets events gather this long: one read, ack and commit per many events
READ_COUNT = 500  # stream entries read (and committed) at a time


def event_documents(entry_id: str, fields: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(event document, task-document update) for one stream entry."""
    ev = json.loads(fields["e"])
    ts = float(fields["ts"])
    event = {
        "event_id": entry_id,
        "episode_id": ev["episode_id"],
        "batch_id": ev.get("batch_id"),
        "user": ev.get("user"),
        "state": ev.get("state"),
        "ts": ts,
        "step": int(fields.get("step", 0)),
        "data": {k: v for k, v in (ev.get("fields") or {}).items() if v is not None},
        "phase": ev.get("phase"),
    }
    doc: dict[str, Any] = {
        "episode_id": ev["episode_id"],
        "batch_id": ev.get("batch_id"),
        "user": ev.get("user"),
        "task_id": ev.get("task_id"),
        "state": ev.get("state"),
        "updated_at": ts,
    }
    doc.update(event["data"])
    phases = [*(ev.get("also_phases") or []), ev.get("phase")]
    if any(phases):  # also_phases: earlier phases passed within the same advance (an inline agent decision)
        doc["phases"] = {p: ts for p in phases if p}
    return event, doc


class Recorder:
    """Consumes the event stream into a MetadataStore."""

    def __init__(
        self,
        redis_client: redis.Redis,
        keys: Keys,
        store: MetadataStore,
        *,
        consumer: str = "recorder-1",
        claim_idle_ms: int = 60_000,
        retain_s: float = 0.0,
    ):
        self.r = redis_client
        self.keys = keys
        self.store = store
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.retain_s = retain_s
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        try:
            self.r.xgroup_create(self.keys.events, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def apply(self, entries: list[tuple[str, dict[str, str]]]) -> int:
        pairs = []
        for entry_id, fields in entries:
            try:
                pairs.append(event_documents(entry_id, fields))
            except (KeyError, ValueError):
                log.error("skipping malformed event %s: %r", entry_id, fields)
        batch = getattr(self.store, "record", None)  # a store that writes a batch in one transaction
        if batch is not None:
            batch(pairs)
        else:
            for event, doc in pairs:
                self.store.add_event(event)
                self.store.upsert_task(doc)
        if entries:
            self.r.xack(self.keys.events, GROUP, *[e[0] for e in entries])
        return len(entries)

    def run_once(self, block_ms: int | None = 1000, count: int = READ_COUNT, *, claim: bool = True) -> int:
        """Record one batch of events (first, with ``claim``, any stale pending ones); ``block_ms=None`` never waits."""
        n = 0
        if claim:
            _, claimed, *_ = self.r.xautoclaim(
                self.keys.events, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=count
            )
            n = self.apply([c for c in claimed if c and c[1]])
        resp: Any = self.r.xreadgroup(GROUP, self.consumer, {self.keys.events: ">"}, count=count, block=block_ms)
        for _stream, entries in resp or []:
            n += self.apply(entries)
        return n

    def trim(self) -> int:
        """Drop the entries every consumer group has acknowledged and older than ``retain_s``; return how many.

        The cut is the oldest entry some group still needs (its oldest pending one, else the one after
        its last delivered), so nothing unrecorded goes, whichever groups read the stream.
        """
        stream = self.keys.events
        try:
            groups = self.r.xinfo_groups(stream)
        except redis.ResponseError:  # no stream yet
            return 0
        if not groups:
            return 0
        cut: tuple[int, int] | None = None
        for g in groups:
            floor = _entry_id(g["last-delivered-id"])
            floor = (floor[0], floor[1] + 1)  # everything up to the last delivered one, if acknowledged
            if g["pending"]:
                floor = min(floor, _entry_id(self.r.xpending(stream, g["name"])["min"]))
            cut = floor if cut is None else min(cut, floor)
        sec, usec = self.r.time()
        keep_from = (int(sec * 1000 + usec // 1000 - self.retain_s * 1000), 0)
        assert cut is not None
        cut = min(cut, keep_from)
        if cut <= (0, 1):
            return 0
        return int(self.r.xtrim(stream, minid=f"{cut[0]}-{cut[1]}", approximate=True))

    def drain(self) -> int:
        """Record everything available now (used by tests and `megaflow status`)."""
        total = 0
        while True:
            n = self.run_once(block_ms=None, count=1000)
            if n == 0:
                return total
            total += n

    def run(self, stop: threading.Event) -> None:
        """Record until ``stop``; a Redis outage is logged once and waited out, never fatal."""
        down = False
        trimmed_at = claimed_at = -1e9
        while not stop.is_set():
            try:
                claim = time.monotonic() - claimed_at > CLAIM_EVERY_S
                if claim:
                    claimed_at = time.monotonic()
                if self.run_once(claim=claim) < READ_COUNT:  # not behind: let the next batch gather
                    stop.wait(LINGER_S)
                if time.monotonic() - trimmed_at > TRIM_EVERY_S:
                    trimmed_at = time.monotonic()
                    self.trim()
                if down:
                    log.warning("recorder: Redis reachable again; recording")
                    down = False
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                if not down:
                    log.warning("recorder: Redis unreachable (%s); retrying every second", type(exc).__name__)
                    down = True
                stop.wait(1.0)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream or its group went with lost writes: make them again
                    self.ensure_group()
                    continue
                log.exception("recorder: batch failed; retrying")
                stop.wait(1.0)
            except Exception:
                log.exception("recorder: batch failed; retrying")
                stop.wait(1.0)


def _entry_id(raw: str | bytes) -> tuple[int, int]:
    """A stream entry id as a comparable (milliseconds, sequence) pair."""
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
    return int(ms), int(seq or 0)
