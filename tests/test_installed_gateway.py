"""The per-episode OpenAI-compatible gateway: the key names the episode, calls are recorded, keys are scoped."""

from __future__ import annotations

import pytest

from megaflow import Client
from megaflow.sandbox.gateway_http import GatewayHTTPServer
from megaflow.services.episode_gateway import EpisodeGateway, GatewayAuthError
from megaflow.services.root import Root
from tests.helpers import wait_until


def _episode(client: Client, replies: list) -> str:
    spec = {"task_id": "gw", "workdir": "/work", "eval": {"command": "true"}, "model": {"replies": replies}}
    sub = client.submit([spec], user="gw-user")
    (res,) = client.results(sub.batch_id)
    return res["episode_id"]


def test_openai_client_through_the_gateway_is_recorded_and_scoped(settings):
    """Each call goes through the model queue: a consumer of it (the LocalRunner: the model service's
    real code, only Celery left out) answers from the episode's own scripted backend."""
    import threading

    from megaflow.services.local import LocalRunner

    openai = pytest.importorskip("openai")
    root = Root(settings, role="client")
    gw = EpisodeGateway(root)
    server = GatewayHTTPServer(gw).start()
    stop = threading.Event()
    runner = LocalRunner(Root(settings, role="model"), {})

    def model_worker() -> None:
        while not stop.is_set():
            runner.run_one(0.2)

    threading.Thread(target=model_worker, daemon=True).start()
    try:
        with Client(settings) as client:
            a = _episode(
                client,
                [
                    "first answer",
                    {
                        "content": "",
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "ls"}'}}
                        ],
                    },
                ],
            )
            b = _episode(client, ["b's answer"])
        key_a, key_b = gw.issue_key(a), gw.issue_key(b)
        oa = openai.OpenAI(base_url=server.url, api_key=key_a, max_retries=0)
        r1 = oa.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
        assert r1.choices[0].message.content == "first answer"
        tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object"}}}]
        r2 = oa.chat.completions.create(model="any", messages=[{"role": "user", "content": "go"}], tools=tools)
        assert r2.choices[0].message.tool_calls[0].function.name == "bash"
        ob = openai.OpenAI(base_url=server.url, api_key=key_b, max_retries=0)
        assert (
            ob.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
            .choices[0]
            .message.content
            == "b's answer"
        )  # b's own script: its key reaches only episode b
        log_a = gw.drain(a)
        assert [r["call"] for r in log_a] == [1, 2]
        assert log_a[1]["request"]["tools"] == tools and log_a[1]["reply"]["tool_calls"][0]["id"] == "c1"
        assert [r["reply"]["content"] for r in gw.drain(b)] == ["b's answer"]
        root.redis.hset(root.keys.episode(a), "state", "SUCCEEDED")  # a finished episode's key stops working
        with pytest.raises(openai.AuthenticationError):
            oa.chat.completions.create(model="any", messages=[{"role": "user", "content": "again"}])
        with pytest.raises(GatewayAuthError):
            gw.complete("mf-not-a-key", {"messages": []})
        assert runner.handled.get("megaflow.model.gateway_call") == 3  # every call was a model-queue task
    finally:
        stop.set()
        server.stop()
        root.close()


@pytest.mark.skipif(
    "wait" not in __import__("megaflow.agents.base").agents.base.NEXT_KINDS,
    reason="the agent service offers no 'wait' decision yet (see the report)",
)
def test_gateway_calls_of_a_running_installed_agent_land_in_its_trajectory(fleet):

    from megaflow.agents import validate_agent_section
    from megaflow.core import states

    section = {
        "type": "megaflow.agents.installed:InstalledAgent",
        "config": {"command": "while [ ! -f /tmp/go ]; do sleep 0.2; done", "poll_s": 0.5},
    }
    spec = {
        "task_id": "gw-inst",
        "workdir": "/work",
        "eval": {"command": "true"},
        "agent": validate_agent_section(section),
        "model": {"replies": ["from the gateway"]},
    }
    root = Root(fleet, role="client")
    gw = EpisodeGateway(root)
    try:
        with Client(fleet) as client:
            sub = client.submit([spec], user="gw-inst")
            (res,) = client.results(sub.batch_id)
            eid = res["episode_id"]
            wait_until(
                lambda: "poll_s" in (root.redis.hget(root.keys.episode(eid), "pending") or ""),
                60,
                "the installed agent to start",
                0.2,
            )
            key = gw.issue_key(eid)  # the program's OPENAI_API_KEY; here the test makes its call
            reply = gw.complete(key, {"model": "m", "messages": [{"role": "user", "content": "q"}]})
            assert reply["choices"][0]["message"]["content"] == "from the gateway"
            handle = root.engine.load(eid, history=False).container
            root.env_host.execute(handle, "touch /tmp/go", timeout=30)
            client.wait(sub.batch_id, timeout=120)
            (res,) = client.results(sub.batch_id)
            traj = client.trajectory(eid)
        assert res["state"] == states.SUCCEEDED, res
        calls = [m for m in traj["messages"] if m.get("kind") == "model_call"]
        assert [c["reply"]["content"] for c in calls] == ["from the gateway"]
        with pytest.raises(GatewayAuthError):
            gw.complete(key, {"messages": []})  # finished: its key stops working
    finally:
        root.close()


@pytest.mark.skipif(
    "wait" not in __import__("megaflow.agents.base").agents.base.NEXT_KINDS,
    reason="the agent service offers no 'wait' decision yet (see the report)",
)
def test_the_env_host_starts_the_program_with_a_key_naming_its_episode(fleet):
    from megaflow.agents import validate_agent_section
    from megaflow.core import states

    section = {
        "type": "megaflow.agents.installed:InstalledAgent",
        "config": {
            "gateway": True,
            "poll_s": 0.5,
            "command": 'printf "%s\\n%s\\n" "$OPENAI_API_KEY" "$OPENAI_BASE_URL" > {workdir}/key',
        },
    }
    spec = {
        "task_id": "gw-key",
        "workdir": "/work",
        "agent": validate_agent_section(section),
        "eval": {"command": "head -1 key | grep -q '^mf-' && sed -n 2p key | grep -qx 'http://127.0.0.1:8881/v1'"},
        "model": {"replies": ["unused"]},
    }
    with Client(fleet) as client:
        sub = client.submit([spec], user="gw-key")
        client.wait(sub.batch_id, timeout=120)
        (res,) = client.results(sub.batch_id)
    assert (res["state"], res["reward"]) == (states.SUCCEEDED, 1.0), res


# A program in the no-network container: one chat completion through OPENAI_BASE_URL (the loopback relay
# to the env host's gateway socket), its answer written to a file; and proof that nothing else is reachable.
CALL_THROUGH_RELAY = r"""
import json, os, socket, urllib.request
req = urllib.request.Request(
    os.environ["OPENAI_BASE_URL"] + "/chat/completions",
    data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}]}).encode(),
    headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"], "Content-Type": "application/json"},
)
answer = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["message"]["content"]
try:
    socket.create_connection(("1.1.1.1", 53), timeout=5)
    net = "open"
except OSError:
    net = "none"
open("answer.txt", "w").write(answer + "\n" + net + "\n")
"""


@pytest.mark.skipif(
    "wait" not in __import__("megaflow.agents.base").agents.base.NEXT_KINDS,
    reason="the agent service offers no 'wait' decision yet (see the report)",
)
def test_a_program_in_a_no_network_container_reaches_the_gateway_through_the_relay(fleet):
    from megaflow.agents import validate_agent_section
    from megaflow.core import states

    section = {
        "type": "megaflow.agents.installed:InstalledAgent",
        "config": {"gateway": True, "poll_s": 0.5, "command": "python3 {workdir}/call.py"},
    }
    spec = {
        "task_id": "gw-relay",
        "workdir": "/work",
        "files": {"/work/call.py": CALL_THROUGH_RELAY},
        "agent": validate_agent_section(section),
        "eval": {
            "command": "sed -n 1p answer.txt | grep -qx 'through the relay' && sed -n 2p answer.txt | grep -qx none"
        },
        "model": {"replies": ["through the relay"]},
    }
    with Client(fleet) as client:
        sub = client.submit([spec], user="gw-relay")
        client.wait(sub.batch_id, timeout=120)
        (res,) = client.results(sub.batch_id)
        traj = client.trajectory(res["episode_id"])
    assert (res["state"], res["reward"]) == (states.SUCCEEDED, 1.0), (res, traj["messages"][-3:])
    calls = [m for m in traj["messages"] if m.get("kind") == "model_call"]
    assert [c["reply"]["content"] for c in calls] == ["through the relay"]
    assert calls[0]["request"]["messages"] == [{"role": "user", "content": "q"}]


def test_socket_directory_per_host_can_be_turned_off_and_relay_only_for_loopback(tmp_path):
    from megaflow.core.settings import Settings
    from megaflow.env_hosts.gateway_socket import CONTAINER_DIR, binds, host_socket, relay_port

    s = Settings.load(state_dir=str(tmp_path / "st"))
    assert host_socket(s, "h/1") == str(tmp_path / "st" / "gateway" / "h-1" / "gateway.sock")
    assert binds(s, "h1") == {str(tmp_path / "st" / "gateway" / "h1"): {"bind": CONTAINER_DIR, "mode": "ro"}}
    assert (tmp_path / "st" / "gateway" / "h1").is_dir()  # made here, never by Docker as root
    assert binds(Settings.load(gateway_socket_dir="off"), "h1") is None
    assert relay_port("http://127.0.0.1:8881/v1") == 8881 and relay_port("http://localhost/v1") == 80
    assert relay_port("https://api.example.com/v1") is None and relay_port("http://10.0.0.2:8000/v1") is None
