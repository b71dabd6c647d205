"""Helpers shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout_s: float, what: str | Callable[[], str], interval_s: float = 0.1) -> T:
    """Poll ``cond()`` until it returns something truthy and return that; fail naming ``what`` after ``timeout_s``.

    ``what`` may be a callable, called only on failure (a message with the state seen last). The
    condition is checked once more at the deadline, so a slow (loaded) machine that gets there just in
    time still passes. Use generous timeouts: they cost nothing when the condition comes early.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            value = cond()
            if value:
                return value
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what() if callable(what) else what}")
        time.sleep(interval_s)


LAPSE_MARGIN_S = 0.2  # past a lease's end by this much: Redis judges it lapsed


def let_lapse(seconds: float) -> None:
    """Let a lease, TTL or deadline of ``seconds`` (started now or earlier) run out: a deliberate wait.

    A sleep never ends early, so the lapse is certain and a loaded machine only makes it later. Use it
    only where the state cannot be polled without renewing what should lapse; else use wait_until.
    """
    time.sleep(seconds + LAPSE_MARGIN_S)


def run_cli(settings, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m megaflow ARGS`` with ``settings`` in its environment; fail loudly if asked."""
    env = dict(os.environ, **settings.to_env(), COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "megaflow", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"megaflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
