"""The control service: recorder, safety sweep and episode guard in one small process.

``megaflow control`` runs it; ``megaflow up`` starts one per fleet. Admission itself is event
driven (submit, release, host joining); the sweep only repairs what a crash left behind.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from megaflow.services import lifecycle
from megaflow.core import states
from megaflow.elastic.autoscaler import autoscaler_threads
from megaflow.records import Recorder
from megaflow.services.root import Root

log = logging.getLogger(__name__)


def sweep_episodes(rt: Root, *, now: float | None = None) -> dict[str, int]:
    """Time out episodes past the guard; re-send the next task of episodes stuck past redelivery."""
    now = now or time.time()
    fixed = {"timed_out": 0, "resent": 0}
    stuck_before = now - (rt.settings.visibility_timeout_s + 60)
    for eid, last in rt.redis.zrange(rt.keys.live, 0, -1, withscores=True):
        try:
            ep = rt.engine.load(eid, history=False)
        except Exception:
            rt.redis.zrem(rt.keys.live, eid)
            continue
        if ep.terminal:
            rt.redis.zrem(rt.keys.live, eid)
            continue
        admitted = float(ep.fields.get("t:admitted") or ep.fields.get("created_at") or now)
        if now - admitted > rt.settings.episode_guard_s:
            if lifecycle.finish(rt, ep, states.TIMED_OUT, cause=states.CAUSE_TIMEOUT,
                                error=f"episode guard of {rt.settings.episode_guard_s:.0f}s passed"):
                fixed["timed_out"] += 1
        elif last < stuck_before and ep.fields.get("next"):
            nxt = json.loads(ep.fields["next"])
            rt.dispatcher.send(nxt["name"], [eid, ep.step], nxt["queue"])
            fixed["resent"] += 1
    return fixed


class Control:
    """Runs the recorder and the sweep until stopped."""

    def __init__(self, rt: Root):
        self.rt = rt
        self.stop = threading.Event()

    def sweep_loop(self) -> None:
        while not self.stop.is_set():
            try:
                fixed = self.rt.resources.sweep()
                fixed.update(sweep_episodes(self.rt))
                lifecycle.admit(self.rt)
                if any(fixed.values()):
                    log.info("sweep repaired %s", fixed)
            except Exception:
                log.exception("sweep failed; retrying next period")
            # a quota change or an undrained host asks for admission: run it then, not a period later
            deadline = time.monotonic() + self.rt.settings.sweep_interval_s
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    if self.rt.resources.wait_for_admission_request(min(1.0, self.rt.settings.sweep_interval_s)):
                        lifecycle.admit(self.rt)
                except Exception:
                    log.exception("admission on request failed")
                    self.stop.wait(1.0)

    def run(self) -> None:
        from megaflow.monitoring.metrics import start_for_service

        recorder = Recorder(self.rt.redis, self.rt.keys, self.rt.metadata)
        threads = [threading.Thread(target=recorder.run, args=(self.stop,), name="recorder", daemon=True),
                   threading.Thread(target=self.sweep_loop, name="sweep", daemon=True)]
        threads += autoscaler_threads(self.rt, self.stop)  # settings.elastic: size the env fleet from the backlog
        for t in threads:
            t.start()
        metrics = start_for_service(self.rt.settings)
        try:
            while not self.stop.is_set():
                self.rt.redis.set(self.rt.keys.worker_health("control", "control"),
                                  json.dumps({"ts": time.time()}), ex=30)
                self.stop.wait(5)
        finally:
            self.stop.set()
            if metrics is not None:
                metrics.close()
            for t in threads:
                t.join(5)
