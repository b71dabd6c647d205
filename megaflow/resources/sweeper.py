"""The safety sweep as a small service: ``sweep()`` every ``sweep_interval_s``, admission on request.

Run it in its own process or in a worker thread (``megaflow up`` does one of these). Several
sweepers at once are harmless: every repair step is an atomic script that re-checks its condition.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


def run_sweeper(
    settings: Any,
    stop_event: threading.Event,
    admit: Optional[Callable[[], Any]] = None,
    *,
    redis_client: Any = None,
) -> None:
    """Sweep every ``settings.sweep_interval_s`` until ``stop_event`` is set.

    ``admit`` (for instance ``lambda: lifecycle.admit(runtime)``, which also sends each admitted
    episode's first task) runs after every sweep and whenever ``request_admission()`` was called,
    so capacity freed by a lapsed lease, a quota raise or an undrained host is used without
    waiting for the next submit or release. Without it the sweeper only repairs.
    """
    import redis

    from megaflow.keys import Keys
    from megaflow.resources.manager import ResourceManager

    client = redis_client or redis.Redis.from_url(settings.redis_url, decode_responses=True)
    mgr = ResourceManager(client, settings, Keys(settings.key_prefix))
    next_sweep = 0.0
    try:
        while not stop_event.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    fixed = mgr.sweep()
                    if any(fixed.values()):
                        log.info("resource sweep repaired %s", fixed)
                    next_sweep = time.monotonic() + settings.sweep_interval_s
                    _admit(admit)
                wait = max(0.05, min(1.0, next_sweep - time.monotonic()))
                if mgr.wait_for_admission_request(wait):
                    _admit(admit)
            except redis.ConnectionError as exc:
                log.warning("resource sweep: Redis unreachable (%s); retrying", exc)
                stop_event.wait(min(5.0, settings.sweep_interval_s))
            except Exception:
                log.exception("resource sweep failed; retrying next period")
                stop_event.wait(min(5.0, settings.sweep_interval_s))
    finally:
        if redis_client is None:
            client.close()


def _admit(admit: Optional[Callable[[], Any]]) -> None:
    if admit is None:
        return
    try:
        admit()
    except Exception:
        log.exception("admission from the sweeper failed")
