"""Helpers every store backend shares: the merge rule of task documents, event ordering, URLs.

Keeping the rules here is what lets every backend pass the same contract tests.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from megaflow.core.errors import SpecError

# Fields of a task document where the earliest value offered wins ($min), never overwritten.
STICKY_MIN_FIELDS = ("created_at",)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to put in an error message)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def check_task_doc(doc: dict[str, Any]) -> str:
    """The episode id of a task document, or SpecError when it has none."""
    episode_id = doc.get("episode_id")
    if not isinstance(episode_id, str) or not episode_id:
        raise SpecError("a task document needs a non-empty string 'episode_id'", field="episode_id")
    phases = doc.get("phases")
    if phases is not None and not isinstance(phases, dict):
        raise SpecError("'phases' must be a mapping of phase name -> unix time", field="phases")
    for name in phases or {}:
        if not isinstance(name, str) or not name or "." in name or name.startswith("$"):
            raise SpecError(
                f"phase name {name!r} must be a non-empty string without '.' or a leading '$'", field="phases"
            )
    return episode_id


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def created_candidate(doc: dict[str, Any], now: float | None = None) -> float:
    """What an upsert offers for ``created_at``: its own value, else its earliest timestamp, else now."""
    given = _num(doc.get("created_at"))
    if given is not None:
        return given
    times = [t for t in (_num(v) for v in (doc.get("phases") or {}).values()) if t is not None]
    if _num(doc.get("updated_at")) is not None:
        times.append(_num(doc.get("updated_at")))  # type: ignore[arg-type]
    return min(times) if times else (time.time() if now is None else now)


def is_stale(old: dict[str, Any] | None, doc: dict[str, Any]) -> bool:
    """Whether ``doc`` is older than what is stored (both carry ``updated_at`` and the new one is lower)."""
    if not old:
        return False
    a, b = _num(old.get("updated_at")), _num(doc.get("updated_at"))
    return a is not None and b is not None and b < a


def merge_task(old: dict[str, Any] | None, doc: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The stored document after upserting ``doc`` onto ``old``.

    Top-level fields overwrite, unless ``doc`` is stale (its ``updated_at`` is below the stored
    one: an event redelivered after newer ones), so a replay never moves a task back. ``phases``
    always merges key by key. ``created_at`` keeps the earliest value offered (created_candidate).
    MongoDB does the same with $set on dotted ``phases.<k>`` keys and $min on created_at.
    """
    stale = is_stale(old, doc)
    new = dict(old or {})
    for key, value in doc.items():
        if key == "phases":
            merged = dict(new.get("phases") or {})
            merged.update(value or {})
            new["phases"] = merged
        elif key not in STICKY_MIN_FIELDS and not stale:
            new[key] = value
    offered = created_candidate(doc, now)
    stored = _num((old or {}).get("created_at"))
    new["created_at"] = offered if stored is None else min(stored, offered)
    new.setdefault("phases", {})
    return new


def stream_order(event: dict[str, Any]) -> tuple[int, int]:
    """Sort key of an event: its Redis stream id ``<ms>-<seq>`` as numbers (falls back to ``ts``)."""
    event_id = str(event.get("event_id", ""))
    ms, _, seq = event_id.partition("-")
    if ms.isdigit() and (seq.isdigit() or seq == ""):
        return int(ms), int(seq or 0)
    ts = event.get("ts")
    return (int(float(ts) * 1000) if isinstance(ts, (int, float)) else 0), 0


def check_event(event: dict[str, Any]) -> str:
    """The event id of an event document, or SpecError when it has none."""
    event_id = event.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        raise SpecError("an event document needs a non-empty string 'event_id'", field="event_id")
    return event_id
