"""Helpers shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(settings, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m megaflow ARGS`` with ``settings`` in its environment; fail loudly if asked."""
    env = dict(os.environ, **settings.to_env(), COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "megaflow", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"megaflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
