"""A whole fleet on the ``sim`` env backend: the demo batch comes out the same with no Docker engine."""

from __future__ import annotations

import pytest
import redis
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


def test_demo_batch_with_inline_agent_decisions(settings, monkeypatch, tmp_path):
    """The same demo on real Celery workers with MEGAFLOW_AGENT_INLINE: no decision goes through the agent queue."""
    from megaflow.services.root import Root

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    s = settings.model_copy(
        update={"env_backend": {"type": "sim", "preset": "demo"}, "metrics_port": 0, "agent_inline": True}
    )
    evals_before = _eval_calls(redis.Redis.from_url(s.redis_url))
    console = Console(file=open(tmp_path / "demo.txt", "w"), width=120)
    assert run_demo(s, console=console, env_hosts=2, timeout_s=120)
    console.file.close()
    out = (tmp_path / "demo.txt").read_text()
    assert "all SUCCEEDED: yes" in out and "all FAILED: yes" in out, out
    evals = _eval_calls(redis.Redis.from_url(s.redis_url)) - evals_before
    # every episode's steps: provision, model and exec steps, evaluation; no agent step in between
    root = Root(s, role="client")
    ids = [e for b in root.redis.zrange(root.keys.batches, 0, -1) for e in root.engine.batch_ids(b)]
    assert ids
    for eid in ids:
        ep = root.engine.load(eid)
        calls = int(ep.num("model_calls"))
        execs = sum(1 for h in ep.history if h.get("role") == "env" and h.get("kind") == "exec")
        # one step each for provision, every model call and command, and the evaluation (its record
        # and the end are one advance); with an agent step after each of them, about twice that
        assert calls >= 1 and ep.step == calls + execs + 2, (eid, ep.step, calls, execs)
    # each step's delivery was recorded as unacknowledged by its first read of the episode and
    # acknowledged by the script that advanced it (megaflow.engine.delivery): no EVAL of kombu's
    # bookkeeping is left per step (stock: two per step, append and ack; 2 x steps)
    steps = sum(root.engine.load(eid).step for eid in ids)
    assert steps > 0 and evals < 0.25 * steps, (evals, steps)


def _eval_calls(r) -> int:
    """Plain EVAL commands Redis ran so far (kombu's unacked bookkeeping; MegaFlow's engine uses EVALSHA)."""
    return int(r.info("commandstats").get("cmdstat_eval", {}).get("calls", 0))
