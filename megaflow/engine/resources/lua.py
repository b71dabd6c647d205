"""The resource manager's Lua scripts, one named constant per atomic operation.

Every script starts with ``PRELUDE``: Redis time in ms (``now``), the key names derived from
ARGV[1] (the resource namespace, ``Keys.res()``), and small helpers. Per-user, per-host and
per-queue keys are built inside the scripts from that namespace, so they are not declared in
KEYS: this needs a single Redis (or one Redis Cluster slot), which is how MegaFlow runs. The key
layout is listed in ``ResourceManager``'s docstring.

Tier sorted sets (global, user:<u>, host:<h>) map holder (episode id) -> lease expiry in ms of
Redis time; a member whose score is <= now has lapsed and is ignored or dropped on sight.
"""

from __future__ import annotations

from megaflow.core.keys import resource_lua_prelude
from megaflow.engine.resources.semaphore import LUA_NOW

PRELUDE = (
    LUA_NOW
    + resource_lua_prelude()
    + """
-- live members of a tier after dropping lapsed ones
local function live(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key)
end

local function alive(key, member)
  local s = redis.call('ZSCORE', key, member)
  return s and tonumber(s) > now
end

local function user_limit(u, default)
  local q = redis.call('HGET', K.quotas, u)
  if q then return tonumber(q) end
  return default
end

-- after a user's queue changed: keep heads / ready (users not parked) in step with its head
local function set_head(u)
  local head = redis.call('ZRANGE', qkey(u), 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', K.heads, u)
    redis.call('ZREM', K.ready, u)
    redis.call('ZREM', K.parked, u)
  else
    redis.call('ZADD', K.heads, head[2], u)
    if not redis.call('ZSCORE', K.parked, u) then redis.call('ZADD', K.ready, head[2], u) end
  end
end

-- a parked user (at its limit) goes back among the ready ones, to be checked again
local function unpark(u)
  if redis.call('ZREM', K.parked, u) == 1 then set_head(u) end
end

-- a user at its limit leaves the ready set until a slot of its frees (release, lapse, quota)
local function park(u, lease)
  redis.call('ZREM', K.ready, u)
  local first = redis.call('ZRANGE', ukey(u), 0, 0, 'WITHSCORES')
  local recheck = now + lease
  if #first > 0 then recheck = tonumber(first[2]) end
  redis.call('ZADD', K.parked, recheck, u)
end

local function hold(ep, u, h, lease)
  local exp = now + lease
  redis.call('ZADD', K.global, exp, ep)
  redis.call('ZADD', ukey(u), exp, ep)
  redis.call('ZADD', hkey(h), exp, ep)
end

-- free every tier an episode holds; returns its placement record (or nil)
local function drop(ep)
  local raw = redis.call('HGET', K.held, ep)
  redis.call('ZREM', K.global, ep)
  redis.call('ZREM', K.admitted, ep)
  if not raw then return nil end
  local info = cjson.decode(raw)
  redis.call('ZREM', ukey(info.user), ep)
  redis.call('ZREM', hkey(info.host), ep)
  redis.call('HDEL', K.held, ep)
  unpark(info.user)
  return info
end

-- all three tiers still live for a held episode
local function held_live(ep, info)
  return alive(K.global, ep) and alive(ukey(info.user), ep) and alive(hkey(info.host), ep)
end

-- free an episode; one admitted from the FIFO that never started goes back to its place there
-- (its host died or never picked it up). Returns 'requeued', 'freed' or nil (held nothing).
local function requeue_or_drop(ep)
  local started = not redis.call('ZSCORE', K.admitted, ep)
  local info = drop(ep)
  if not info then return nil end
  if started or not info.seq or info.seq <= 0 then return 'freed' end
  redis.call('ZADD', qkey(info.user), info.seq, ep)
  redis.call('HSET', K.queued, ep, cjson.encode({user = info.user, image = info.image,
    seq = info.seq, t = info.t, requeues = (info.requeues or 0) + 1}))
  set_head(info.user)
  return 'requeued'
end
"""
)

# Append episodes to the FIFO in order, all or nothing; episodes already queued or held are skipped.
# KEYS: none (see module docstring)
# ARGV[1]: namespace   ARGV[2]: JSON list of {"episode_id", "user", "image"}
# Returns the number of episodes appended.
ENQUEUE_LUA = (
    PRELUDE
    + """
local items = cjson.decode(ARGV[2])
local fresh = {}
for _, it in ipairs(items) do
  if redis.call('HEXISTS', K.queued, it.episode_id) == 0 and redis.call('HEXISTS', K.held, it.episode_id) == 0 then
    fresh[#fresh + 1] = it
  end
end
if #fresh == 0 then return 0 end
local last = redis.call('INCRBY', K.seq, #fresh)
local seq = last - #fresh
local users = {}
for _, it in ipairs(fresh) do
  seq = seq + 1
  redis.call('ZADD', qkey(it.user), seq, it.episode_id)
  redis.call('HSET', K.queued, it.episode_id,
    cjson.encode({user = it.user, image = it.image, seq = seq, t = now, requeues = 0}))
  users[it.user] = true
end
for u, _ in pairs(users) do set_head(u) end
return #fresh
"""
)

# Admit up to N of the oldest eligible episodes: for each, take the ready user with the oldest
# head, park it if at its limit, else pick a host and reserve global, user and host slots.
# Cost: one ZCOUNT per live host per call (to learn free capacity), then per admitted episode
# O(log queue) for the sorted sets, one read of the image's host index (hosts that have it) and,
# when no free host has it, a scan of the in-script host table (no Redis calls). Users at their
# limit are parked, so they are not looked at again until a slot of theirs frees.
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2]: max episodes  ARGV[3]: global limit  ARGV[4]: default user limit
# ARGV[5]: lease (ms)  ARGV[6]: host heartbeat TTL (ms)
# Returns a flat list: episode_id, user, host, image, episode_id, ...
ADMIT_LUA = (
    PRELUDE
    + """
local max_n, glimit, udefault = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, host_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
for _, u in ipairs(redis.call('ZRANGEBYSCORE', K.parked, '-inf', now, 'LIMIT', 0, 1000)) do unpark(u) end
if redis.call('ZCARD', K.ready) == 0 then return {} end
local gused = live(K.global)
if gused >= glimit then return {} end
local caps, drained = {}, {}
local hc = redis.call('HGETALL', K.hostcap)
for i = 1, #hc, 2 do caps[hc[i]] = tonumber(hc[i + 1]) end
for _, h in ipairs(redis.call('SMEMBERS', K.drained)) do drained[h] = true end
local free, order, nfree = {}, {}, 0
for _, h in ipairs(redis.call('ZRANGEBYSCORE', K.hosts, now - host_ttl, '+inf')) do
  local cap = caps[h] or 0
  if cap > 0 and not drained[h] then
    local used = redis.call('ZCOUNT', hkey(h), '(' .. now, '+inf')
    if used < cap then
      free[h] = {cap = cap, used = used}
      order[#order + 1] = h
      nfree = nfree + 1
    end
  end
end
local out, n = {}, 0
while n < max_n and gused < glimit and nfree > 0 do
  local top = redis.call('ZRANGE', K.ready, 0, 0)
  if #top == 0 then break end
  local u = top[1]
  if live(ukey(u)) >= user_limit(u, udefault) then
    park(u, lease)
  else
    local head = redis.call('ZRANGE', qkey(u), 0, 0, 'WITHSCORES')
    local raw = #head > 0 and redis.call('HGET', K.queued, head[1])
    if not raw then
      if #head > 0 then redis.call('ZREM', qkey(u), head[1]) end
      set_head(u)
    else
      local ep, item = head[1], cjson.decode(raw)
      -- a free host with a warm container, else one with the image, else the least loaded
      local best, bw, bload = nil, -1, 2
      local idx = redis.call('HGETALL', imgidx(item.image))
      for i = 1, #idx, 2 do
        local h = free[idx[i]]
        if h then
          local w = tonumber(idx[i + 1]) > 0 and 1 or 0
          local load = h.used / h.cap
          if w > bw or (w == bw and load < bload) then best, bw, bload = idx[i], w, load end
        end
      end
      if not best then
        for _, name in ipairs(order) do
          local h = free[name]
          if h and h.used / h.cap < bload then best, bload = name, h.used / h.cap end
        end
      end
      local h = free[best]
      redis.call('ZREMRANGEBYSCORE', hkey(best), '-inf', now)
      hold(ep, u, best, lease)
      redis.call('HSET', K.held, ep, cjson.encode({user = u, host = best, image = item.image,
        seq = item.seq, t = item.t, requeues = item.requeues or 0, admitted = now}))
      redis.call('ZADD', K.admitted, now, ep)
      redis.call('ZREM', qkey(u), ep)
      redis.call('HDEL', K.queued, ep)
      set_head(u)
      if bw == 1 then
        redis.call('HINCRBY', warmkey(best), item.image, -1)
        redis.call('HINCRBY', imgidx(item.image), best, -1)
      end
      h.used = h.used + 1
      if h.used >= h.cap then free[best] = nil; nfree = nfree - 1 end
      gused, n = gused + 1, n + 1
      out[#out + 1] = ep; out[#out + 1] = u; out[#out + 1] = best; out[#out + 1] = item.image
    end
  end
end
return out
"""
)

# Reserve the three tiers for one episode on a named host, all or nothing (no FIFO involved).
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2]: episode id  ARGV[3]: user  ARGV[4]: host  ARGV[5]: image
# ARGV[6]: global limit  ARGV[7]: default user limit  ARGV[8]: lease (ms)
# Returns 'ok' (also when already held there: renewed), 'global', 'user', 'host' (that tier is
# full), 'unknown_host' or 'elsewhere' (the episode holds slots on another host).
ACQUIRE3_LUA = (
    PRELUDE
    + """
local ep, u, h, image = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local glimit, udefault, lease = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local raw = redis.call('HGET', K.held, ep)
if raw then
  local info = cjson.decode(raw)
  if not held_live(ep, info) then
    drop(ep)
  elseif info.host ~= h or info.user ~= u then
    return 'elsewhere'
  else
    hold(ep, u, h, lease)
    return 'ok'
  end
end
local cap = redis.call('HGET', K.hostcap, h)
if not cap then return 'unknown_host' end
if live(K.global) >= glimit then return 'global' end
if live(ukey(u)) >= user_limit(u, udefault) then return 'user' end
if live(hkey(h)) >= tonumber(cap) then return 'host' end
hold(ep, u, h, lease)
redis.call('HSET', K.held, ep, cjson.encode({user = u, host = h, image = image, seq = 0, t = now,
  requeues = 0, admitted = now}))
return 'ok'
"""
)

# Free every tier an episode holds and take it out of the FIFO if still queued (idempotent).
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2]: episode id
# Returns how many episodes wait in the FIFO now (nothing to admit when 0).
RELEASE_LUA = (
    PRELUDE
    + """
local ep = ARGV[2]
if not drop(ep) then
  local raw = redis.call('HGET', K.queued, ep)
  if raw then
    local item = cjson.decode(raw)
    redis.call('HDEL', K.queued, ep)
    redis.call('ZREM', qkey(item.user), ep)
    set_head(item.user)
  end
end
return redis.call('HLEN', K.queued)
"""
)

# Extend one episode's leases on all three tiers; if any tier's lease lapsed, free the rest.
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2]: episode id  ARGV[3]: lease (ms)
# Returns 1 if renewed, 0 if the lease was lost.
RENEW_LUA = (
    PRELUDE
    + """
local ep, lease = ARGV[2], tonumber(ARGV[3])
local raw = redis.call('HGET', K.held, ep)
if not raw then redis.call('ZREM', K.global, ep); return 0 end
local info = cjson.decode(raw)
if held_live(ep, info) then hold(ep, info.user, info.host, lease); return 1 end
drop(ep)
return 0
"""
)

# Extend the leases of every episode holding a slot on one host (the env worker's heartbeat).
# An episode whose lease lapsed while it ran there (the heartbeat could not reach Redis for a while)
# is held again: the host is alive and still runs it. One admitted and never started whose lease
# lapsed is freed instead (back to its place in the FIFO). A final episode is not renewed but freed:
# its close may have been lost with a worker, and its container is the reaper's.
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2]: host  ARGV[3]: lease (ms)  ARGV[4]: episode hash key prefix ("" to skip)
# Returns the number of episodes renewed.
RENEW_HOST_LUA = (
    PRELUDE
    + """
local h, lease = ARGV[2], tonumber(ARGV[3])
local n = 0
for _, ep in ipairs(redis.call('ZRANGE', hkey(h), 0, -1)) do
  local raw = redis.call('HGET', K.held, ep)
  local info = raw and cjson.decode(raw)
  local started = not redis.call('ZSCORE', K.admitted, ep)
  if info and ARGV[4] ~= '' and redis.call('HGET', ARGV[4] .. ep, 'terminal') == '1' then
    drop(ep)
  elseif info and info.host == h and (started or held_live(ep, info)) then
    hold(ep, info.user, h, lease)
    n = n + 1
  else
    redis.call('ZREM', hkey(h), ep)
    if info and info.host == h then requeue_or_drop(ep) end
  end
end
return n
"""
)

# An env host's heartbeat: record capacity, free disk, images present and warm containers. The
# per-image host index (imghosts:<image>, host -> warm containers) is written only where it changed.
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2]: host  ARGV[3]: capacity  ARGV[4]: disk free (GB)
# ARGV[5]: JSON list of images  ARGV[6]: JSON object image -> warm containers
# ARGV[7]: host heartbeat TTL (ms)
# Returns 1 if the host joined (new, or back after its heartbeat had gone stale), else 0.
REGISTER_HOST_LUA = (
    PRELUDE
    + """
local h, ttl = ARGV[2], tonumber(ARGV[7])
local last = redis.call('ZSCORE', K.hosts, h)
local joined = (not last or tonumber(last) <= now - ttl) and 1 or 0
redis.call('ZADD', K.hosts, now, h)
redis.call('HSET', K.hostcap, h, ARGV[3])
redis.call('HSET', infokey(h), 'capacity', ARGV[3], 'disk_free_gb', ARGV[4], 'heartbeat', now)
local new, old = {}, {}
for _, image in ipairs(cjson.decode(ARGV[5])) do new[image] = 0 end
for image, count in pairs(cjson.decode(ARGV[6])) do
  if tonumber(count) > 0 then new[image] = tonumber(count) end
end
for _, image in ipairs(redis.call('SMEMBERS', imgkey(h))) do old[image] = 0 end
local ow = redis.call('HGETALL', warmkey(h))
for i = 1, #ow, 2 do if old[ow[i]] then old[ow[i]] = tonumber(ow[i + 1]) end end
for image, _ in pairs(old) do
  if new[image] == nil then
    redis.call('SREM', imgkey(h), image)
    redis.call('HDEL', warmkey(h), image)
    redis.call('HDEL', imgidx(image), h)
  end
end
for image, count in pairs(new) do
  if old[image] == nil then redis.call('SADD', imgkey(h), image) end
  if old[image] ~= count then
    redis.call('HSET', imgidx(image), h, count)
    if count > 0 then redis.call('HSET', warmkey(h), image, count) else redis.call('HDEL', warmkey(h), image) end
  end
end
return joined
"""
)

# Mark an admitted episode as started (its provision task ran), so the sweep leaves it alone.
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2]: episode id
# Returns 1 if the episode holds its slots, 0 if not (it was released or re-queued meanwhile).
MARK_STARTED = """
if redis.call('HEXISTS', K.held, ARGV[2]) == 0 then return 0 end
redis.call('ZREM', K.admitted, ARGV[2])
"""
MARK_STARTED_LUA = PRELUDE + MARK_STARTED + "return 1\n"

# Let parked users be checked again (after a quota change).
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2..]: users
# Returns 0.
UNPARK_LUA = (
    PRELUDE
    + """
for i = 2, #ARGV do unpark(ARGV[i]) end
return 0
"""
)

# Sweep step: free held episodes whose lease lapsed on any tier; one admitted from the FIFO that
# never started goes back to its place in the FIFO.
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2..]: episode ids to check
# Returns {freed, re-queued}.
REAP_LUA = (
    PRELUDE
    + """
local freed, requeued = 0, 0
for i = 2, #ARGV do
  local raw = redis.call('HGET', K.held, ARGV[i])
  if raw and not held_live(ARGV[i], cjson.decode(raw)) then
    if requeue_or_drop(ARGV[i]) == 'requeued' then requeued = requeued + 1 else freed = freed + 1 end
  end
end
redis.call('ZREMRANGEBYSCORE', K.global, '-inf', now)
return {freed, requeued}
"""
)

# Sweep step: put episodes admitted before a cutoff and never started back at their place in the FIFO.
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2]: cutoff (ms of Redis time)  ARGV[3..]: episode ids
# Returns the number re-queued.
REQUEUE_LUA = (
    PRELUDE
    + """
local cutoff, n = tonumber(ARGV[2]), 0
for i = 3, #ARGV do
  local ep = ARGV[i]
  local at = redis.call('ZSCORE', K.admitted, ep)
  if at and tonumber(at) <= cutoff and requeue_or_drop(ep) == 'requeued' then n = n + 1 end
end
return n
"""
)

# Sweep step: remove env hosts whose heartbeat is older than the TTL (their episodes' leases
# then lapse by themselves, since nobody renews them).
# KEYS: none (see module docstring)
# ARGV[1]: namespace  ARGV[2]: host heartbeat TTL (ms)
# Returns the names removed.
REMOVE_STALE_HOSTS_LUA = (
    PRELUDE
    + """
local gone = redis.call('ZRANGEBYSCORE', K.hosts, '-inf', now - tonumber(ARGV[2]))
for _, h in ipairs(gone) do
  for _, image in ipairs(redis.call('SMEMBERS', imgkey(h))) do redis.call('HDEL', imgidx(image), h) end
  redis.call('ZREM', K.hosts, h)
  redis.call('HDEL', K.hostcap, h)
  redis.call('DEL', infokey(h), imgkey(h), warmkey(h))
end
return gone
"""
)

# take_boot(key, bucket, holder, limit, lease, rate, burst): 1 when the holder has one of the host's
# container-creation slots (taken or renewed), 0 when the cap or the rate refuses; needs ``now``
BOOT_FN = """
local function take_boot(key, bucket, holder, limit, lease, rate, burst)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZSCORE', key, holder) then redis.call('ZADD', key, now + lease, holder); return 1 end
  if redis.call('ZCARD', key) >= limit then return 0 end
  if rate > 0 then
    local b = redis.call('HMGET', bucket, 'tokens', 'ts')
    local tokens, ts = tonumber(b[1] or burst), tonumber(b[2] or now)
    tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
    if tokens < 1 then
      redis.call('HSET', bucket, 'tokens', tokens, 'ts', now)
      return 0
    end
    redis.call('HSET', bucket, 'tokens', tokens - 1, 'ts', now)
    redis.call('PEXPIRE', bucket, math.ceil(burst / rate * 1000) + 1000)
  end
  redis.call('ZADD', key, now + lease, holder)
  redis.call('PEXPIRE', key, lease)
  return 1
end
"""

# Boot limiter: take one of a host's container-creation slots, subject to an optional rate.
# KEYS[1]: boot sorted set of the host (holder -> lease expiry)  KEYS[2]: rate bucket hash (tokens, ts)
# ARGV[1]: holder  ARGV[2]: concurrency  ARGV[3]: lease (ms)  ARGV[4]: rate per s (0: none)
# ARGV[5]: burst (tokens)
# Returns 1 if taken (or already held: renewed), 0 if at the cap or over the rate.
ACQUIRE_BOOT_LUA = (
    LUA_NOW
    + BOOT_FN
    + """
return take_boot(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
"""
)

# An episode's provision begins: MARK_STARTED, then (only if it still holds its slots) ACQUIRE_BOOT, in
# one round trip.
# KEYS[1]: the host's boot slots  KEYS[2]: its rate bucket (the resource keys come from the namespace)
# ARGV[1]: namespace  ARGV[2]: episode id (the boot slot's holder)  ARGV[3..6]: limit, lease ms, rate, burst
# Returns 0: not held (re-queued or released: its provision must not run), 1: started but no boot
# slot free now, 2: started with a boot slot.
START_BOOT_LUA = (
    PRELUDE
    + BOOT_FN
    + MARK_STARTED
    + """
return 1 + take_boot(KEYS[1], KEYS[2], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6]))
"""
)
