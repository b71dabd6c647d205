"""The autoscaler: observe the fleet, decide with ``policy.desired_hosts``, act through a provider.

Scale out launches hosts (or resumes hosts it was draining); scale in drains idle hosts first and
terminates a host only once it holds no live episode and no boot slot. Every action is an event in
the elastic stream and every tick a utilisation sample (``megaflow.elastic.usage``).

Only one autoscaler acts on a fleet at a time: each tick first takes or renews a leader lease in
Redis (``E:leader``), so two control services (or a control service and an operator's script) never
launch hosts under the same names or terminate each other's hosts; the other ones wait.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from megaflow.elastic import usage
from megaflow.elastic.config import ElasticConfig
from megaflow.elastic.policy import Decision, FleetState, desired_hosts
from megaflow.elastic.providers import HostHandle, make_provider

log = logging.getLogger(__name__)

LAUNCHING, ACTIVE, DRAINING, REMOVED = "launching", "active", "draining", "removed"

# Take the lease when it is free, renew it when it is ours; 1 if this autoscaler leads.
_LEAD = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] or not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Autoscaler:
    """Sizes the env fleet between ``min_hosts`` and ``max_hosts``; only hosts it launched are drained or removed.

    Keys owned (``E`` = ``<prefix>:elastic``): ``E:hosts`` hash host -> JSON {handle, state, times};
    the event stream and samples of ``megaflow.elastic.usage``.
    """

    def __init__(self, redis_client, settings, resources, provider: Any = None, cfg: ElasticConfig | None = None):
        self.redis = redis_client
        self.settings = settings
        self.resources = resources
        self.cfg = cfg or ElasticConfig.from_settings(settings)
        self.provider = provider if provider is not None else make_provider(settings, self.cfg)
        self.keys = usage.ElasticKeys(settings.key_prefix)
        self.last_up = self.last_down = float("-inf")
        self.idle_since: dict[str, float] = {}
        self.last_target: int | None = None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.leading = False

    def lead(self) -> bool:
        """Take or renew the leader lease (three periods, at least 15 s); False while another autoscaler holds it."""
        ttl_ms = int(max(3 * self.cfg.interval_s, 15.0) * 1000)
        leading = bool(self.redis.eval(_LEAD, 1, self.keys.leader, self.owner, ttl_ms))
        if leading != self.leading:
            if leading:
                log.info("autoscaler %s leads the fleet", self.owner)
            else:
                log.warning("autoscaler %s waits: %s leads the fleet", self.owner, self.redis.get(self.keys.leader))
        self.leading = leading
        return leading

    def resign(self) -> None:
        """Give the lease up now (on close), so another autoscaler takes over at its next tick."""
        self.redis.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1,
            self.keys.leader,
            self.owner,
        )
        self.leading = False

    # --- state of the hosts it manages ----------------------------------------------------------------

    def managed(self) -> dict[str, dict]:
        return {k: json.loads(v) for k, v in self.redis.hgetall(self.keys.hosts).items()}

    def _save(self, rec: dict) -> None:
        self.redis.hset(self.keys.hosts, rec["name"], json.dumps(rec))

    def _handle(self, rec: dict) -> HostHandle:
        return HostHandle(rec["name"], rec["ref"], rec["instance_type"], rec["launched_at"])

    # --- one tick -------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> Decision:
        """Observe, decide, act once; returns the decision (no change while another autoscaler leads)."""
        now = time.time() if now is None else now
        if not self.lead():
            return Decision(target=-1, delta=0, reason="another autoscaler leads", inputs={})
        cap = self.resources.capacity()
        registered = {h["name"]: h for h in cap["hosts"] if h["alive"]}
        managed = self.managed()
        self._reconcile(managed, registered, now)
        serving = [h for h in registered.values() if not h["drained"]]
        pending = [r for r in managed.values() if r["state"] == LAUNCHING]
        per_host = max([h["capacity"] for h in serving] or [self.settings.host_capacity])
        st = FleetState(
            queued=cap["queue"]["length"],
            oldest_wait_s=cap["queue"]["oldest_wait_s"],
            live=sum(h["used"] for h in registered.values()),
            hosts=len(serving),
            pending=len(pending),
            capacity_per_host=per_host,
            episode_s=self.cfg.episode_s,
        )
        decision = desired_hosts(st, self.cfg)
        for h in registered.values():
            if h["used"] or h["booting"]:
                self.idle_since.pop(h["name"], None)
            else:
                self.idle_since.setdefault(h["name"], now)
        if decision.target != self.last_target:
            usage.record_event(
                self.redis,
                self.keys,
                "target",
                now=now,
                target=decision.target,
                reason=decision.reason,
                **decision.inputs,
            )
            self.last_target = decision.target
        if decision.delta > 0 and now - self.last_up >= self.cfg.cooldown_s:
            self._scale_out(decision, managed, now)
        elif decision.delta < 0 and now - self.last_down >= self.cfg.cooldown_s:
            self._scale_in(decision, managed, registered, len(serving), now)
        self._remove_drained(self.managed(), registered, now)
        usage.sample(
            self.redis,
            self.keys,
            registered,
            self.provider,
            self.managed(),
            st,
            decision,
            now,
            keep=self.cfg.sample_keep,
        )
        return decision

    def _reconcile(self, managed: dict[str, dict], registered: dict[str, dict], now: float) -> None:
        for name, rec in managed.items():
            if rec["state"] == LAUNCHING and name in registered:
                rec.update(state=ACTIVE, joined_at=now)
                self._save(rec)
                usage.record_event(
                    self.redis, self.keys, "joined", now=now, host=name, boot_s=round(now - rec["launched_at"], 3)
                )
            elif rec["state"] == REMOVED and name not in registered:
                self.resources.drain_host(name, False)  # its registration is gone: forget the drain mark
                self.redis.hdel(self.keys.hosts, name)
                usage.archive_host(self.redis, self.keys, rec)
            elif rec["state"] in (LAUNCHING, ACTIVE) and not self._alive(rec):
                rec.update(state=REMOVED, stopped_at=now)
                self._save(rec)
                usage.record_event(self.redis, self.keys, "lost", now=now, host=name)

    def _alive(self, rec: dict) -> bool:
        try:
            return bool(self.provider.alive(self._handle(rec)))
        except Exception:
            log.exception("provider could not tell whether %s is alive", rec["name"])
            return True

    def _scale_out(self, d: Decision, managed: dict[str, dict], now: float) -> None:
        want = d.delta
        for rec in managed.values():  # a host being drained is the cheapest new host
            if want and rec["state"] == DRAINING:
                self.resources.drain_host(rec["name"], False)
                self.resources.request_admission()
                rec["state"] = ACTIVE
                self._save(rec)
                usage.record_event(self.redis, self.keys, "resume", now=now, host=rec["name"], reason=d.reason)
                want -= 1
        if want > 0:
            for h in self.provider.launch(want):
                self.resources.drain_host(h.name, False)  # a stale drain mark of a reused name must not stick
                self._save(
                    {
                        "name": h.name,
                        "ref": h.ref,
                        "instance_type": h.instance_type,
                        "launched_at": h.launched_at,
                        "state": LAUNCHING,
                        "reason": d.reason,
                    }
                )
                usage.record_event(
                    self.redis,
                    self.keys,
                    "launch",
                    now=now,
                    host=h.name,
                    ref=h.ref,
                    instance_type=h.instance_type,
                    reason=d.reason,
                    target=d.target,
                )
        self.last_up = now

    def _scale_in(
        self, d: Decision, managed: dict[str, dict], registered: dict[str, dict], serving: int, now: float
    ) -> None:
        n = min(-d.delta, serving - self.cfg.min_hosts)
        idle = [
            name
            for name, rec in managed.items()
            if rec["state"] == ACTIVE
            and name in registered
            and not registered[name]["drained"]
            and name in self.idle_since
            and now - self.idle_since[name] >= self.cfg.idle_s
        ]
        idle.sort(key=lambda name: -managed[name]["launched_at"])  # newest first
        for name in idle[: max(0, n)]:
            self.resources.drain_host(name, True)
            rec = managed[name]
            rec.update(state=DRAINING, drain_at=now)
            self._save(rec)
            usage.record_event(self.redis, self.keys, "drain", now=now, host=name, reason=d.reason, target=d.target)
            self.last_down = now

    def _remove_drained(self, managed: dict[str, dict], registered: dict[str, dict], now: float) -> None:
        """Terminate draining hosts that hold nothing: no live episode, no container being booted."""
        for name, rec in managed.items():
            if rec["state"] != DRAINING:
                continue
            h = next((x for x in self.resources.hosts() if x["name"] == name), None)
            if h is not None and (h["used"] or h["booting"] or not h["drained"]):
                continue
            self.provider.terminate(self._handle(rec))
            rec.update(state=REMOVED, stopped_at=now)
            self._save(rec)
            usage.record_event(
                self.redis,
                self.keys,
                "remove",
                now=now,
                host=name,
                host_hours=round((now - rec["launched_at"]) / 3600, 5),
            )

    # --- service loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Tick every ``interval_s`` until ``stop`` is set; a failing tick is logged and retried."""
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("autoscaler tick failed; retrying next period")
            stop.wait(self.cfg.interval_s)
        try:  # the hosts it launched keep running (a restarted control adopts them); the lease goes now
            self.resign()
        except Exception:
            log.warning("autoscaler %s could not give up its lease; it lapses by itself", self.owner)

    def close(self, *, stop_hosts: bool = False) -> None:
        """Release the provider; with ``stop_hosts`` also terminate every host it still runs."""
        if stop_hosts:
            for rec in self.managed().values():
                if rec["state"] != REMOVED:
                    self.provider.terminate(self._handle(rec))
        self.provider.close()
        try:
            self.resign()
        except Exception:  # Redis gone: the lease lapses by itself
            log.warning("autoscaler %s could not give up its lease; it lapses by itself", self.owner)


def autoscaler_threads(rt: Any, stop: threading.Event) -> list[threading.Thread]:
    """The control service's autoscaler thread, or none when ``settings.elastic`` is empty or disabled."""
    if not rt.settings.elastic:
        return []
    cfg = ElasticConfig.from_settings(rt.settings)
    if not cfg.enabled:
        return []
    scaler = Autoscaler(rt.redis, rt.settings, rt.resources, cfg=cfg)
    return [threading.Thread(target=scaler.run, args=(stop,), name="autoscaler", daemon=True)]
