"""Inline agent decisions (``agent_inline``): the same episodes, fewer tasks.

With the setting on, an agent that declares ``inline = True`` decides in the provision, model or
exec step it reacts to, and its decision goes into that step's advance. The episodes must come out
exactly as with every decision an agent-service task (states, rewards, trajectories, phases),
and whatever the inline path cannot do in one advance (cancel, ending on a limit, an agent that
raises) must still be handled by the agent service.
"""

from __future__ import annotations

from typing import Any

from megaflow.core import states, wire
from megaflow.core.spec import validate_specs
from megaflow.demo_tasks import demo_specs
from megaflow.records import event_documents
from megaflow.services.local import LocalRunner
from megaflow.services.root import Root

HOSTS = ("in-1", "in-2")


def run_batch(settings, specs: list[dict[str, Any]], *, inline: bool, before_run=None) -> dict[str, Any]:
    s = settings.model_copy(
        update={"agent_inline": inline, "env_backend": {"type": "sim", "preset": "demo"}, "host_capacity": 4}
    )
    root = Root(s, role="client")
    env_roots = {h: Root(s, role="env", host=h) for h in HOSTS}
    runner = LocalRunner(root, env_roots)
    runner.register_hosts()
    try:
        batch, ids = root.engine.create_batch(validate_specs(specs), "alice")
        root.resources.enqueue([{"episode_id": e, "user": "alice", "image": s.default_image} for e in ids])
        root.lifecycle.admit()
        if before_run is not None:
            before_run(runner, ids)
        results = runner.run_until_done(batch, timeout_s=90)
        episodes = [root.engine.load(e) for e in ids]
        return {
            "results": results,
            "handled": dict(runner.handled),
            "trajectories": [[_plain(rec) for rec in ep.history] for ep in episodes],
            "phases": [sorted(ep.phase_times()) for ep in episodes],
            "counters": [{k: ep.num(k) for k in ("model_calls", "prompt_tokens", "format_errors")} for ep in episodes],
            "used": root.resources.capacity()["global"]["used"],
        }
    finally:
        for r in env_roots.values():
            r.env_host.shutdown()


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """A history record without what differs between two runs (times, ids, durations, step numbers: an
    inline decision takes no step of its own)."""
    return {k: v for k, v in record.items() if k not in ("t", "step", "duration_s", "latency_s", "id", "created")}


def _outcome(r: dict[str, Any]) -> tuple:
    return (r["state"], r["reward"], r["cause"], r["steps"])


def test_inline_decisions_give_the_same_episodes_with_half_the_tasks(settings):
    specs = demo_specs("fix", grading="exit_code")[:2] + demo_specs("noop", grading="exit_code")[:1]
    off = run_batch(settings, specs, inline=False)
    on = run_batch(settings, specs, inline=True)
    assert [r["state"] for r in on["results"]] == [states.SUCCEEDED, states.SUCCEEDED, states.FAILED]
    assert [_outcome(r) for r in on["results"]] == [_outcome(r) for r in off["results"]]
    for a, b in zip(on["trajectories"], off["trajectories"]):
        assert len(a) == len(b)
        for i, (ra, rb) in enumerate(zip(a, b)):
            assert ra == rb, (i, ra, rb)
    assert on["phases"] == off["phases"]  # step_N and evaluating stamped even when one advance passes both
    assert on["counters"] == off["counters"]
    assert on["used"] == off["used"] == 0
    # every decision went into the step before it: no agent-service task at all
    assert off["handled"].get(wire.AGENT_STEP, 0) > 0
    assert on["handled"].get(wire.AGENT_STEP, 0) == 0, on["handled"]
    assert sum(on["handled"].values()) <= 0.6 * sum(off["handled"].values()), (on["handled"], off["handled"])
    for name in (wire.MODEL_COMPLETE, wire.ENV_EXEC, wire.ENV_EVALUATE, wire.ENV_PROVISION):
        assert on["handled"].get(name) == off["handled"].get(name), name


def test_an_ending_decision_goes_to_the_agent_service(settings):
    # a step limit of 1: after its first command the agent ends the episode (agent_limit)
    specs = demo_specs("fix", grading="exit_code")[:1]
    specs[0]["agent"] = {**specs[0].get("agent", {}), "max_steps": 1}
    off = run_batch(settings, specs, inline=False)
    on = run_batch(settings, specs, inline=True)
    assert [_outcome(r) for r in on["results"]] == [_outcome(r) for r in off["results"]]
    assert on["results"][0]["state"] == states.FAILED
    assert on["trajectories"] == off["trajectories"]
    assert on["handled"].get(wire.AGENT_STEP) == 1, on["handled"]  # only the ending decision


def test_a_cancel_is_taken_by_the_agent_service(settings):
    def cancel_first(runner: LocalRunner, ids: list[str]) -> None:
        for _ in range(3):  # provision, then the first model step (its decision sees the cancel)
            runner.run_one(timeout_s=5)
        assert runner.root.lifecycle.cancel(ids[0])

    on = run_batch(settings, demo_specs("fix", grading="exit_code")[:1], inline=True, before_run=cancel_first)
    assert on["results"][0]["state"] == states.CANCELLED
    assert on["used"] == 0


def test_an_agent_that_raises_inline_is_ended_by_the_agent_service(settings, monkeypatch):
    from megaflow.agents.bash import BashAgent

    def boom(self, ctx):
        raise RuntimeError("agent bug")

    monkeypatch.setattr(BashAgent, "decide", boom)
    on = run_batch(settings, demo_specs("fix", grading="exit_code")[:1], inline=True)
    [result] = on["results"]
    assert result["state"] == states.FAILED and result["cause"] == states.CAUSE_INTERNAL
    assert "agent bug" in result["error"]
    assert on["handled"].get(wire.AGENT_STEP) == 1
    assert on["used"] == 0


def test_agents_that_do_not_declare_inline_keep_their_own_tasks(settings, monkeypatch):
    from megaflow.agents.bash import BashAgent

    monkeypatch.setattr(BashAgent, "inline", False)
    on = run_batch(settings, demo_specs("fix", grading="exit_code")[:1], inline=True)
    assert on["results"][0]["state"] == states.SUCCEEDED
    assert on["handled"].get(wire.AGENT_STEP, 0) >= 3


def test_a_record_of_an_advance_that_passed_two_phases_keeps_both():
    ev = {"episode_id": "e1", "state": states.EVALUATING, "phase": "evaluating", "also_phases": ["step_4"]}
    _event, doc = event_documents("1-0", {"e": wire.dumps(ev), "ts": "12.5", "step": "9"})
    assert doc["phases"] == {"step_4": 12.5, "evaluating": 12.5}
