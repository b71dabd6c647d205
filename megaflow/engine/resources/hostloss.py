"""Host loss: an env host whose heartbeat lapsed is marked lost and its live episodes move elsewhere.

Each live episode of a lost host is re-queued at its old place in the FIFO as a new attempt
(fresh history, counters and agent state, its slots freed, the step moved on so every task still
addressed to the old attempt is dropped), or, past ``infra_max_attempts``, left for the caller to end as an
infrastructure failure. One Lua script does the episode's and the resource manager's part at once.

Keys owned: ``<prefix>:env:lost`` (hash host -> Redis time in ms it was marked lost; cleared when
the host beats again). The episode and resource keys are the engine's and the manager's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from megaflow.core import states
from megaflow.engine.resources.lua import PRELUDE

log = logging.getLogger(__name__)

# Re-queue one episode as a new attempt, if it is still at the expected step and live.
# KEYS[1] episode hash  KEYS[2] history list  KEYS[3] events stream  KEYS[4] live zset
# ARGV[1] resource namespace  ARGV[2] episode id  ARGV[3] expected step  ARGV[4] max attempts
# ARGV[5] events max length  ARGV[6] reason  ARGV[7] lost host
# Returns 1 re-queued, -1 attempts spent (nothing changed), 0 not at that step or already final.
RETRY_LUA = (
    PRELUDE
    + """
local ep, reason = ARGV[2], ARGV[6]
local f = redis.call('HMGET', KEYS[1], 'step', 'terminal', 'attempt', 'user', 'image', 'batch_id', 'task_id')
if (not f[1]) or f[1] ~= ARGV[3] or f[2] == '1' then return 0 end
local attempt = tonumber(f[3] or '1')
if attempt >= tonumber(ARGV[4]) then return -1 end
local step = tostring(tonumber(f[1]) + 1)
local t = redis.call('TIME')
local nowstr = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', KEYS[1], 'step', step, 'state', 'QUEUED', 'attempt', attempt + 1, 'host', '', 'container', '',
  'pending', '', 'next', '', 'model_calls', 0, 'prompt_tokens', 0, 'completion_tokens', 0, 'format_errors', 0,
  'format_streak', 0, 'updated_at', nowstr, 't:queued', nowstr, 'retry_reason', reason)
-- the episode's own record of fleet decisions that touched it (shown with its results)
local fl = redis.call('HGET', KEYS[1], 'fleet')
local fleet = (fl and fl ~= '') and cjson.decode(fl) or {}
table.insert(fleet, {event = 'moved', from_host = ARGV[7], reason = reason, attempt = attempt + 1,
  t = tonumber(nowstr)})
redis.call('HSET', KEYS[1], 'fleet', cjson.encode(fleet))
-- what the old attempt's agent knew belongs to its container: the new attempt's agent starts over
-- (an installed agent kept 'waiting' for a program never started in the new container, to TIMED_OUT)
redis.call('HDEL', KEYS[1], 'agent_state', 'agent_request', 'submission', 'installed_started')
for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(k, 1, 2) == 't:' and k ~= 't:submitted' and k ~= 't:queued' then redis.call('HDEL', KEYS[1], k) end
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[4], ep)
local ev = cjson.encode({episode_id = ep, batch_id = f[6], user = f[4], task_id = f[7], state = 'QUEUED',
  phase = 'retry', fields = {attempt = attempt + 1, cause = 'infra', error = reason, lost_host = ARGV[7],
  fleet = fleet}})
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'e', ev, 'ts', nowstr, 'step', step)
-- the resource side: free its slots, back to its old place in the FIFO (front of its user's queue)
local info = drop(ep)
local u, image, seq, since, requeues = f[4], f[5], nil, now, 1
if info then
  u, image, seq, since, requeues = info.user, info.image, info.seq, info.t or now, (info.requeues or 0) + 1
end
if (not seq) or tonumber(seq) <= 0 then
  local head = redis.call('ZRANGE', qkey(u), 0, 0, 'WITHSCORES')
  seq = (#head > 0) and (tonumber(head[2]) - 1) or redis.call('INCR', K.seq)
end
redis.call('ZADD', qkey(u), seq, ep)
redis.call('HSET', K.queued, ep, cjson.encode({user = u, image = image, seq = seq, t = since, requeues = requeues}))
set_head(u)
return 1
"""
)


@dataclass
class Moved:
    """What became of a lost host's episodes."""

    requeued: list[str]
    exhausted: list[str]  # attempts spent: the caller ends them FAILED (infra)


class HostLoss:
    """Marks hosts lost and re-queues their live episodes (see the module docstring)."""

    def __init__(self, redis_client, settings, keys):
        self.redis = redis_client
        self.settings = settings
        self.keys = keys
        self._retry = redis_client.register_script(RETRY_LUA)

    @property
    def lost_key(self) -> str:
        return self.keys.env("lost")

    def mark_lost(self, hosts: list[str]) -> None:
        if hosts:
            sec, usec = self.redis.time()
            now = int(sec) * 1000 + int(usec) // 1000
            self.redis.hset(self.lost_key, mapping={h: now for h in hosts})

    def back(self, host: str) -> None:
        """The host beats again: no longer lost (its stale containers are its reaper's)."""
        self.redis.hdel(self.lost_key, host)

    def lost(self) -> dict[str, int]:
        return {h: int(t) for h, t in self.redis.hgetall(self.lost_key).items()}

    def live_on(self, hosts: set[str]) -> list[tuple[str, int, str]]:
        """(episode, step, host) of every live episode placed on one of ``hosts``."""
        ids = self.redis.zrange(self.keys.live, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for eid in ids:
            pipe.hmget(self.keys.episode(eid), "host", "step", "terminal", "state")
        out = []
        for eid, (host, step, terminal, state) in zip(ids, pipe.execute(), strict=True):
            if host in hosts and step is not None and terminal != "1" and state in states.LIVE:
                out.append((eid, int(step), host))
        return out

    def retry(self, episode_id: str, step: int, *, reason: str, host: str = "") -> int:
        """Re-queue one episode as its next attempt: 1 done, -1 attempts spent, 0 it moved on meanwhile."""
        k = self.keys
        return int(
            self._retry(
                keys=[k.episode(episode_id), k.history(episode_id), k.events, k.live],
                args=[
                    k.res(),
                    episode_id,
                    step,
                    self.settings.infra_max_attempts,
                    self.settings.events_maxlen,
                    reason[:500],
                    host,
                ],
            )
        )

    def move_episodes(self, hosts: list[str]) -> Moved:
        """Re-queue (or report as spent) every live episode of the lost ``hosts``."""
        moved = Moved([], [])
        drained = set(self.redis.smembers(self.keys.res("drained")))
        for eid, step, host in self.live_on(set(hosts)):
            reason = f"env host {host} lost (no heartbeat for {self.settings.host_ttl_s:g}s)"
            if host in drained:
                reason += " while draining"
            res = self.retry(eid, step, reason=reason, host=host)
            if res == 1:
                moved.requeued.append(eid)
            elif res == -1:
                moved.exhausted.append(eid)
        if moved.requeued or moved.exhausted:
            log.warning(
                "env host(s) %s lost: %d episode(s) re-queued, %d out of attempts",
                ", ".join(hosts),
                len(moved.requeued),
                len(moved.exhausted),
            )
        return moved
