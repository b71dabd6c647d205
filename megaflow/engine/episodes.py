"""The episode engine: episode state in Redis, advanced step by step with compare-and-set.

An episode is a chain of short Celery tasks (provision -> (model -> exec)* -> evaluate -> finish).
Each task carries ``(episode_id, step)``; it is applied only if the episode is still at that step,
and the advance (state fields, history, event, and the next task's broker message) is one Lua
script, so a redelivered task is dropped instead of forking the episode, and no crash can fall
between an advance and the enqueueing of what comes next.

Keys owned (see megaflow.core.keys.Keys): ``ep:{id}`` (hash), ``ep:{id}:hist`` (list), ``batch:{id}``,
``batch:{id}:eps``, ``batch:{id}:done``, ``batches``, ``live`` and the ``events`` stream.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import redis

from megaflow.core import states, wire
from megaflow.core.errors import NotFoundError
from megaflow.core.keys import Keys
from megaflow.core.settings import Settings
from megaflow.core.spec import TaskSpec
from megaflow.engine import delivery
from megaflow.engine.dispatch import Dispatcher

log = logging.getLogger(__name__)

EPISODE_TTL_S = 7 * 24 * 3600

# Compare-and-set advance of one episode.
# KEYS[1] episode hash, KEYS[2] history list, KEYS[3] events stream, KEYS[4] live zset,
# KEYS[5] batch done set, KEYS[6] broker list of the next task's queue (or any key when none),
# KEYS[7] broker unacked index, KEYS[8] broker unacked hash
# ARGV[1] expected step, ARGV[2] new step, ARGV[3] JSON object of hash fields (string values),
# ARGV[4] JSON array of history records (each already a JSON string), ARGV[5] event JSON or "",
# ARGV[6] JSON object of numeric increments, ARGV[7] "1" when the episode becomes terminal,
# ARGV[8] stream max length, ARGV[9] TTL of a terminal episode, ARGV[10] episode id,
# ARGV[11] phase names to stamp with Redis time (comma-separated), or "", ARGV[12] the next task's broker message or "",
# ARGV[13] delivery tag of the step's own broker message to acknowledge (megaflow.engine.delivery), or ""
# Returns 1 when applied, 0 when the episode is not at the expected step (or already terminal).
ADVANCE_LUA = """
local function in_chunks(cmd, key, args)  -- one command per 1,000 arguments (Lua's unpack has a limit)
  for i = 1, #args, 1000 do redis.call(cmd, key, unpack(args, i, math.min(i + 999, #args))) end
end
local cur = redis.call('HMGET', KEYS[1], 'step', 'terminal')
if (not cur[1]) or cur[1] ~= ARGV[1] then return 0 end
if cur[2] == '1' then return 0 end
local t = redis.call('TIME')
local nowstr = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local hs = {'step', ARGV[2], 'updated_at', nowstr}
for k, v in pairs(cjson.decode(ARGV[3])) do hs[#hs + 1] = k; hs[#hs + 1] = v end
for name in string.gmatch(ARGV[11], '[^,]+') do hs[#hs + 1] = 't:' .. name; hs[#hs + 1] = nowstr end
if ARGV[7] == '1' then hs[#hs + 1] = 'terminal'; hs[#hs + 1] = '1' end
in_chunks('HSET', KEYS[1], hs)
for k, v in pairs(cjson.decode(ARGV[6])) do redis.call('HINCRBYFLOAT', KEYS[1], k, v) end
in_chunks('RPUSH', KEYS[2], cjson.decode(ARGV[4]))
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'e', ARGV[5], 'ts', nowstr, 'step', ARGV[2])
end
if ARGV[7] == '1' then
  redis.call('ZREM', KEYS[4], ARGV[10])
  redis.call('SADD', KEYS[5], ARGV[10])
  redis.call('EXPIRE', KEYS[1], ARGV[9])
  redis.call('EXPIRE', KEYS[2], ARGV[9])
else
  redis.call('ZADD', KEYS[4], nowstr, ARGV[10])
end
if ARGV[12] ~= '' then redis.call('LPUSH', KEYS[6], ARGV[12]) end
if ARGV[13] ~= '' then
  redis.call('ZREM', KEYS[7], ARGV[13])
  redis.call('HDEL', KEYS[8], ARGV[13])
end
return 1
"""


# One round trip to read an episode: its hash, its history length and all or the tail of its history.
# KEYS[1] episode hash, KEYS[2] history list, [KEYS[3] broker unacked index, KEYS[4] broker unacked hash]
# ARGV[1] first history index to return ("0" all, "-1" the last record), or "" for none,
# [ARGV[2] delivery tag, ARGV[3] delivery time, ARGV[4] kombu's unacked record of the step's own message]
# Returns {flat hash fields, history length, history records}.
LOAD_LUA = """
if ARGV[2] then  -- the step's first read records its delivery as unacknowledged (megaflow.engine.delivery)
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[4])
end
local n = redis.call('LLEN', KEYS[2])
local hist = {}
if ARGV[1] ~= '' then hist = redis.call('LRANGE', KEYS[2], ARGV[1], -1) end
return {redis.call('HGETALL', KEYS[1]), n, hist}
"""


def _stamped_in_hash(phase: str) -> bool:
    """Whether the episode's hash keeps the time of ``phase`` (``t:<phase>``): every named phase and
    the first step do; ``step_2`` onwards only in their events (the records' phases) and history
    records, so a long episode's hash, read whole by every step, does not grow with its steps."""
    return not (phase.startswith("step_") and phase[5:].isdigit() and phase != "step_1")


@lru_cache(maxsize=4096)
def parse_spec(raw: str) -> TaskSpec:
    """The task spec stored with an episode, validated once per process (specs never change)."""
    return TaskSpec.model_validate_json(raw)


class HistoryCache:
    """Decoded history of recent episodes in this process: a step reads only the records appended
    since this process last saw the episode (histories are append-only), so a step's cost does not
    grow with the episode's length."""

    def __init__(self, max_episodes: int = 2048):
        self.max = max_episodes
        self._data: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def known(self, episode_id: str) -> int:
        with self._lock:
            hist = self._data.get(episode_id)
            return len(hist) if hist is not None else 0

    def extend(self, episode_id: str, start: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The whole history: the cached first ``start`` records plus ``records``."""
        with self._lock:
            hist = self._data.pop(episode_id, [])
            hist = hist[:start] + records
            self._data[episode_id] = hist
            while len(self._data) > self.max:
                self._data.popitem(last=False)
            return list(hist)

    def drop(self, episode_id: str) -> None:
        with self._lock:
            self._data.pop(episode_id, None)


@dataclass
class Episode:
    """A snapshot of one episode's state, loaded from Redis."""

    id: str
    fields: dict[str, str]
    history: list[dict[str, Any]] = field(default_factory=list)  # all of it, or only its tail (see load)
    history_len: int = 0

    @property
    def step(self) -> int:
        return int(self.fields.get("step", "0"))

    @property
    def state(self) -> str:
        return self.fields.get("state", "")

    @property
    def batch_id(self) -> str:
        return self.fields.get("batch_id", "")

    @property
    def user(self) -> str:
        return self.fields.get("user", "")

    @property
    def host(self) -> str:
        return self.fields.get("host", "")

    @property
    def terminal(self) -> bool:
        return self.fields.get("terminal") == "1"

    @property
    def spec(self) -> TaskSpec:
        return parse_spec(self.fields["spec"])

    @property
    def container(self) -> dict[str, Any] | None:
        raw = self.fields.get("container")
        return json.loads(raw) if raw else None

    @property
    def pending(self) -> dict[str, Any] | None:
        raw = self.fields.get("pending")
        return json.loads(raw) if raw else None

    def phase_times(self) -> dict[str, float]:
        return {k[2:]: float(v) for k, v in self.fields.items() if k.startswith("t:")}

    def num(self, name: str) -> float:
        return float(self.fields.get(name) or 0)

    def fleet_events(self) -> list[dict[str, Any]]:
        """Elastic fleet decisions that touched this episode (host launched for it, moved off a lost host)."""
        raw = self.fields.get("fleet")
        try:
            return list(json.loads(raw)) if raw else []
        except ValueError:
            return []


@dataclass
class NextTask:
    """The task an advance hands the episode to."""

    name: str
    queue: str

    def to_json(self) -> str:
        return wire.dumps({"name": self.name, "queue": self.queue})


class EpisodeEngine:
    """Creates, loads and advances episodes; sends the next task of each advance."""

    def __init__(self, redis_client: redis.Redis, settings: Settings, keys: Keys, dispatcher: Dispatcher):
        self.r = redis_client
        self.settings = settings
        self.keys = keys
        self.dispatcher = dispatcher  # the next task's message is pushed by the advance script itself
        self.histories = HistoryCache()
        self._advance = redis_client.register_script(ADVANCE_LUA)
        self._load = redis_client.register_script(LOAD_LUA)
        self._unacked = delivery.unacked_keys(settings.key_prefix)

    # --- creation --------------------------------------------------------------------------
    def create_batch(
        self,
        specs: list[TaskSpec],
        user: str,
        batch_id: str | None = None,
        *,
        start: int = 0,
        size: int | None = None,
        submitted_at: float | None = None,
        also: Callable[[Any, list[str]], None] | None = None,
    ) -> tuple[str, list[str]]:
        """Write the episodes of a validated batch (state QUEUED) in one MULTI; return (batch, ids).

        A large batch may be written as several parts: ``start`` is the index of this part's first
        episode and ``size`` the whole batch's length (the batch hash keeps ``size`` and ``written``,
        the episodes written so far). ``submitted_at`` is when the submit began (``t:submitted``;
        ``t:queued`` is this write). ``also(pipe, ids)`` adds commands to the same MULTI (the FIFO
        enqueue), so they happen with the episodes or not at all.
        """
        batch_id = batch_id or f"b-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        ids = [f"{batch_id}-{i:05d}" for i in range(start, start + len(specs))]
        now = f"{time.time():.6f}"
        submitted = now if submitted_at is None else f"{submitted_at:.6f}"
        pipe = self.r.pipeline(transaction=True)
        if start == 0:
            pipe.hset(self.keys.batch(batch_id), mapping={"user": user, "size": size or len(specs), "created_at": now})
            pipe.zadd(self.keys.batches, {batch_id: float(now)})
        pipe.hset(self.keys.batch(batch_id), "written", start + len(specs))
        pipe.rpush(self.keys.batch_episodes(batch_id), *ids)
        for i, (eid, spec) in enumerate(zip(ids, specs), start):
            image = spec.image or self.settings.default_image
            mode = spec.mode or self.settings.env_mode
            if spec.metadata.get("priority") == TRAJECTORY_PRIORITY:  # model calls ordered by progress
                pipe.hset(self.keys.episode(eid), "priority", TRAJECTORY_PRIORITY)
            pipe.hset(
                self.keys.episode(eid),
                mapping={
                    "id": eid,
                    "batch_id": batch_id,
                    "user": user,
                    "task_id": spec.task_id,
                    "index": i,
                    # defaults left out (re-validation restores them): a third of the size for a plain spec
                    "spec": spec.model_dump_json(exclude_defaults=True),
                    "state": states.QUEUED,
                    "step": 0,
                    "attempt": 1,
                    "image": image,
                    "mode": mode,
                    "created_at": now,
                    "t:submitted": submitted,
                    "t:queued": now,
                    "policy_version": spec.policy_version or self.settings.policy_version or "",
                },
            )
            base = {"episode_id": eid, "batch_id": batch_id, "user": user, "task_id": spec.task_id}
            fields = {
                "image": image,
                "mode": mode,
                "attempt": 1,
                "created_at": float(now),
                "policy_version": spec.policy_version or self.settings.policy_version,
            }
            for st, ts in ((states.SUBMITTED, submitted), (states.QUEUED, now)):
                ev = dict(base, state=st, phase=st.lower(), fields=fields)
                pipe.xadd(
                    self.keys.events,
                    {"e": wire.dumps(ev), "ts": ts, "step": 0},
                    maxlen=self.settings.events_maxlen,
                    approximate=True,
                )
        if also is not None:
            also(pipe, ids)
        pipe.execute()
        return batch_id, ids

    # --- loading ---------------------------------------------------------------------------
    def load(self, episode_id: str, *, history: bool | str = True) -> Episode:
        """The episode with all its history (True), none (False) or only its last record ("tail").

        A whole history is read incrementally: only the records this process has not seen yet
        cross the wire and get decoded.
        """
        known = self.histories.known(episode_id) if history is True else 0
        start = {True: str(known), False: "", "tail": "-1"}[history]
        keys, args = [self.keys.episode(episode_id), self.keys.history(episode_id)], [start]
        held = delivery.take_record(episode_id)
        if held is not None:
            tag, record = held
            keys += self._unacked
            args += [tag, repr(time.time()), record]  # kombu scores a delivery with its own clock
        flat, n, hist = self._load(keys=keys, args=args)
        if not flat:
            self.histories.drop(episode_id)
            raise NotFoundError(f"episode {episode_id} not found (expired or never submitted)")
        fields = dict(zip(flat[::2], flat[1::2]))
        records = [json.loads(h) for h in hist]
        if history is True:
            if int(n) < known:  # shorter than what we saw: not the same episode any more
                self.histories.drop(episode_id)
                return self.load(episode_id, history=True)
            records = self.histories.extend(episode_id, known, records)
            if fields.get("terminal") == "1":
                self.histories.drop(episode_id)
        return Episode(episode_id, fields, records, int(n))

    def claim(self, episode_id: str, step: int, *, history: bool | str = True) -> Episode | None:
        """The episode if it is at ``step`` and live; else None (a duplicate or a stale callback).

        The advance that moved an episode past ``step`` enqueued its next task atomically, so a
        redelivered task finding the episode ahead resends nothing (that would only duplicate a step).
        """
        try:
            ep = self.load(episode_id, history=history)
        except NotFoundError:
            log.warning("dropping step %s of unknown episode %s", step, episode_id)
            return None
        if ep.terminal:
            return None
        return ep if ep.step == step else None

    def load_many(self, episode_ids: list[str]) -> dict[str, Episode]:
        """Many episodes without their history in one pipelined round trip; missing ones are left out."""
        if not episode_ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for eid in episode_ids:
            self._load(keys=[self.keys.episode(eid), self.keys.history(eid)], args=[""], client=pipe)
        out = {}
        for eid, (flat, n, _hist) in zip(episode_ids, pipe.execute()):
            if flat:
                out[eid] = Episode(eid, dict(zip(flat[::2], flat[1::2])), [], int(n))
        return out

    # --- advancing -------------------------------------------------------------------------
    def advance(
        self,
        ep: Episode,
        *,
        fields: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
        state: str | None = None,
        phase: str | None = None,
        event_fields: dict[str, Any] | None = None,
        incr: dict[str, float] | None = None,
        next_task: NextTask | None = None,
        terminal: bool = False,
        keep_step: bool = False,
        also_phases: list[str] | tuple[str, ...] = (),
    ) -> bool:
        """Apply one step's results if ``ep`` is still at its step; send ``next_task`` if applied."""
        change = dict(
            fields=fields,
            history=history,
            state=state,
            phase=phase,
            event_fields=event_fields,
            incr=incr,
            next_task=next_task,
            terminal=terminal,
            keep_step=keep_step,
            also_phases=also_phases,
        )
        return self.advance_many([(ep, change)])[0]

    def advance_many(self, changes: list[tuple[Episode, dict[str, Any]]]) -> list[bool]:
        """Advance many episodes in one pipelined round trip (each one still its own compare-and-set
        script); returns, per episode, whether its advance applied.

        Each change is ``(episode, {fields, history, state, phase, event_fields, incr, next_task,
        terminal, keep_step, also_phases})``, every key optional: hash fields to set, history records
        to append, the new state, the phase to stamp, extra fields for the event, numeric increments,
        the task to hand the episode to, whether it becomes terminal, whether the step number stays,
        and earlier phases passed within the same advance (stamped with the same time).
        """
        if not changes:
            return []
        plans = [self._advance_plan(ep, **change) for ep, change in changes]
        if len(plans) == 1:
            keys, args, *_ = plans[0]
            results = [self._advance(keys=keys, args=args)]
        else:
            pipe = self.r.pipeline(transaction=False)
            for keys, args, *_ in plans:
                self._advance(keys=keys, args=args, client=pipe)
            results = pipe.execute()
        out = []
        for (ep, _change), (_k, args, fields, new_step, n_records), applied in zip(changes, plans, results):
            if not applied:
                log.info("episode %s moved past step %s; dropping this result", ep.id, ep.step)
                out.append(False)
                continue
            if args[12]:
                delivery.acknowledged(args[12])
            ep.fields.update(fields)
            ep.fields["step"] = str(new_step)
            ep.history_len += n_records
            out.append(True)
        return out

    def _advance_plan(
        self,
        ep: Episode,
        *,
        fields: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
        state: str | None = None,
        phase: str | None = None,
        event_fields: dict[str, Any] | None = None,
        incr: dict[str, float] | None = None,
        next_task: NextTask | None = None,
        terminal: bool = False,
        keep_step: bool = False,
        also_phases: list[str] | tuple[str, ...] = (),
    ) -> tuple[list[str], list[Any], dict[str, str], int, int]:
        """The advance script's keys and args for one episode, with the fields and step it sets."""
        new_step = ep.step if keep_step else ep.step + 1
        fields = {k: v if isinstance(v, str) else wire.dumps(v) for k, v in (fields or {}).items()}
        if state:
            fields["state"] = state
        if next_task:
            fields["next"] = next_task.to_json()
        event = ""
        if state or phase or event_fields:
            event = wire.dumps(
                {
                    "episode_id": ep.id,
                    "batch_id": ep.batch_id,
                    "user": ep.user,
                    "task_id": ep.fields.get("task_id"),
                    "state": state or ep.state,
                    "phase": phase,
                    "fields": event_fields or {},
                    **({"also_phases": list(also_phases)} if also_phases else {}),
                }
            )
        now = time.time()
        records = [wire.dumps(dict(rec, t=rec.get("t", now))) for rec in (history or [])]
        queue_key, message = self.keys.episode(ep.id), ""
        if next_task:
            queue_key, message = self.dispatcher.encode(
                next_task.name, [ep.id, new_step], next_task.queue, **_priority(ep, next_task)
            )
        keys = [
            self.keys.episode(ep.id),
            self.keys.history(ep.id),
            self.keys.events,
            self.keys.live,
            self.keys.batch_done(ep.batch_id),
            queue_key,
            *self._unacked,
        ]
        args = [
            ep.step,
            new_step,
            wire.dumps(fields),
            wire.dumps(records),
            event,
            wire.dumps(incr or {}),
            "1" if terminal else "0",
            self.settings.events_maxlen,
            EPISODE_TTL_S,
            ep.id,
            ",".join(p for p in (*also_phases, phase) if p and _stamped_in_hash(p)),
            message,
            # the step's own message is acknowledged with its result (not by an advance within the step)
            "" if keep_step else (delivery.take(ep.id, ep.step) or ""),
        ]
        return keys, args, fields, new_step, len(records)

    # --- queries ---------------------------------------------------------------------------
    def batch_ids(self, batch_id: str) -> list[str]:
        ids: list[str] = self.r.lrange(self.keys.batch_episodes(batch_id), 0, -1)  # type: ignore[assignment]
        if not ids and not self.r.exists(self.keys.batch(batch_id)):
            raise NotFoundError(f"batch {batch_id} not found")
        return ids

    def summaries(self, episode_ids: list[str]) -> list[dict[str, Any]]:
        """Light views of many episodes (no history), pipelined."""
        pipe = self.r.pipeline(transaction=False)
        for eid in episode_ids:
            pipe.hgetall(self.keys.episode(eid))
        out = []
        for eid, f in zip(episode_ids, pipe.execute()):
            if f:
                out.append(episode_view(Episode(eid, f)))
        return out


def episode_view(ep: Episode) -> dict[str, Any]:
    """The public view of an episode: what Client.results returns."""
    f = ep.fields
    reward = f.get("reward")
    return {
        "episode_id": ep.id,
        "batch_id": ep.batch_id,
        "task_id": f.get("task_id"),
        "user": ep.user,
        "state": ep.state,
        "reward": float(reward) if reward not in (None, "") else None,
        "cause": f.get("cause") or None,
        "error": f.get("error") or None,
        "host": f.get("host") or None,
        "mode": f.get("mode"),
        "attempt": int(f.get("attempt") or 1),
        "steps": int(ep.num("model_calls")),
        "prompt_tokens": int(ep.num("prompt_tokens")),
        "completion_tokens": int(ep.num("completion_tokens")),
        "artifact_uri": f.get("artifact_uri") or None,
        "phases": ep.phase_times(),
        "fleet": ep.fleet_events(),
    }


TRAJECTORY_PRIORITY = "trajectory"  # spec.metadata.priority: model steps favour episodes further along


def _priority(ep: Episode, task: NextTask) -> dict[str, int]:
    """The broker priority of ``task`` (only model steps of episodes submitted with trajectory priority)."""
    if task.queue != wire.MODEL_QUEUE or ep.fields.get("priority") != TRAJECTORY_PRIORITY:
        return {}
    return {"priority": wire.trajectory_priority(int(ep.num("model_calls")))}


def to_agent() -> NextTask:
    """Hand the episode to the agent service."""
    return NextTask(wire.AGENT_STEP, wire.AGENT_QUEUE)


def to_model() -> NextTask:
    """Hand the episode to the model service."""
    return NextTask(wire.MODEL_COMPLETE, wire.MODEL_QUEUE)


def to_host(name: str, host: str) -> NextTask:
    """Hand the episode to its env host's queue for task ``name``."""
    return NextTask(name, wire.env_host_queue(host))
