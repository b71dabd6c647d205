"""An installed agent that is a real program from the package index: mini-swe-agent's CLI (``mini``).

It is installed into a sandbox image derived at build time on the host (containers have no network;
the image is built once and cached like the others), runs detached in a real no-network container,
and reaches the scripted model only through the per-episode gateway: the loopback relay in the
container forwards to the env host's Unix socket mounted at /run/megaflow.
"""

from __future__ import annotations

import time
import uuid

import pytest

from megaflow import Client
from megaflow.agents import validate_agent_section
from megaflow.core import states
from tests.conftest import IN_CI

pytestmark = pytest.mark.mini

MINI = "mini-swe-agent==2.4.6"  # the version requirements-dev.txt pins
MINI_IMAGE = "megaflow-sandbox-mini:2.4.6"
SUBMIT = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"

# mini's own CLI, non-interactive (yolo, no confirmation at the end), its text-based model class with
# its shipped text config (a THOUGHT and exactly one ```mswea_bash_command block per reply), the
# model behind OPENAI_BASE_URL / OPENAI_API_KEY (litellm's openai provider), cost tracking off (the
# scripted model has no price).
MINI_COMMAND = (
    "mini -y --exit-immediately --model-class litellm_textbased -m openai/scripted -c mini_textbased.yaml "
    '-c model.cost_tracking=ignore_errors -c "model.model_kwargs.api_base=$OPENAI_BASE_URL" '
    "-c environment.timeout=600 -c environment.cwd={workdir} -t {problem_statement} "
    "-o /tmp/.megaflow-installed/mini.traj.json"
)
MINI_ENV = {"MSWEA_CONFIGURED": "true", "MSWEA_SILENT_STARTUP": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


@pytest.fixture(scope="session")
def mini_image(docker_client, sandbox_image) -> str:
    """The sandbox image with mini-swe-agent installed (built once from the package index, then cached)."""
    from megaflow.core.errors import InfraError
    from megaflow.env_hosts.images import ensure_pip_image

    try:
        return ensure_pip_image(docker_client, sandbox_image, MINI_IMAGE, [MINI], progress=lambda m: None)
    except InfraError as exc:
        if IN_CI:
            raise
        pytest.skip(f"could not build {MINI_IMAGE} (needs the package index once): {exc}")


def reply(thought: str, command: str) -> str:
    """One reply in the format mini's text-based model class parses (minisweagent/config/mini_textbased.yaml)."""
    return f"THOUGHT: {thought}\n\n```mswea_bash_command\n{command}\n```"


def mini_spec(image: str, replies: list[str], timeout_s: float = 900) -> dict:
    section = {
        "type": "installed",
        "config": {"command": MINI_COMMAND, "env": MINI_ENV, "gateway": True, "poll_s": 0.5, "timeout_s": timeout_s},
    }
    return {
        "task_id": f"mini-{uuid.uuid4().hex[:6]}",
        "image": image,
        "workdir": "/work",
        "files": {"/work/calc.py": "def add(a, b):\n    return a - b\n"},
        "problem_statement": "add() in calc.py subtracts; make it add.",
        "agent": validate_agent_section(section),
        "eval": {"command": "python3 -c 'import calc; assert calc.add(2, 3) == 5'"},
        "model": {"replies": replies},
    }


def test_mini_swe_agent_cli_solves_a_task_through_the_gateway(fleet, mini_image):
    from megaflow.workers.celery_app import create_app

    replies = [
        reply("Let me look at the code first; slowly.", "sleep 3 && cat calc.py"),
        reply(
            "The operator is wrong: fix it.",
            "sed -i 's/a - b/a + b/' calc.py && python3 -c 'import calc; print(calc.add(2, 3))'",
        ),
        reply("Fixed and checked; submit.", SUBMIT),
    ]
    app = create_app(fleet)
    with Client(fleet) as client:
        sub = client.submit([mini_spec(mini_image, replies)], user="mini-cli")
        seen_waiting, deadline = 0, time.monotonic() + 400
        while time.monotonic() < deadline:  # while mini runs, the env host polls it; no pool slot is held
            (res,) = client.results(sub.batch_id)
            if res["state"] in states.TERMINAL:
                break
            eid = res["episode_id"]
            if "poll_s" in (client.rt.redis.hget(client.rt.keys.episode(eid), "pending") or ""):
                insp = app.control.inspect(timeout=1.0)
                active = [t for ts in (insp.active() or {}).values() for t in ts if eid in str(t.get("args"))]
                assert all(t["name"] == "megaflow.env.watch" for t in active), active
                seen_waiting += not active
            time.sleep(0.3)
        client.wait(sub.batch_id, timeout=180)
        (res,) = client.results(sub.batch_id)
        traj = client.trajectory(res["episode_id"])
    exits = [m for m in traj["messages"] if m.get("kind") == "installed_exit"]
    assert (res["state"], res["reward"]) == (states.SUCCEEDED, 1.0), (res, exits)
    assert exits and exits[0]["exit_code"] == 0, exits
    calls = [m for m in traj["messages"] if m.get("kind") == "model_call"]
    assert [c["reply"]["content"] for c in calls] == replies  # every call mini made, in order, whole
    system = calls[0]["request"]["messages"][0]
    assert system["role"] == "system" and "exactly ONE bash code block" in system["content"]  # mini's own prompt
    assert "<returncode>0</returncode>" in calls[2]["request"]["messages"][-1]["content"]  # it ran the fix: 5
    assert "5" in calls[2]["request"]["messages"][-1]["content"]
    assert seen_waiting > 0  # sampled while mini ran: no task of the episode held a slot


def test_cancel_ends_a_running_mini(fleet, mini_image, docker_client):
    from megaflow.env_hosts import labels as L

    replies = [reply("Wait for a long time.", "sleep 600"), reply("never reached", SUBMIT)]
    with Client(fleet) as client:
        sub = client.submit([mini_spec(mini_image, replies, timeout_s=1200)], user="mini-cli")
        deadline = time.monotonic() + 300
        while True:  # mini has made its first call (it now runs `sleep 600`)
            (res,) = client.results(sub.batch_id)
            eid = res["episode_id"]
            if eid and client.rt.redis.llen(client.rt.keys.gateway_log(eid)) >= 1:
                break
            assert res["state"] not in states.TERMINAL and time.monotonic() < deadline, res
            time.sleep(0.3)
        client.cancel(sub.batch_id)
        client.wait(sub.batch_id, timeout=180)
        (res,) = client.results(sub.batch_id)
    assert res["state"] == states.CANCELLED, res
    deadline = time.monotonic() + 180
    while docker_client.containers.list(all=True, filters={"label": f"{L.EPISODE}={eid}"}, ignore_removed=True):
        assert time.monotonic() < deadline, "the cancelled episode's container (and mini in it) is still there"
        time.sleep(0.5)
