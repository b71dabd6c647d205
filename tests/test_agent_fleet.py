"""mini-swe-agent's own agent, stepped, on the real fleet: Celery workers, a container, the scripted model.

Needs the services' side of the agent contract (megaflow.agents.conversation, megaflow.agents.base):
the env step records a command's raw result (role ``env``) and honours ``pending`` timeout /
workdir / env; the model step sends ``build_request(history, agent_request)``.
"""

from __future__ import annotations

import pytest

from megaflow import Client
from megaflow.agents import validate_agent_section
from megaflow.agents.mini import load_mini_config
from megaflow.core import states
from megaflow.demo_tasks import instances, task_spec

pytestmark = [pytest.mark.usefixtures("fleet"), pytest.mark.mini]


def test_mini_textbased_config_resolves_a_task(fleet):
    inst = instances()[0]
    section = load_mini_config("mini_textbased").agent
    section["config"]["model"].update(
        model_class="litellm_textbased", model_name="openai/scripted", cost_tracking="ignore_errors"
    )
    section["config"]["environment"] = {"env": {"PAGER": "cat"}, "timeout": 20}
    spec = task_spec(
        inst,
        replies=[
            f"THOUGHT: fix it\n```mswea_bash_command\ngit apply <<'EOF'\n{inst['patch']}EOF\n```",
            "THOUGHT: done\n```mswea_bash_command\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && git diff\n```",
        ],
    )
    spec["agent"] = validate_agent_section(section)
    with Client(fleet) as client:
        sub = client.submit([spec], user="mini-fleet")
        client.wait(sub.batch_id, timeout=180)
        (res,) = client.results(sub.batch_id)
        traj = client.trajectory(res["episode_id"])
    assert (res["state"], res["reward"]) == (states.SUCCEEDED, 1.0), res
    kinds = [(m["role"], m.get("kind")) for m in traj["messages"]]
    assert kinds == [
        ("note", "config_notes"),
        ("system", "prompt"),
        ("user", "prompt"),
        ("assistant", None),
        ("env", "exec"),
        ("user", "observation"),
        ("assistant", None),
        ("env", "exec"),
        ("exit", "exit"),
        ("evaluation", None),
    ]
    assert traj["messages"][-2]["extra"]["submission"].startswith("diff --git a/calc.py")
