"""Installed agents: a program started detached in the episode's container, its end advancing the episode."""

from __future__ import annotations

import uuid

import pytest

from megaflow import Client
from megaflow.agents import validate_agent_section
from megaflow.agents.base import NEXT_KINDS
from megaflow.agents.installed import WAIT, InstalledAgent, InstalledConfig, _fill, parse_status
from megaflow.core import states
from megaflow.core.errors import SpecError
from megaflow.core.spec import TaskSpec
from tests.helpers import wait_until

AGENT = "megaflow.agents.installed:InstalledAgent"


def spec(
    command: str,
    *,
    install: str = "",
    timeout_s: float = 120,
    eval_cmd: str = "grep -q fixed answer.txt",
    poll_s: float = 0.5,
):
    config = {"install": install, "command": command, "timeout_s": timeout_s, "poll_s": poll_s}
    section = {"type": AGENT, "config": config}
    return {
        "task_id": f"inst-{uuid.uuid4().hex[:6]}",
        "workdir": "/work",
        "problem_statement": "it's $(broken)",
        "agent": validate_agent_section(section),
        "eval": {"command": eval_cmd},
        "model": {"replies": ["(unused: an installed agent calls no model through MegaFlow yet)"]},
    }


def test_templates_are_filled_shell_quoted_and_sections_checked():
    task = TaskSpec.model_validate(
        {"task_id": "t", "workdir": "/w d", "problem_statement": "a'b $(x)", "eval": {"command": "true"}}
    )
    assert _fill("run {problem_statement} in {workdir} {unknown}", task) == "run 'a'\"'\"'b $(x)' in '/w d' {unknown}"
    assert parse_status("MF_STATUS exited 3\nout\n") == ("exited", 3, "out\n")
    assert parse_status("MF_STATUS running\n")[0] == "running"
    with pytest.raises(SpecError, match=r"config\.command"):
        validate_agent_section({"type": AGENT, "config": {"install": "x"}})
    assert InstalledAgent.validate_section({"type": AGENT, "config": {"command": "x"}})
    assert InstalledConfig(command="x").poll_s == 2.0


def test_installed_program_runs_detached_and_episode_succeeds(fleet):
    s = spec(
        "sleep 2; echo solving {problem_statement}; echo fixed > {workdir}/answer.txt",
        install="echo installing; mkdir -p /tmp/tool",
    )
    with Client(fleet) as client:
        sub = client.submit([s], user="installed")
        client.wait(sub.batch_id, timeout=180)
        (res,) = client.results(sub.batch_id)
        traj = client.trajectory(res["episode_id"])
    assert (res["state"], res["reward"]) == (states.SUCCEEDED, 1.0), res
    (exit_rec,) = [m for m in traj["messages"] if m.get("kind") == "installed_exit"]
    assert exit_rec["exit_code"] == 0 and "solving it's $(broken)" in exit_rec["output"]
    launch = next(m for m in traj["messages"] if m["role"] == "env")
    assert "installing" in launch["output"] and "agent started" in launch["output"]


def test_installed_program_past_its_time_out_is_killed(fleet):
    s = spec("sleep 600", timeout_s=2)
    with Client(fleet) as client:
        sub = client.submit([s], user="installed")
        client.wait(sub.batch_id, timeout=120)
        (res,) = client.results(sub.batch_id)
    assert (res["state"], res.get("cause")) == (states.TIMED_OUT, states.CAUSE_TIMEOUT), res


def test_cancel_ends_a_running_installed_agent(fleet):
    s = spec("sleep 600", timeout_s=600)
    with Client(fleet) as client:
        sub = client.submit([s], user="installed")
        wait_until(lambda: client.results(sub.batch_id)[0]["state"] == states.RUNNING, 120, "RUNNING", 0.2)
        client.cancel(sub.batch_id)
        client.wait(sub.batch_id, timeout=60)
        (res,) = client.results(sub.batch_id)
    assert res["state"] == states.CANCELLED, res


@pytest.mark.skipif(WAIT not in NEXT_KINDS, reason="the agent service offers no 'wait' decision yet (see the report)")
def test_no_worker_slot_is_held_while_the_program_runs(fleet):
    from megaflow.workers.celery_app import create_app

    s = spec("sleep 10; echo fixed > {workdir}/answer.txt", poll_s=2.0)  # mostly waiting for the countdown
    app = create_app(fleet)
    with Client(fleet) as client:
        sub = client.submit([s], user="installed")
        seen_waiting = 0

        def sample_until_terminal() -> bool:  # every sample while it runs is checked
            nonlocal seen_waiting
            (res,) = client.results(sub.batch_id)
            if res["state"] in states.TERMINAL:
                return True
            eid = res["episode_id"]
            pending = client.rt.redis.hget(client.rt.keys.episode(eid), "pending") or ""
            if "poll_s" in pending:  # waiting: the program runs, the env host polls it with a countdown
                insp = app.control.inspect(timeout=1.0)
                active = [t for ts in (insp.active() or {}).values() for t in ts if eid in str(t.get("args"))]
                assert all(t["name"] == "megaflow.env.watch" for t in active), active  # only a short check
                later = [t for ts in (insp.scheduled() or {}).values() for t in ts if eid in str(t["request"]["args"])]
                if later and not active:  # the poll waits for its countdown in memory: no pool slot is taken
                    seen_waiting += 1
            return False

        wait_until(sample_until_terminal, 180, "the episode to end", 0.3)
        (res,) = client.results(sub.batch_id)
    assert (res["state"], seen_waiting > 0) == (states.SUCCEEDED, True), res


def test_an_installed_agent_moved_to_a_new_attempt_starts_over(fleet):
    """A host judged lost mid-run (a heartbeat late on a loaded machine) re-queues the episode as a new
    attempt: its agent starts over in the new container instead of polling, until its deadline, for a
    program that never ran there (which ended such episodes TIMED_OUT)."""
    s = spec("sleep 3; echo fixed > {workdir}/answer.txt", timeout_s=45, poll_s=0.5)
    with Client(fleet) as client:
        rt = client.rt
        sub = client.submit([s], user="installed")
        (eid,) = rt.engine.batch_ids(sub.batch_id)

        def waiting():
            return "poll_s" in (rt.redis.hget(rt.keys.episode(eid), "pending") or "")

        wait_until(waiting, 120, "the first attempt's program runs and is polled")
        ep = rt.engine.load(eid, history=False)
        assert rt.resources.host_loss.retry(eid, ep.step, reason="test: host lost", host=ep.host) == 1
        rt.lifecycle.admit()
        client.wait(sub.batch_id, timeout=180)
        (res,) = client.results(sub.batch_id)
        traj = client.trajectory(eid)
    assert (res["state"], res["reward"], res["attempt"]) == (states.SUCCEEDED, 1.0, 2), res
    launches = [m for m in traj["messages"] if m["role"] == "env" and "agent started" in str(m.get("output"))]
    assert len(launches) == 1, traj["messages"]  # the second attempt installed and started its own program


# a setsid that is slow to get going, as a forked child is on a loaded machine: it sleeps in the
# start's process group first, then execs the real setsid
SLOW_SETSID = r"""mkdir -p /tmp/slowbin
printf '#!/bin/sh\nsleep 2\nexec %s "$@"\n' "$(command -v setsid)" > /tmp/slowbin/setsid
chmod +x /tmp/slowbin/setsid
export PATH=/tmp/slowbin:$PATH"""


def test_a_program_slow_to_detach_survives_the_end_of_its_start(fleet):
    """The exec that starts the program kills its process group when the start script ends: the start
    waits until the program is in its own session (before, it was killed and the episode waited for
    its end until TIMED_OUT)."""
    s = spec("echo fixed > {workdir}/answer.txt", install=SLOW_SETSID, timeout_s=40)
    with Client(fleet) as client:
        sub = client.submit([s], user="installed")
        client.wait(sub.batch_id, timeout=180)
        (res,) = client.results(sub.batch_id)
    assert (res["state"], res["reward"]) == (states.SUCCEEDED, 1.0), res
