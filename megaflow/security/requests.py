"""Requests of per-person submitters, carried through their own Redis namespace and served by control.

A person's Redis user (``megaflow acl add-user NAME``) may touch only ``<prefix>:u:<NAME>:*`` (see
:func:`megaflow.security.identity.person_rules`), so it cannot read, write or cancel anything of the
fleet directly, another person's batches included. ``Client`` run with such a user sends each
operation (submit, status, results, cancel, trajectory) as a request on its own stream; the control
service reads every registered person's stream, runs the operation as that person (the name comes from
the stream's key, which only that person's Redis user can write, never from the request) and answers
on a reply list in the same namespace. The owner of a batch is the user recorded at submit.

Keys (all from :class:`megaflow.core.keys.Keys`):
  ``<prefix>:persons``            set: person names whose streams control reads (written by ``acl add-user``)
  ``<prefix>:u:<name>:req``       stream: requests ``{op, rid, args}`` (JSON args), deleted once answered
  ``<prefix>:u:<name>:rep:<rid>`` list: one JSON answer ``{result}`` or ``{error}``, expires after REPLY_TTL_S
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from megaflow.core import errors
from megaflow.core.keys import Keys

log = logging.getLogger(__name__)

OPS = ("submit", "status", "results", "cancel", "trajectory", "batch_status", "overview")
REPLY_TTL_S = 120
MAX_QUEUED = 1000  # requests kept per person's stream (XADD MAXLEN ~)
# errors that cross back to the person as themselves; anything else is reported as an internal error
_ERRORS: dict[str, type[errors.MegaflowError]] = {
    c.__name__: c
    for c in (
        errors.SpecError,
        errors.NotFoundError,
        errors.QuotaError,
        errors.ConfigError,
        errors.ServiceUnavailableError,
        errors.MegaflowError,
    )
}

Handler = Callable[[str, str, dict[str, Any]], Any]  # (person, op, args) -> JSON-able result


def call(client: redis.Redis, keys: Keys, person: str, op: str, args: dict[str, Any], *, timeout: float) -> Any:
    """Send one request as ``person`` and wait up to ``timeout`` s for control's answer (re-raised if an error)."""
    rid = uuid.uuid4().hex
    reply = keys.user(person, "rep", rid)
    client.xadd(
        keys.user(person, "req"),
        {"op": op, "rid": rid, "args": json.dumps(args)},
        maxlen=MAX_QUEUED,
        approximate=True,
    )
    deadline = time.monotonic() + timeout
    got = None
    while got is None and time.monotonic() < deadline:  # short waits: a socket timeout may be below ``timeout``
        got = client.blpop([reply], timeout=max(1, min(5, int(deadline - time.monotonic()))))
    if got is None:
        raise errors.ServiceUnavailableError(
            f"no answer to {op!r} from the control service within {timeout:g}s: a per-person Redis user works "
            "through it; start it (`megaflow up` or `megaflow control`) or ask the operator"
        )
    answer = json.loads(got[1])
    if "error" in answer:
        e = answer["error"]
        cls = _ERRORS.get(e.get("type"), errors.MegaflowError)
        if cls is errors.SpecError:
            raise errors.SpecError(e["message"], index=e.get("index"), field=e.get("field"))
        raise cls(e["message"])
    return answer["result"]


def _encode_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, errors.MegaflowError):
        name = next((c.__name__ for c in type(exc).__mro__ if c.__name__ in _ERRORS), "MegaflowError")
        out: dict[str, Any] = {"type": name, "message": str(exc)}
        if isinstance(exc, errors.SpecError):
            out |= {"field": exc.field, "index": exc.index}
        return out
    return {
        "type": "MegaflowError",
        "message": f"internal error in the control service ({type(exc).__name__}); see its log",
    }


class RequestServer:
    """Serves every registered person's requests with ``handler`` (run by the control service in a thread)."""

    def __init__(self, client: redis.Redis, keys: Keys, handler: Handler):
        self.redis = client
        self.keys = keys
        self.handler = handler

    def serve_once(self, block_ms: int = 1000) -> int:
        """Answer what is waiting (blocking up to ``block_ms`` for the first); returns how many were answered."""
        persons: list[str] = sorted(self.redis.smembers(self.keys.persons))  # type: ignore[arg-type]
        if not persons:
            return 0
        streams: dict[Any, Any] = {self.keys.user(p, "req"): "0" for p in persons}
        got: Any = self.redis.xread(streams, count=100, block=block_ms) or []
        n = 0
        for stream, entries in got:
            person = str(stream).split(":")[-2]
            for entry_id, fields in entries:
                self._answer(person, fields)
                self.redis.xdel(stream, entry_id)
                n += 1
        return n

    def _answer(self, person: str, fields: dict[str, str]) -> None:
        rid = fields.get("rid", "")
        if not rid or len(rid) > 64 or not rid.isalnum():
            log.warning("person %s sent a request without a valid rid; dropped", person)
            return
        op = fields.get("op", "")
        try:
            if op not in OPS:
                raise errors.SpecError(f"op: {op!r} is not one of {', '.join(OPS)}", field="op")
            args = json.loads(fields.get("args") or "{}")
            if not isinstance(args, dict):
                raise errors.SpecError("args: must be a JSON object", field="args")
            answer: dict[str, Any] = {"result": self.handler(person, op, args)}
        except Exception as exc:
            if not isinstance(exc, errors.MegaflowError):
                log.exception("request %s of person %s failed", op, person)
            answer = {"error": _encode_error(exc)}
        reply = self.keys.user(person, "rep", rid)
        pipe = self.redis.pipeline()
        pipe.rpush(reply, json.dumps(answer, default=str))
        pipe.expire(reply, REPLY_TTL_S)
        pipe.execute()

    def run(self, stop: threading.Event, on_outage: Callable[[BaseException], None] | None = None) -> None:
        """Serve until ``stop`` is set; a Redis outage is waited out."""
        while not stop.is_set():
            try:
                if not self.serve_once() and not self.redis.exists(self.keys.persons):
                    stop.wait(1.0)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                if on_outage:
                    on_outage(exc)
                stop.wait(1.0)
            except Exception:
                log.exception("person requests: serving failed; retrying")
                stop.wait(1.0)
