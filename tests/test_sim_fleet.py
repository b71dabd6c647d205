"""A whole fleet on the ``sim`` env backend: the demo batch comes out the same with no Docker engine."""

from __future__ import annotations

import pytest
from rich.console import Console

from megaflow.demo import run_demo

pytestmark = pytest.mark.fleet


def test_demo_batch_on_sim_without_docker(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")  # any Docker use would fail
    s = settings.model_copy(update={"env_backend": {"type": "sim", "preset": "demo"}, "metrics_port": 0})
    console = Console(file=open(tmp_path / "demo.txt", "w"), width=120)
    assert run_demo(s, console=console, env_hosts=2, timeout_s=120)
    console.file.close()
    out = (tmp_path / "demo.txt").read_text()
    assert "all SUCCEEDED: yes" in out and "all FAILED: yes" in out, out
