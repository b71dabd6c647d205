"""The control service: recorder, safety sweep and episode guard in one small process.

``megaflow control`` runs it; ``megaflow up`` starts one per fleet. Admission itself is event
driven (submit, release, host joining); the sweep only repairs what a crash left behind: hosts
whose heartbeat lapsed (their episodes re-queued as new attempts), lapsed leases, and stalled
episodes (no progress and no task queued or running: the next task is sent again). A Redis outage
is waited out with one log line; nothing is judged lost until heartbeats had time to come back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis

from megaflow.core import states, wire
from megaflow.elastic.autoscaler import autoscaler_threads
from megaflow.records import Recorder
from megaflow.security.requests import Handler, RequestServer
from megaflow.services import lifecycle
from megaflow.services.root import Root

log = logging.getLogger(__name__)

RESENDS = 3  # a stalled episode's next task is sent again at most this often before the episode is ended


def _task_of(envelope: Any) -> tuple[str, int] | None:
    """(episode id, step) a broker message carries, or None for another kind of task (or not a message)."""
    import base64

    try:
        raw = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            raw = base64.b64decode(raw).decode()
        args = json.loads(raw)[0]
        if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], int):
            return args[0], args[1]
    except (KeyError, ValueError, TypeError, IndexError, AttributeError):
        pass  # junk on a queue (workers drop it): not a step of anything
    return None


def pending_tasks(rt: Root) -> set[tuple[str, int]]:
    """(episode, step) of every step task queued for a live consumer or delivered and not yet acknowledged.

    Queues of env hosts that are not alive do not count: nobody will consume them.
    """
    alive = [h["name"] for h in rt.resources.hosts() if h["alive"]]
    queues = [*wire.QUEUES, *(wire.env_host_queue(h) for h in alive)]
    prefix = wire.broker_prefix(rt.settings.key_prefix)
    pipe = rt.redis.pipeline(transaction=False)
    for q in queues:
        pipe.lrange(wire.broker_queue_key(rt.settings.key_prefix, q), 0, -1)
    pipe.hvals(prefix + "unacked")
    *lists, unacked = pipe.execute()
    out: set[tuple[str, int]] = set()
    for raw in (m for messages in lists for m in messages):
        try:
            t = _task_of(json.loads(raw))
        except ValueError:
            t = None
        if t:
            out.add(t)
    for raw in unacked:
        try:
            envelope, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        if not isinstance(routing_key, str):
            routing_key = ""
        host = wire.host_of_queue(routing_key)
        t = _task_of(envelope)
        if t and (host is None or host in alive):
            out.add(t)
    return out


def audit(rt: Root, episode_ids: list[str] | None = None) -> list[str]:
    """Episodes in a non-final state with no task queued or running and no place in the FIFO (stranded).

    A lease does not excuse a missing task (an env host renews its episodes' leases whatever they do).
    ``episode_ids`` defaults to every live episode. Empty is the never-strand promise kept.
    """
    ids: list[str] = episode_ids if episode_ids is not None else rt.redis.zrange(rt.keys.live, 0, -1)  # type: ignore[assignment]
    if not ids:
        return []
    tasks = pending_tasks(rt)
    k = rt.resources._k
    pipe = rt.redis.pipeline(transaction=False)
    for eid in ids:
        pipe.hmget(rt.keys.episode(eid), "terminal", "step")
        pipe.hexists(k("queued"), eid)
    res = pipe.execute()
    stranded = []
    for i, eid in enumerate(ids):
        (terminal, step), queued = res[2 * i : 2 * i + 2]
        if terminal == "1" or step is None or queued:
            continue
        if (eid, int(step)) not in tasks:
            stranded.append(eid)
    return stranded


def redis_now(rt: Root) -> float:
    """Redis time in seconds (episode progress is stamped with it, not with this machine's clock)."""
    sec, usec = rt.redis.time()
    return int(sec) + int(usec) / 1e6


def _chunks(items: list, size: int = 500):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def sweep_episodes(rt: Root, *, now: float | None = None, judge_stalls: bool = True) -> dict[str, int]:
    """Time out episodes past the guard; repair stalled ones.

    A live episode with no progress for ``stall_timeout_s`` and no task queued or running is
    stalled (its message was lost, e.g. with Redis's last second of writes): if its env host is
    gone it is re-queued as a new attempt (or ended as an infra failure past the attempts), else
    its next task is sent again (a duplicate is harmless: the compare-and-set drops it).
    """
    now = now or redis_now(rt)
    fixed = {"timed_out": 0, "resent": 0, "moved": 0, "ended": 0}
    stall_before = now - rt.settings.stall_timeout_s
    stalled: list[tuple[str, int]] = []
    live = rt.redis.zrange(rt.keys.live, 0, -1, withscores=True)
    for chunk in _chunks(live):
        pipe = rt.redis.pipeline(transaction=False)
        for eid, _ in chunk:
            pipe.hmget(rt.keys.episode(eid), "terminal", "step", "t:admitted", "created_at")
        for (eid, last), (terminal, step, admitted, created) in zip(chunk, pipe.execute(), strict=True):
            if step is None or terminal == "1":
                rt.redis.zrem(rt.keys.live, eid)
                continue
            started = float(admitted or created or now)
            if now - started > rt.settings.episode_guard_s:
                ep = rt.engine.load(eid, history=False)
                if lifecycle.finish(
                    rt,
                    ep,
                    states.TIMED_OUT,
                    cause=states.CAUSE_TIMEOUT,
                    error=f"episode guard of {rt.settings.episode_guard_s:.0f}s passed",
                ):
                    fixed["timed_out"] += 1
            elif judge_stalls and last < stall_before:
                stalled.append((eid, int(step)))
    if stalled:
        _repair_stalled(rt, stalled, fixed, now)
    return fixed


def _repair_stalled(rt: Root, stalled: list[tuple[str, int]], fixed: dict[str, int], now: float) -> None:
    tasks = pending_tasks(rt)
    alive = {h["name"] for h in rt.resources.hosts() if h["alive"]}
    queued_key = rt.resources._k("queued")
    for eid, step in stalled:
        if (eid, step) in tasks or rt.redis.hexists(queued_key, eid):
            continue  # waiting in a queue, running, or waiting for admission: not stalled
        ep = rt.engine.load(eid, history=False)
        if ep.terminal or ep.step != step:
            continue  # it moved on while we looked
        starting = ep.state in (states.ADMITTED, states.ENV_STARTING)
        why = ""
        if ep.state in states.LIVE and ep.host and ep.host not in alive:
            why = f"env host {ep.host} not alive"
        elif starting and rt.resources.placement(eid) is None:
            why = "lost its slots before its container started"  # provision would drop it: admit it again
        if why:
            res = rt.resources.host_loss.retry(eid, step, reason=why, host=ep.host)
            if res == 1:
                fixed["moved"] += 1
            elif res == -1 and end_out_of_attempts(rt, ep, why):
                fixed["ended"] += 1
            continue
        resent = json.loads(ep.fields.get("resent") or "[0, -1, 0]")  # [count, step, Redis time of the last]
        count = resent[0] if resent[1] == step else 0
        if count and now - resent[2] < rt.settings.stall_timeout_s:
            continue  # re-sent lately: give it time
        if ep.fields.get("next") and count < RESENDS:
            nxt = json.loads(ep.fields["next"])
            log.warning("episode %s stalled at step %s (%s): re-sending %s", eid, step, ep.state, nxt["name"])
            rt.redis.hset(rt.keys.episode(eid), "resent", json.dumps([count + 1, step, now]))
            rt.dispatcher.send(nxt["name"], [eid, step], nxt["queue"])
            fixed["resent"] += 1
        elif lifecycle.finish(
            rt,
            ep,
            states.FAILED,
            cause=states.CAUSE_INTERNAL,
            error=f"stalled in {ep.state} at step {step}: no progress after {count} re-send(s)",
        ):
            rt.resources.release(eid)
            fixed["ended"] += 1


def end_out_of_attempts(rt: Root, ep, why: str) -> bool:
    """End an episode of a lost host that has used its attempts: FAILED (infra), slots freed here."""
    done = lifecycle.finish(
        rt,
        ep,
        states.FAILED,
        cause=states.CAUSE_INFRA,
        error=f"{why}; {rt.settings.infra_max_attempts} attempt(s) used",
    )
    rt.resources.release(ep.id)  # its close went to the lost host's queue: free the slots now
    return done


class Control:
    """Runs the recorder and the sweep until stopped; both wait out a Redis outage and carry on.

    With ``person_handler`` (``Client.serve_person``, given by ``megaflow control``) it also answers
    the requests of per-person Redis users (:mod:`megaflow.security.requests`).
    """

    def __init__(self, rt: Root, person_handler: Handler | None = None):
        self.rt = rt
        self.person_handler = person_handler
        self.stop = threading.Event()
        self.back_at = time.monotonic()  # when Redis was last seen coming back (or the service started)
        self.down_since: float | None = None

    @property
    def settle_s(self) -> float:
        """After Redis comes back, heartbeats and lease renewals get this long before anything is judged lost."""
        s = self.rt.settings
        return max(s.host_ttl_s, s.lease_s) + max(1.0, s.sweep_interval_s)

    def _outage(self, what: str, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "control: Redis unreachable in %s (%s); retrying until it is back",
                what,
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
            )

    def _reachable(self) -> None:
        if self.down_since is not None:
            log.warning("control: Redis reachable again after %.1fs", time.monotonic() - self.down_since)
            self.down_since = None
            self.back_at = time.monotonic()

    def sweep_once(self) -> dict:
        """One pass: resources (hosts, leases, FIFO), then episodes (guard, stalls), then admission."""
        rt = self.rt
        settled = time.monotonic() - self.back_at > self.settle_s
        fixed = rt.resources.sweep(remove_hosts=settled)
        for eid in fixed.pop("exhausted", []):
            try:
                ep = rt.engine.load(eid, history=False)
            except Exception:
                continue
            if end_out_of_attempts(rt, ep, f"env host {ep.host or '?'} lost"):
                fixed["ended"] = fixed.get("ended", 0) + 1
        fixed.update(sweep_episodes(rt, judge_stalls=settled))
        lifecycle.admit(rt)
        return fixed

    def sweep_loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.rt.redis.ping()
                self._reachable()  # before the pass: it must know Redis was just away
                fixed = self.sweep_once()
                if any(fixed.values()):
                    log.info("sweep repaired %s", fixed)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                self._outage("the sweep", exc)
                self.stop.wait(1.0)
                continue
            except Exception:
                log.exception("sweep failed; retrying next period")
            # a quota change or an undrained host asks for admission: run it then, not a period later
            deadline = time.monotonic() + self.rt.settings.sweep_interval_s
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    if self.rt.resources.wait_for_admission_request(min(1.0, self.rt.settings.sweep_interval_s)):
                        lifecycle.admit(self.rt)
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                    self._outage("admission", exc)
                    self.stop.wait(1.0)
                except Exception:
                    log.exception("admission on request failed")
                    self.stop.wait(1.0)

    def run(self) -> None:
        from megaflow.monitoring.metrics import start_for_service

        metrics = start_for_service(self.rt.settings)  # first: missing metrics credentials stop us here
        threads = [
            threading.Thread(target=self.record_loop, name="recorder", daemon=True),
            threading.Thread(target=self.sweep_loop, name="sweep", daemon=True),
        ]
        if self.person_handler is not None:
            server = RequestServer(self.rt.redis, self.rt.keys, self.person_handler)
            threads.append(
                threading.Thread(
                    target=server.run, args=(self.stop, lambda e: self._outage("person requests", e)),
                    name="person-requests", daemon=True,
                )
            )  # fmt: skip
        threads += autoscaler_threads(self.rt, self.stop)  # settings.elastic: size the env fleet from the backlog
        for t in threads:
            t.start()
        try:
            while not self.stop.is_set():
                try:
                    self.rt.redis.set(
                        self.rt.keys.worker_health("control", "control"), json.dumps({"ts": time.time()}), ex=30
                    )
                    self._reachable()
                except redis.RedisError as exc:
                    self._outage("the health report", exc)
                self.stop.wait(5)
        finally:
            self.stop.set()
            if metrics is not None:
                metrics.close()
            for t in threads:
                t.join(5)

    def record_loop(self) -> None:
        """The recorder, built once Redis answers (the control service may start before it)."""
        while not self.stop.is_set():
            try:
                recorder = Recorder(
                    self.rt.redis, self.rt.keys, self.rt.metadata, retain_s=self.rt.settings.events_retain_s
                )
            except redis.RedisError as exc:
                self._outage("the recorder", exc)
                self.stop.wait(1.0)
                continue
            recorder.run(self.stop)
            return
