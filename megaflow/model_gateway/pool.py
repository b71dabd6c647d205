"""The endpoint pool of one model: concurrency slots, balancing, stickiness and health, in Redis.

Choosing an endpoint for a call of episode ``session_id``:

1. if the episode already has an endpoint and it is healthy, that one (the server's prefix
   cache holds the episode's conversation); if its slots stay full for ``sticky_wait_s`` the
   episode moves to another endpoint;
2. otherwise the healthy endpoint with the fewest requests outstanding (ties broken at random),
   and the episode sticks to it;
3. a slot is taken on the endpoint's :class:`LeaseSemaphore` (``endpoint_concurrency`` per
   endpoint; the lease outlives the request time-out, so a crashed worker frees it by itself);
   when every healthy endpoint is full the caller waits (bounded by its deadline).

An endpoint that fails ``unhealthy_after`` times in a row (connection error, 5xx, time-out) is
taken out for ``cooldown_s``; after that one caller wins a probe lock and sends ``GET /models``:
an answer puts it back, a failure starts another cool-down.

Keys (all under ``keys.model(...)``):
  ``sem:MODEL:URL``        sorted set, the endpoint's LeaseSemaphore (its size = outstanding requests)
  ``fails:MODEL``          hash URL -> consecutive failures
  ``down:MODEL``           sorted set URL -> Redis time (ms) until which it stays out
  ``probe:MODEL:URL``      string with TTL: the probe lock of a cooled-down endpoint
  ``sticky:MODEL:SESSION`` string URL with TTL ``sticky_ttl_s``, renewed on each call
  ``denied:MODEL:SCOPE``   hash URL -> message, with a TTL: endpoints that refused the credentials
                           (401/403) are not used again by that scope (a batch)
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from megaflow.core.errors import ModelUnavailableError
from megaflow.core.keys import Keys
from megaflow.engine.resources.semaphore import LUA_NOW, LeaseSemaphore
from megaflow.model_gateway.errors import ModelAuthError
from megaflow.model_gateway.registry import normalize_url, registered_endpoints

# One round trip for everything a choice needs.
# KEYS[1]: down zset   KEYS[2]: fails hash   KEYS[3]: sticky key ('' when none)
# KEYS[4]: denied hash ('' when none)   KEYS[5..]: semaphores
# ARGV[1]: sticky TTL (ms)
# Returns {now_ms, sticky URL or '', {down URL, until, ...}, {fails URL, n, ...}, {live holders per semaphore},
#          {denied URL, message, ...}}
VIEW_LUA = (
    LUA_NOW
    + """
local sticky = ''
if KEYS[3] ~= '' then
  sticky = redis.call('GET', KEYS[3]) or ''
  if sticky ~= '' then redis.call('PEXPIRE', KEYS[3], ARGV[1]) end
end
local counts = {}
for i = 5, #KEYS do counts[#counts + 1] = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf') end
local denied = {}
if KEYS[4] ~= '' then denied = redis.call('HGETALL', KEYS[4]) end
return {now, sticky, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), redis.call('HGETALL', KEYS[2]), counts,
        denied}
"""
)

# Count one failure; past the threshold the endpoint goes out for a cool-down.
# KEYS[1]: fails hash   KEYS[2]: down zset
# ARGV[1]: URL   ARGV[2]: threshold   ARGV[3]: cool-down (ms)
# Returns 1 if the endpoint is (now) out, else 0.
FAIL_LUA = (
    LUA_NOW
    + """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if n >= tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
  return 1
end
return 0
"""
)


log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, float]:
    return {_text(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}


def _text_pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


@dataclass
class Lease:
    """A slot held on one endpoint for one request."""

    endpoint: str
    holder: str
    waited_s: float = 0.0
    failures: int = 0  # the endpoint's run of failures when it was chosen


class EndpointPool:
    """Endpoints of one model (static ones plus registered ones), shared by every gateway worker."""

    sticky_wait_s = 5.0  # how long an episode waits for its own endpoint's slot before moving
    refresh_s = 2.0  # how often the registered endpoints are re-read

    def __init__(
        self,
        redis_client: Any,
        keys: Keys,
        model_name: str,
        static_endpoints: Sequence[str],
        *,
        concurrency: int,
        lease_s: float,
        unhealthy_after: int = 3,
        cooldown_s: float = 15.0,
        sticky_ttl_s: float = 3600.0,
        probe: Callable[[str], bool] | None = None,
    ):
        self.redis = redis_client
        self.keys = keys
        self.model_name = model_name
        self.static = [normalize_url(u) for u in static_endpoints]
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.unhealthy_after = unhealthy_after
        self.cooldown_ms = int(cooldown_s * 1000)
        self.sticky_ttl_ms = int(sticky_ttl_s * 1000)
        self.probe = probe
        self._view = redis_client.register_script(VIEW_LUA)
        self._fail = redis_client.register_script(FAIL_LUA)
        self._sems: dict[str, LeaseSemaphore] = {}
        self._endpoints: list[str] = []
        self._read_at = -1e9
        self._freed = threading.Condition()  # wakes this process's waiters when one of its slots frees

    # --- membership -------------------------------------------------------------------------------
    def endpoints(self) -> list[str]:
        """Static endpoints plus the live registered ones (re-read every ``refresh_s``)."""
        now = time.monotonic()
        if now - self._read_at > self.refresh_s:
            extra = registered_endpoints(self.redis, self.keys, self.model_name)
            self._endpoints = list(dict.fromkeys(self.static + extra))
            self._read_at = now
        return self._endpoints

    def semaphore(self, endpoint: str) -> LeaseSemaphore:
        sem = self._sems.get(endpoint)
        if sem is None:
            key = self.keys.model("sem", self.model_name, endpoint)
            sem = self._sems[endpoint] = LeaseSemaphore(self.redis, key, self.concurrency, self.lease_s)
        return sem

    def sticky_key(self, session_id: str) -> str:
        return self.keys.model("sticky", self.model_name, session_id)

    # --- choosing ---------------------------------------------------------------------------------
    def denied_key(self, scope: str) -> str:
        return self.keys.model("denied", self.model_name, scope or "-")

    def acquire(self, session_id: str, deadline: float, scope: str | None = None) -> Lease:
        """A slot on the best endpoint for this episode; waits while all are full, up to ``deadline``
        (``time.monotonic()``), then raises ModelUnavailableError. Endpoints that refused the
        credentials of ``scope`` (a batch) are skipped; when none is left, ModelAuthError."""
        holder = uuid.uuid4().hex
        started = time.monotonic()
        pause = 0.002
        while True:
            endpoints = self.endpoints()
            if not endpoints:
                raise ModelUnavailableError(
                    f"model {self.model_name!r} has no endpoints: set MEGAFLOW_MODEL_ENDPOINTS, give model.endpoints "
                    "in the task spec, or start `megaflow model serve` on a model host"
                )
            sems = [self.semaphore(e) for e in endpoints]
            sticky_key = self.sticky_key(session_id) if session_id else ""
            now_ms, sticky, down_flat, fails_flat, counts, denied_flat = self._view(
                keys=[
                    self.keys.model("down", self.model_name),
                    self.keys.model("fails", self.model_name),
                    sticky_key,
                    self.denied_key(scope) if scope is not None else "",
                    *(s.key for s in sems),
                ],
                args=[self.sticky_ttl_ms],
            )
            sticky, down, fails = _text(sticky), _pairs(down_flat), _pairs(fails_flat)
            denied = _text_pairs(denied_flat)
            if denied and all(e in denied for e in endpoints):
                why = "; ".join(f"{e}: {m}" for e, m in denied.items() if e in endpoints)
                raise ModelAuthError(
                    f"model {self.model_name!r}: every endpoint refused the credentials (401/403), "
                    f"so this batch no longer uses them; check MEGAFLOW_MODEL_API_KEY ({why})"
                )
            outstanding = dict(zip(endpoints, (int(c) for c in counts)))
            healthy = [e for e in endpoints if e not in down and e not in denied]
            for e in endpoints:
                if e in down and e not in denied and down[e] <= now_ms and self._probe(e):
                    healthy.append(e)
            waited = time.monotonic() - started
            if sticky in healthy and waited < self.sticky_wait_s:
                order = [sticky]
            else:
                order = sorted(healthy, key=lambda e: (outstanding[e], random.random()))
            for endpoint in order:
                if outstanding[endpoint] < self.concurrency and self.semaphore(endpoint).acquire(holder):
                    if sticky_key and endpoint != sticky:
                        self.redis.set(sticky_key, endpoint, px=self.sticky_ttl_ms)
                    return Lease(endpoint, holder, waited, int(fails.get(endpoint, 0)))
            # with every endpoint out, wait for one cool-down (and its probe), not the whole deadline
            limit = deadline if healthy else min(deadline, started + self.cooldown_ms / 1000 + 1.0)
            if time.monotonic() + pause > limit:
                why = "every endpoint is at its concurrency limit" if healthy else "every endpoint is unhealthy"
                raise ModelUnavailableError(f"model {self.model_name!r}: {why} ({len(endpoints)} endpoints)")
            with self._freed:  # a release in this process wakes us early; other processes' by polling
                self._freed.wait(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.05 if healthy else 0.5)

    def renew(self, lease: Lease) -> None:
        """Extend the slot's lease (a long streamed reply); best effort."""
        try:
            self.semaphore(lease.endpoint).renew(lease.holder)
        except redis.RedisError as exc:
            log.warning("could not renew a slot of %s (%s)", lease.endpoint, exc)

    def release(self, lease: Lease) -> None:
        """Give the slot back (if Redis is unreachable the lease lapses by itself)."""
        try:
            self.semaphore(lease.endpoint).release(lease.holder)
        except redis.RedisError as exc:
            log.warning("could not release a slot of %s (%s); its lease will lapse", lease.endpoint, exc)
        with self._freed:
            self._freed.notify()

    # --- health -----------------------------------------------------------------------------------
    def deny(self, endpoint: str, scope: str, message: str, ttl_s: float) -> None:
        """``endpoint`` refused the credentials: ``scope`` (a batch) stops using it for ``ttl_s``."""
        key = self.denied_key(scope)
        pipe = self.redis.pipeline()
        pipe.hset(key, endpoint, message[:500])
        pipe.pexpire(key, int(ttl_s * 1000))
        pipe.execute()

    def succeeded(self, endpoint: str) -> None:
        """The endpoint answered: its run of failures ends (best effort)."""
        try:
            self.redis.hdel(self.keys.model("fails", self.model_name), endpoint)
        except redis.RedisError as exc:
            log.warning("could not record a success of %s: %s", endpoint, exc)

    def failed(self, endpoint: str) -> bool:
        """Count a failure (best effort); True when the endpoint has just been (or stays) taken out."""
        try:
            return bool(
                self._fail(
                    keys=[self.keys.model("fails", self.model_name), self.keys.model("down", self.model_name)],
                    args=[endpoint, self.unhealthy_after, self.cooldown_ms],
                )
            )
        except redis.RedisError as exc:
            log.warning("could not record a failure of %s: %s", endpoint, exc)
            return False

    def _probe(self, endpoint: str) -> bool:
        """Probe a cooled-down endpoint (one caller at a time); True if it is back in."""
        if self.probe is None:
            ok = True  # nothing to probe with: let the next request be the probe
        else:
            lock = self.keys.model("probe", self.model_name, endpoint)
            if not self.redis.set(lock, "1", nx=True, px=max(1000, self.cooldown_ms)):
                return False
            ok = self.probe(endpoint)
        if ok:
            pipe = self.redis.pipeline()
            pipe.zrem(self.keys.model("down", self.model_name), endpoint)
            pipe.hdel(self.keys.model("fails", self.model_name), endpoint)
            pipe.execute()
        else:
            now_s, now_us = self.redis.time()
            self.redis.zadd(
                self.keys.model("down", self.model_name), {endpoint: now_s * 1000 + now_us // 1000 + self.cooldown_ms}
            )
        return ok

    def status(self) -> list[dict[str, Any]]:
        """Per endpoint: outstanding requests, consecutive failures, whether it is out (for the CLI)."""
        endpoints = self.endpoints()
        sems = [self.semaphore(e) for e in endpoints]
        _, _, down_flat, fails_flat, counts, _ = self._view(
            keys=[
                self.keys.model("down", self.model_name),
                self.keys.model("fails", self.model_name),
                "",
                "",
                *(s.key for s in sems),
            ],
            args=[self.sticky_ttl_ms],
        )
        down, fails = _pairs(down_flat), _pairs(fails_flat)
        return [
            {
                "endpoint": e,
                "outstanding": int(c),
                "failures": int(fails.get(e, 0)),
                "healthy": e not in down,
                "static": e in self.static,
            }
            for e, c in zip(endpoints, counts)
        ]
