"""A counting semaphore with leases on one Redis sorted set.

Each slot is a member (the holder id) scored by its lease expiry in milliseconds of Redis time
(``TIME`` inside the script, never a client clock). A holder renews by heartbeat; a holder that
stops renewing (crash, lost machine) loses its slot when the lease lapses, without anyone's
help: every acquire first drops lapsed members, and ``count()`` ignores them.
"""

from __future__ import annotations

import math

# Shared Lua prelude: the current Redis time in whole milliseconds.
LUA_NOW = """
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
"""

# Take a slot (or renew the holder's own slot) if one is free; lapsed leases are dropped first.
# KEYS[1]: semaphore sorted set (holder -> lease expiry, ms of Redis time)
# ARGV[1]: holder id   ARGV[2]: limit   ARGV[3]: lease length (ms)
# Returns 1 if the holder holds a slot after the call, 0 if the semaphore is full.
ACQUIRE_LUA = (
    LUA_NOW
    + """
local key, holder, limit, lease = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if redis.call('ZSCORE', key, holder) or redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now + lease, holder)
  if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
  return 1
end
return 0
"""
)

# Extend a live lease; a lapsed one is removed and reported lost.
# KEYS[1]: semaphore sorted set
# ARGV[1]: holder id   ARGV[2]: lease length (ms)
# Returns 1 if renewed, 0 if the holder had no live lease.
RENEW_LUA = (
    LUA_NOW
    + """
local key, holder, lease = KEYS[1], ARGV[1], tonumber(ARGV[2])
local exp = redis.call('ZSCORE', key, holder)
if exp and tonumber(exp) > now then
  redis.call('ZADD', key, 'XX', now + lease, holder)
  if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
  return 1
end
if exp then redis.call('ZREM', key, holder) end
return 0
"""
)

# Number of live (unlapsed) holders.
# KEYS[1]: semaphore sorted set
# ARGV: none
COUNT_LUA = (
    LUA_NOW
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
)


def lease_ms(lease_s: float) -> int:
    """A lease length in whole milliseconds (at least 1)."""
    return max(1, math.ceil(lease_s * 1000))


class LeaseSemaphore:
    """Counting semaphore with leases on one Redis sorted set (holder -> expiry in Redis time).

    Keys owned: ``key`` (sorted set holder -> lease expiry in ms; it expires by itself once every
    lease has lapsed).
    """

    def __init__(self, redis_client, key: str, limit: int, lease_s: float):
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.redis = redis_client
        self.key = key
        self.limit = limit
        self.lease_ms = lease_ms(lease_s)
        self._acquire = redis_client.register_script(ACQUIRE_LUA)
        self._renew = redis_client.register_script(RENEW_LUA)
        self._count = redis_client.register_script(COUNT_LUA)

    def acquire(self, holder: str) -> bool:
        """Take a slot without waiting; True if taken (or already held, which renews it)."""
        return bool(self._acquire(keys=[self.key], args=[holder, self.limit, self.lease_ms]))

    def release(self, holder: str) -> None:
        """Give the holder's slot back; a no-op if it holds none."""
        self.redis.zrem(self.key, holder)

    def renew(self, holder: str) -> bool:
        """Extend the holder's lease by one lease length; False if the lease was already lost."""
        return bool(self._renew(keys=[self.key], args=[holder, self.lease_ms]))

    def count(self) -> int:
        """Live holders (lapsed ones are not counted)."""
        return int(self._count(keys=[self.key]))

    def holders(self) -> list[str]:
        """Ids of the live holders (a snapshot)."""
        now_s, now_us = self.redis.time()
        now = now_s * 1000 + now_us // 1000
        return list(self.redis.zrangebyscore(self.key, f"({now}", "+inf"))
