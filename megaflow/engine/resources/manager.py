"""The resource manager: three-tier leased slots, FIFO admission, boot limiter, repair sweep.

Admission is event driven: call ``admit()`` after ``enqueue()``, after ``release()`` and when
``register_host()`` reports a host that joined. Each atomic step is one Lua script (see
``megaflow.engine.resources.lua``), so any number of processes may call any method concurrently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from megaflow.core.errors import NotFoundError, QuotaError, SpecError
from megaflow.core.keys import Keys
from megaflow.engine.resources import lua
from megaflow.engine.resources.hostloss import HostLoss
from megaflow.engine.resources.semaphore import lease_ms

_BATCH = 500


@dataclass
class Admission:
    """An episode admitted with its three slots reserved on ``host``."""

    episode_id: str
    user: str
    host: str
    image: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


class ResourceManager:
    """Capacity at three tiers (global, per user, per env host), a FIFO of waiting episodes, and
    a per-host boot limiter, all in Redis.

    Keys owned (``R`` = ``keys.res()``, times are ms of Redis time):

    - ``R:global``, ``R:user:<user>``, ``R:host:<host>``: tier sorted sets, episode -> lease expiry
    - ``R:held``: hash episode -> JSON placement {user, host, image, seq, t, requeues, admitted}
    - ``R:admitted``: sorted set episode -> admission time, until ``mark_started``
    - ``R:seq``: submission counter
    - ``R:q:<user>``: sorted set, the user's queued episodes -> submission seq
    - ``R:queued``: hash episode -> JSON {user, image, seq, t, requeues} of every queued episode
    - ``R:heads``: sorted set user -> seq of its oldest queued episode (every user with a queue)
    - ``R:ready``: the same, for users not known to be at their limit (admission reads its head)
    - ``R:parked``: sorted set user -> when to check again (users at their limit, with a queue)
    - ``R:quotas``: hash user -> limit override
    - ``R:hosts``: sorted set host -> last heartbeat; ``R:drained``: set of drained hosts
    - ``R:hostcap``: hash host -> capacity; ``R:hostinfo:<host>``: hash capacity, disk_free_gb,
      heartbeat; ``R:himages:<host>``: set of images present; ``R:hwarm:<host>``: hash image ->
      warm containers; ``R:imghosts:<image>``: hash host -> warm containers (hosts that have it)
    - ``R:boot:<host>``: boot limiter sorted set; ``R:bootrate:<host>``: its token bucket
    - ``R:wake``: list, at most one item: a request that the sweeper run admission now
    - ``<prefix>:env:lost``: hosts marked lost (see ``megaflow.engine.resources.hostloss``);
      ``<prefix>:env:leaving``: set of hosts told to leave (drained, they stop once empty)
    """

    def __init__(self, redis_client, settings, keys: Keys):
        self.redis = redis_client
        self.settings = settings
        self.keys = keys
        self.base = keys.res()
        self.lease_ms = lease_ms(settings.lease_s)
        self.host_ttl_ms = lease_ms(settings.host_ttl_s)
        reg = redis_client.register_script
        self._enqueue = reg(lua.ENQUEUE_LUA)
        self._admit = reg(lua.ADMIT_LUA)
        self._acquire3 = reg(lua.ACQUIRE3_LUA)
        self._release = reg(lua.RELEASE_LUA)
        self._renew = reg(lua.RENEW_LUA)
        self._renew_host = reg(lua.RENEW_HOST_LUA)
        self._register_host = reg(lua.REGISTER_HOST_LUA)
        self._mark_started = reg(lua.MARK_STARTED_LUA)
        self._unpark = reg(lua.UNPARK_LUA)
        self._reap = reg(lua.REAP_LUA)
        self._requeue = reg(lua.REQUEUE_LUA)
        self._remove_stale = reg(lua.REMOVE_STALE_HOSTS_LUA)
        self._acquire_boot = reg(lua.ACQUIRE_BOOT_LUA)
        self._start_boot = reg(lua.START_BOOT_LUA)
        self.host_loss = HostLoss(redis_client, settings, keys)

    # --- FIFO and admission ----------------------------------------------------------------------

    def enqueue(self, items: list[dict]) -> int:
        """Append episodes ({"episode_id", "user", "image"}) to the FIFO in order, all or nothing.

        Episodes already queued or holding slots are skipped (a retried submit is harmless).
        Returns how many were appended. Call ``admit()`` afterwards.
        """
        clean = _fifo_rows(items)
        if not clean:
            return 0
        return int(self._enqueue(args=[self.base, json.dumps(clean)]))

    def enqueue_in(self, pipe: Any, items: list[dict]) -> None:
        """``enqueue`` as one more command of the caller's MULTI ``pipe`` (with the episodes it writes)."""
        clean = _fifo_rows(items)
        if clean:
            self._enqueue(args=[self.base, json.dumps(clean)], client=pipe)

    def admit(self, max_n: int = 100) -> list[Admission]:
        """Admit up to ``max_n`` of the oldest eligible episodes, with their slots reserved.

        The caller then enqueues the first task of each. Cost does not depend on the queue's
        length: users at their limit are parked rather than scanned.
        """
        if max_n <= 0:
            return []
        s = self.settings
        flat = self._admit(args=[self.base, max_n, s.global_limit, s.user_limit, self.lease_ms, self.host_ttl_ms])
        return [Admission(*flat[i : i + 4]) for i in range(0, len(flat), 4)]

    def request_admission(self) -> None:
        """Ask the sweeper to run admission soon (for events seen by a process that cannot send tasks)."""
        pipe = self.redis.pipeline()
        pipe.lpush(self._k("wake"), "1")
        pipe.ltrim(self._k("wake"), 0, 0)
        pipe.execute()

    def wait_for_admission_request(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for ``request_admission()``; True if one came."""
        return self.redis.blpop([self._k("wake")], timeout=timeout_s) is not None

    def queue_length(self) -> int:
        """Episodes waiting in the FIFO."""
        return int(self.redis.hlen(self._k("queued")))

    def mark_started(self, episode_id: str) -> bool:
        """The episode's provision task ran; False if it no longer holds slots (re-queued or released)."""
        return bool(self._mark_started(args=[self.base, episode_id]))

    # --- slots ----------------------------------------------------------------------------------

    def acquire(self, episode_id: str, user: str, host: str, image: str = "") -> str:
        """Reserve the three tiers on a named host, bypassing the FIFO, all or nothing.

        Returns "ok", or which tier refused: "global", "user", "host"; "unknown_host" if the
        host never registered; "elsewhere" if the episode already holds slots for another
        user or host. Idempotent for an episode already holding them (renews).
        """
        s = self.settings
        return self._acquire3(
            args=[self.base, episode_id, user, host, image, s.global_limit, s.user_limit, self.lease_ms]
        )

    def release(self, episode_id: str) -> int:
        """Free every tier the episode holds, or take it out of the FIFO; idempotent.

        Returns how many episodes wait in the FIFO now: when any do, call ``admit()`` afterwards
        (a slot may have freed).
        """
        return int(self._release(args=[self.base, episode_id]))

    def renew(self, episode_id: str) -> bool:
        """Extend the episode's leases; False if they were lost (its slots may be someone else's now)."""
        return bool(self._renew(args=[self.base, episode_id, self.lease_ms]))

    def renew_host(self, host: str) -> int:
        """Extend the leases of every live episode holding a slot on ``host`` (final ones are freed);
        returns how many were renewed."""
        return int(self._renew_host(args=[self.base, host, self.lease_ms, self.keys.episode("")]))

    def placement(self, episode_id: str) -> dict[str, Any] | None:
        """Where a held episode runs ({user, host, image, ...}), or None if it holds no slots."""
        raw = self.redis.hget(self._k("held"), episode_id)
        return json.loads(raw) if raw else None

    # --- hosts ------------------------------------------------------------------------------------

    def register_host(
        self, name: str, *, capacity: int, images: list[str], warm: dict[str, int], disk_free_gb: float
    ) -> bool:
        """Heartbeat of an env host; True if it just joined (then run ``admit()``)."""
        if not name:
            raise SpecError("host name must be a non-empty string", field="name")
        if capacity < 0:
            raise SpecError(f"capacity must be >= 0, got {capacity}", field="capacity")
        joined = self._register_host(
            args=[
                self.base,
                name,
                int(capacity),
                float(disk_free_gb),
                json.dumps(list(images)),
                json.dumps({k: int(v) for k, v in warm.items()}),
                self.host_ttl_ms,
            ]
        )
        if joined:
            self.host_loss.back(name)
        return bool(joined)

    def drain_host(self, name: str, drain: bool = True) -> None:
        """Stop (or, with drain=False, resume) admissions to a host; its running episodes finish.

        The mark outlives the host's registration, so a drained host that restarts stays drained.
        """
        if drain:
            if self.redis.zscore(self._k("hosts"), name) is None:
                raise NotFoundError(f"no env host named {name!r} is registered (see `megaflow capacity`)")
            self.redis.sadd(self._k("drained"), name)
        else:
            self.redis.srem(self._k("drained"), name)

    def leave_host(self, name: str) -> None:
        """Tell a host to leave: drained now; its env worker unregisters and stops once it holds nothing."""
        self.drain_host(name)
        self.redis.sadd(self.keys.env("leaving"), name)

    def leaving(self, name: str) -> bool:
        return bool(self.redis.sismember(self.keys.env("leaving"), name))

    def remove_host(self, name: str) -> None:
        """Unregister a host that left on purpose (not lost: nothing of it is moved)."""
        pipe = self.redis.pipeline(transaction=True)
        for image in self.redis.smembers(self._k("himages", name)):
            pipe.hdel(self._k("imghosts", image), name)
        pipe.zrem(self._k("hosts"), name)
        pipe.hdel(self._k("hostcap"), name)
        pipe.delete(self._k("hostinfo", name), self._k("himages", name), self._k("hwarm", name))
        pipe.srem(self._k("drained"), name)
        pipe.srem(self.keys.env("leaving"), name)
        pipe.execute()

    def host_has_image(self, name: str, image: str) -> bool:
        """Whether env host ``name`` reported ``image`` present in its last heartbeat."""
        return bool(self.redis.sismember(self._k("himages", name), image))

    def hosts(self) -> list[dict[str, Any]]:
        """Every registered host with its load, capacity, boot slots, images and heartbeat age."""
        now = self._now_ms()
        entries = self.redis.zrange(self._k("hosts"), 0, -1, withscores=True)
        drained = self.redis.smembers(self._k("drained"))
        pipe = self.redis.pipeline(transaction=False)
        for name, _ in entries:
            pipe.hgetall(self._k("hostinfo", name))
            pipe.zcount(self._k("host", name), f"({now}", "+inf")
            pipe.zcount(self._k("boot", name), f"({now}", "+inf")
            pipe.scard(self._k("himages", name))
            pipe.hgetall(self._k("hwarm", name))
        res = pipe.execute()
        out = []
        for i, (name, beat) in enumerate(entries):
            info, used, booting, n_images, warm = res[5 * i : 5 * i + 5]
            age = (now - beat) / 1000
            out.append(
                {
                    "name": name,
                    "used": int(used),
                    "capacity": int(info.get("capacity", 0)),
                    "booting": int(booting),
                    "boot_limit": self.settings.boot_concurrency,
                    "drained": name in drained,
                    "alive": age < self.settings.host_ttl_s,
                    "heartbeat_age_s": round(age, 3),
                    "images": int(n_images),
                    "warm": {k: int(v) for k, v in warm.items()},
                    "disk_free_gb": float(info.get("disk_free_gb", 0.0)),
                }
            )
        return out

    # --- boot limiter -------------------------------------------------------------------------------

    def acquire_boot(self, host: str, holder: str) -> bool:
        """Take one of the host's container-creation slots (cap and optional rate); never waits.

        The slot's lease is ``boot_timeout_s + lease_s``: a creator that crashes frees it after that.
        With ``boot_rate_per_s`` set, a token bucket allows one second's worth (at least one) at once.
        """
        return bool(self._acquire_boot(keys=self._boot_keys(host), args=[holder, *self._boot_args()]))

    def start_boot(self, host: str, episode_id: str) -> str:
        """``mark_started`` and then, if the episode still holds its slots, ``acquire_boot`` for it on
        ``host``, in one round trip: "requeued" (it no longer holds slots: its provision must not run),
        "busy" (started, but no boot slot is free now) or "ok" (started, holding a boot slot)."""
        got = self._start_boot(keys=self._boot_keys(host), args=[self.base, episode_id, *self._boot_args()])
        return ("requeued", "busy", "ok")[int(got)]

    def _boot_keys(self, host: str) -> list[str]:
        return [self._k("boot", host), self._k("bootrate", host)]

    def _boot_args(self) -> list[float]:
        """The boot limiter's cap, lease (ms), rate per second (0: none) and burst."""
        s = self.settings
        rate = s.boot_rate_per_s or 0.0
        return [s.boot_concurrency, lease_ms(s.boot_timeout_s + s.lease_s), rate, max(1.0, rate)]

    def release_boot(self, host: str, holder: str) -> None:
        """Give a boot slot back; idempotent."""
        self.redis.zrem(self._k("boot", host), holder)

    # --- quotas -------------------------------------------------------------------------------------

    def set_quota(self, user: str, n: int | None) -> None:
        """Set a user's limit of episodes running at once (None: back to the default)."""
        if not user:
            raise QuotaError("user must be a non-empty string")
        if n is None:
            self.redis.hdel(self._k("quotas"), user)
        else:
            if n < 0:
                raise QuotaError(f"quota of {user!r} must be >= 0, got {n}")
            self.redis.hset(self._k("quotas"), user, int(n))
        self._unpark(args=[self.base, user])

    def quota(self, user: str) -> int:
        """A user's current limit."""
        raw = self.redis.hget(self._k("quotas"), user)
        return int(raw) if raw is not None else self.settings.user_limit

    # --- operator view ------------------------------------------------------------------------------

    def capacity(self) -> dict[str, Any]:
        """Used / limit per tier, per user and per host, queue length and oldest wait."""
        now = self._now_ms()
        r = self.redis
        quotas = r.hgetall(self._k("quotas"))
        users = set(quotas) | set(r.zrange(self._k("heads"), 0, -1))
        for _, raw in r.hscan_iter(self._k("held"), count=_BATCH):
            users.add(json.loads(raw)["user"])
        users_sorted = sorted(users)
        parked = set(r.zrange(self._k("parked"), 0, -1))
        pipe = r.pipeline(transaction=False)
        pipe.zcount(self._k("global"), f"({now}", "+inf")
        pipe.hlen(self._k("queued"))
        pipe.zrange(self._k("heads"), 0, 0)
        pipe.zcard(self._k("admitted"))
        for u in users_sorted:
            pipe.zcount(self._k("user", u), f"({now}", "+inf")
            pipe.zcard(self._k("q", u))
        res = pipe.execute()
        used_global, qlen, oldest_user, admitted = res[:4]
        oldest = None
        if oldest_user:
            head = r.zrange(self._k("q", oldest_user[0]), 0, 0)
            raw = r.hget(self._k("queued"), head[0]) if head else None
            if raw:
                item = json.loads(raw)
                oldest = {"episode_id": head[0], "user": item["user"], "wait_s": round((now - item["t"]) / 1000, 3)}
        per_user = []
        for i, u in enumerate(users_sorted):
            used, queued = res[4 + 2 * i : 6 + 2 * i]
            limit = int(quotas[u]) if u in quotas else self.settings.user_limit
            per_user.append(
                {
                    "user": u,
                    "used": int(used),
                    "limit": limit,
                    "queued": int(queued),
                    "at_limit": u in parked or int(used) >= limit,
                    "override": u in quotas,
                }
            )
        return {
            "global": {"used": int(used_global), "limit": self.settings.global_limit},
            "users": per_user,
            "hosts": self.hosts(),
            "queue": {
                "length": int(qlen),
                "oldest_wait_s": oldest["wait_s"] if oldest else 0.0,
                "oldest": oldest,
                "admitted_not_started": int(admitted),
            },
        }

    # --- repair -------------------------------------------------------------------------------------

    def sweep(self, *, remove_hosts: bool = True) -> dict[str, Any]:
        """One repair pass: mark hosts whose heartbeat lapsed lost and re-queue their live episodes, free
        lapsed leases, re-queue admitted episodes that never started (lease lapsed, or not started within
        ``admit_start_timeout_s``), wake parked users whose slots lapsed. Returns counts of what it fixed,
        and under ``exhausted`` the episodes of lost hosts out of attempts (the caller ends them).

        ``remove_hosts=False`` (and no lease reclaiming) is for the moments after a Redis outage, when
        heartbeats and renewals had no chance to arrive: nothing is judged lost then.
        """
        removed: list[str] = []
        moved_n, exhausted = 0, []
        if remove_hosts:
            removed = list(self._remove_stale(args=[self.base, self.host_ttl_ms]))
            if removed:
                self.host_loss.mark_lost(removed)
            moved = self.host_loss.move_episodes(removed) if removed else None
            if moved:
                moved_n, exhausted = len(moved.requeued), moved.exhausted
        reclaimed = requeued = 0
        if remove_hosts:
            for chunk in _chunks((ep for ep, _ in self.redis.hscan_iter(self._k("held"), count=_BATCH)), _BATCH):
                freed, back = self._reap(args=[self.base, *chunk])
                reclaimed, requeued = reclaimed + int(freed), requeued + int(back)
        cutoff = self._now_ms() - int(self.settings.admit_start_timeout_s * 1000)
        stale = self.redis.zrangebyscore(self._k("admitted"), "-inf", cutoff)
        for chunk in _chunks(stale, _BATCH):
            requeued += int(self._requeue(args=[self.base, cutoff, *chunk]))
        now = self._now_ms()
        due = self.redis.zrangebyscore(self._k("parked"), "-inf", now)
        for chunk in _chunks(due, _BATCH):
            self._unpark(args=[self.base, *chunk])
        for name in self.redis.zrange(self._k("hosts"), 0, -1):
            self.redis.zremrangebyscore(self._k("boot", name), "-inf", now)
        return {
            "hosts_removed": len(removed),
            "leases_reclaimed": reclaimed,
            "requeued": requeued,
            "users_unparked": len(due),
            "moved": moved_n,
            "exhausted": exhausted,
        }

    # --- helpers ------------------------------------------------------------------------------------

    def _k(self, name: str, member: str | None = None) -> str:
        return self.keys.res(name, member)

    def _now_ms(self) -> int:
        sec, usec = self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000


def _chunks(items: Iterable[str], size: int) -> Iterable[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _fifo_rows(items: list[dict]) -> list[dict[str, str]]:
    """The FIFO rows of ``items``, checked: each names a non-empty episode_id, user and image, once."""
    clean = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        row = {}
        for field in ("episode_id", "user", "image"):
            value = item.get(field) if isinstance(item, dict) else None
            if not isinstance(value, str) or not value:
                raise SpecError(f"{field} must be a non-empty string", index=i, field=field)
            row[field] = value
        if row["episode_id"] in seen:
            raise SpecError(f"episode_id {row['episode_id']!r} appears twice", index=i, field="episode_id")
        seen.add(row["episode_id"])
        clean.append(row)
    return clean
