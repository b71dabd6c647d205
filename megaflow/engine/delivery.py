"""Acknowledge a step's broker message in the script that advances its episode.

A step task runs for one delivery of one broker message. With ``acks_late`` the message stays in
the broker's unacked hash (and its index) from delivery until the worker acknowledges it after the
task returned: that is what lets kombu redeliver the work of a worker that died mid-step, and what
the control's stall check reads as "running".

The worker names the delivery a step runs for (``running``) before the step starts. When that
step's advance of that episode applies, the advance script also removes the message from the
unacked hash and index (``unacked_keys``, ``take``): the step's result, the next task's message and
the acknowledgement of this one become one atomic change, so no moment exists where both or neither
of the two messages are pending. The worker's own acknowledgement afterwards has nothing left to do,
and skips its Redis call (``settled``): one round trip less per task.

Only the advance of the named episode at the named step acknowledges, once; any other advance in
the same task (another episode, a later step) leaves the message to the worker's acknowledgement. A
process whose acknowledgement runs elsewhere (a prefork pool acknowledges in the parent) still
sends its own; removing an entry that is gone is a no-op.

The other end of the same bookkeeping: where the step runs in the consuming process (a thread
pool: ``defer_appends``), the delivery's unacked record is not written by the consumer on its own
(one Redis call per delivery, the largest single cost of a model worker's consumer). The transport
holds it here (``hold``) and the step's first read of its episode writes it in the same script
(``take_record``), an instant later. A record never written (the step failed before reading, or the
worker shut down with the message prefetched) is dropped with the ack, or restored to its queue
from here (``drop_record``). What this gives up: a worker killed between a delivery and its step's
first read (a few milliseconds with a free thread per prefetched message) loses that message, and
the control's stall sweep sends the step again after ``stall_timeout_s``.
"""

from __future__ import annotations

from collections import OrderedDict
from contextvars import ContextVar
from threading import Lock

from megaflow.core import wire

# (episode id, step, delivery tag) of the step this thread or task runs, or None
_current: ContextVar[tuple[str, int, str] | None] = ContextVar("megaflow_delivery", default=None)
_settled: OrderedDict[str, None] = OrderedDict()  # tags acknowledged by an advance, until the worker's ack
_SETTLED_MAX = 10_000  # a task that raised after its advance is never acknowledged by the worker: forget it
_lock = Lock()
_records: dict[str, str] = {}  # tag -> kombu's unacked record, held until the step's first read writes it
defer_appends = False  # set by a worker whose steps run in the consuming process (a thread pool)


def running(episode_id: str, step: int, tag: str | None) -> None:
    """Name the delivery (its broker ``delivery_tag``) the current step of ``episode_id`` runs for."""
    _current.set((episode_id, step, tag) if tag else None)


def done() -> None:
    """The step ended: no later advance in this thread acknowledges its delivery."""
    _current.set(None)


def take(episode_id: str, step: int) -> str | None:
    """The delivery tag to acknowledge with an advance of ``episode_id`` from ``step``, or None."""
    cur = _current.get()
    if cur is None or cur[0] != episode_id or cur[1] != step:
        return None
    return cur[2]


def acknowledged(tag: str) -> None:
    """An advance applied and removed ``tag`` from the unacked hash: the worker's ack can skip Redis."""
    _current.set(None)
    with _lock:
        _settled[tag] = None
        while len(_settled) > _SETTLED_MAX:
            _settled.popitem(last=False)


def settled(tag: str) -> bool:
    """Whether an advance already acknowledged ``tag`` (forgotten once asked)."""
    with _lock:
        return _settled.pop(tag, 0) is None


def hold(tag: str, record: str) -> None:
    """Keep a delivery's unacked record until its step's first read of the episode writes it."""
    _records[tag] = record


def take_record(episode_id: str) -> tuple[str, str] | None:
    """(tag, record) of the delivery the current step of ``episode_id`` runs for, if it is still held."""
    cur = _current.get()
    if cur is None or cur[0] != episode_id:
        return None
    record = _records.pop(cur[2], None)
    return (cur[2], record) if record is not None else None


def drop_record(tag: str) -> str | None:
    """The held record of ``tag`` if it was never written to Redis (forgotten here), else None."""
    return _records.pop(tag, None)


def unacked_keys(key_prefix: str) -> tuple[str, str]:
    """The broker's unacked index (zset) and unacked hash (kombu's Redis transport, global prefix applied)."""
    prefix = wire.broker_prefix(key_prefix)
    return prefix + "unacked_index", prefix + "unacked"
