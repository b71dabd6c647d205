"""Parity with mini-swe-agent itself: the same scripted replies give the same conversation.

For every config mini-swe-agent ships (and the text-based model class its users pass for the
text-format ones), mini's own run (its DefaultAgent, its model class talking to a scripted
OpenAI-compatible server on loopback through litellm / HTTP, its LocalEnvironment) and MegaFlow's
stepped agent (the real agent step over a real Redis; model and env stand-ins with the services'
contracts, see tests/test_agent_service.Harness) must give the same messages, compared one by one,
and the same requests to the model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from megaflow.agents.mini import import_mini, shipped_configs
from megaflow.agents.trajectory import trajectory_steps
from tests.test_agent_service import Harness, task

pytestmark = pytest.mark.mini

os.environ.setdefault("MSWEA_MODEL_RETRY_STOP_AFTER_ATTEMPT", "1")  # a broken case fails at once, not after retries
import_mini()

from minisweagent.agents import get_agent  # noqa: E402  (after import_mini(): quiet and offline)
from minisweagent.environments import get_environment  # noqa: E402  (after import_mini(): quiet and offline)
from minisweagent.models import get_model  # noqa: E402  (after import_mini(): quiet and offline)
from minisweagent.utils.serialize import recursive_merge  # noqa: E402  (after import_mini(): quiet and offline)

CHAT_KEYS = ("role", "content", "tool_call_id")
SUBMIT = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
PATCH = "diff --git a/x.py b/x.py\\n+fixed\\n"


class ScriptedServer:
    """An OpenAI-compatible chat-completions server on loopback that answers from a script."""

    def __init__(self, replies: list[dict[str, Any]]):
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                reply = outer.replies.pop(0)
                message = {"role": "assistant", "content": reply.get("content")}
                if reply.get("tool_calls"):
                    message["tool_calls"] = reply["tool_calls"]
                data = json.dumps(
                    {
                        "id": f"cmpl-{len(outer.requests)}",
                        "object": "chat.completion",
                        "created": 1,
                        "model": "scripted",
                        "choices": [
                            {
                                "index": 0,
                                "message": message,
                                "finish_reason": reply.get("finish_reason")
                                or ("tool_calls" if reply.get("tool_calls") else "stop"),
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def harness(settings, redis_client, tmp_path):
    return Harness(settings, redis_client, str(tmp_path))


def load(*names: str) -> dict[str, Any]:
    base = {
        p.relative_to(p.parents[1] if p.parent.name == "benchmarks" else p.parent).as_posix(): p
        for p in shipped_configs()
    }
    return recursive_merge(*(yaml.safe_load(base[n].read_text()) for n in names))


# (case id, configs merged in order, model_class override or None: mini's own choice)
CASES = [
    ("mini", ("mini.yaml",), None),
    ("mini_textbased", ("mini_textbased.yaml",), None),
    ("mini_textbased+textbased", ("mini_textbased.yaml",), "litellm_textbased"),
    ("default", ("default.yaml",), None),
    ("default+textbased", ("default.yaml",), "litellm_textbased"),
    ("swebench", ("benchmarks/swebench.yaml",), None),
    ("swebench_backticks", ("benchmarks/swebench_backticks.yaml",), None),
    ("swebench_backticks+textbased", ("benchmarks/swebench_backticks.yaml",), "litellm_textbased"),
    ("swebench_xml", ("benchmarks/swebench_xml.yaml",), None),
    ("swebench_xml+textbased", ("benchmarks/swebench_xml.yaml",), "openrouter_textbased"),
    ("swebench+swebench_modal", ("benchmarks/swebench.yaml", "benchmarks/swebench_modal.yaml"), "litellm"),
    ("programbench", ("benchmarks/programbench.yaml",), None),
]


def test_every_shipped_config_is_covered():
    names = {p.name for p in shipped_configs()}
    covered = {Path(n).name for _, configs, _ in CASES for n in configs}
    assert names == covered


def is_text(config: dict[str, Any]) -> bool:
    return "textbased" in str(config.get("model", {}).get("model_class", ""))


def script(config: dict[str, Any], steps: list[Any]) -> list[dict[str, Any]]:
    """Replies in the action format the config's model class parses: text blocks or tool calls."""
    xml = "<mswea_bash_command>" in config.get("model", {}).get("action_regex", "")
    out = []
    for i, step in enumerate(steps):
        commands = step if isinstance(step, list) else [step]
        if is_text(config):
            blocks = "\n\n".join(
                f"<mswea_bash_command>{c}</mswea_bash_command>" if xml else f"```mswea_bash_command\n{c}\n```"
                for c in commands
                if c is not None
            )
            out.append({"content": f"THOUGHT: step {i}.\n\n{blocks}".strip()})
        else:
            calls = [
                {
                    "id": f"call_{i}_{j}",
                    "type": "function",
                    "function": {"name": "bash", "arguments": json.dumps({"command": c})},
                }
                for j, c in enumerate(commands)
                if c is not None
            ]
            out.append({"content": f"Step {i}.", "tool_calls": calls} if calls else {"content": f"Step {i}: hmm."})
    return out


def configure(names: tuple[str, ...], model_class: str | None, workdir: str, **over: Any) -> dict[str, Any]:
    config = load(*names)
    model = config.setdefault("model", {})
    model["model_name"] = "openai/scripted"
    model["cost_tracking"] = "ignore_errors"
    if model_class:
        model["model_class"] = model_class
    model.pop("provider", None)  # portkey's, with model_class replaced
    config["environment"] = {
        **config.get("environment", {}),
        "environment_class": "local",
        "cwd": workdir,
        "timeout": 2,
    }
    for key in (
        "interpreter",
        "run_args",
        "executable",
        "container_timeout",
        "startup_timeout",
        "runtime_timeout",
        "deployment_timeout",
        "install_pipx",
        "modal_sandbox_kwargs",
    ):
        config["environment"].pop(key, None)  # sandbox start-up keys: not LocalEnvironment's
    config["environment"].get("env", {}).pop("BASH_ENV", None)  # the SWE-bench image's .bashrc, not this host's
    return recursive_merge(config, over)


LAST_ENV: list[Any] = []  # the environment of the latest mini run (its container id, for masking)


def run_mini(config: dict[str, Any], replies: list[dict[str, Any]], task_text: str):
    """mini-swe-agent's own run against the scripted server: (messages, requests the server got)."""
    server = ScriptedServer(replies)
    try:
        cfg = copy.deepcopy(config)
        cfg["model"].setdefault("model_kwargs", {}).update(api_base=server.url + "/v1", api_key="sk-test")
        model = get_model(config=cfg["model"])
        if hasattr(model, "_api_url"):  # openrouter's classes post to a fixed URL: point it at loopback
            model._api_url = server.url + "/v1/chat/completions"
        env = get_environment(cfg["environment"], default_type="local")
        LAST_ENV[:] = [env]
        agent = get_agent(model, env, cfg["agent"], default_type="default")
        with contextlib.suppress(RuntimeError):  # mini re-raises an uncaught error after its exit message
            agent.run(task_text)
        return agent.messages, server.requests
    finally:
        server.close()


def run_megaflow(harness: Harness, config: dict[str, Any], replies: list[dict[str, Any]], task_text: str):
    ep, history = harness.run(
        task({"type": "mini_swe_agent", "config": config}, problem_statement=task_text), copy.deepcopy(replies)
    )
    return ep, history


def norm_message(m: dict[str, Any]) -> dict[str, Any]:
    out = {k: m.get(k) for k in CHAT_KEYS if m.get(k) is not None}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in m["tool_calls"]
        ]
    if m.get("role") == "exit":
        extra = m.get("extra") or {}
        out = {
            "role": "exit",
            "content": m.get("content"),
            "exit_status": extra.get("exit_status"),
            "submission": extra.get("submission"),
        }
    return out


def mini_conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [norm_message(m) for m in messages]


def megaflow_conversation(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation a MegaFlow history holds: chat records (dropped replies left out) and the exit."""
    from megaflow.agents.conversation import CHAT_ROLES

    out: list[dict[str, Any]] = []
    for rec in history:
        if rec.get("drop_reply") and out and out[-1]["role"] == "assistant":
            out.pop()
        if rec.get("role") in CHAT_ROLES or rec.get("role") == "exit":
            out.append(norm_message(rec))
    return out


def norm_requests(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("tools", "parallel_tool_calls", "tool_choice", "temperature")
    return [
        {"messages": [norm_message(m) for m in r["messages"]], **{k: r[k] for k in keep if k in r}} for r in requests
    ]


def assert_same(mini_msgs, mini_reqs, history, harness) -> None:
    ours = megaflow_conversation(history)
    theirs = mini_conversation(mini_msgs)
    for i, (a, b) in enumerate(zip(theirs, ours)):
        assert a == b, f"message {i} differs:\nmini:     {a}\nmegaflow: {b}"
    assert len(theirs) == len(ours), (len(theirs), len(ours), theirs[len(ours) :], ours[len(theirs) :])
    assert norm_requests(mini_reqs) == norm_requests(harness.requests)


# A run that visits every event kind: an action, a malformed reply, a failing command, several
# actions in one reply, a time-out, a submit command that exits non-zero (not a submit), the submit.
STEPS = [
    "echo hello && ls",
    None,
    "printf 'a\\nb\\n'; exit 3",
    ["echo one", "echo two"],
    "sleep 20",
    f"{SUBMIT} && false",
    f"{SUBMIT} && printf '{PATCH}'",
]


INLINE_CASES = [c for c in CASES if c[0] in ("mini", "swebench_backticks+textbased")]


@pytest.mark.parametrize("case,names,model_class", INLINE_CASES, ids=[c[0] for c in INLINE_CASES])
def test_same_conversation_as_mini_with_inline_decisions(case, names, model_class, settings, redis_client, tmp_path):
    """MEGAFLOW_AGENT_INLINE: mini's decisions taken inside the model and env steps give the same run."""
    (tmp_path / "x.py").write_text("print('x')\n")
    config = configure(names, model_class, str(tmp_path))
    replies = script(config, STEPS)
    mini_msgs, mini_reqs = run_mini(config, replies, "Fix x.py")
    steps = {}
    for inline in (False, True):
        harness = Harness(settings.model_copy(update={"agent_inline": inline}), redis_client, str(tmp_path))
        ep, history = run_megaflow(harness, config, replies, "Fix x.py")
        assert ep.fields["submission"] == mini_msgs[-1]["extra"]["submission"]
        assert_same(mini_msgs, mini_reqs, history, harness)
        steps[inline] = ep.step
    # each model reply and command result was decided on inside its own step, not in a step of its own
    calls = len(mini_reqs)
    assert steps[True] <= steps[False] - calls, steps


@pytest.mark.parametrize("case,names,model_class", CASES, ids=[c[0] for c in CASES])
def test_same_conversation_as_mini(case, names, model_class, harness, tmp_path):
    (tmp_path / "x.py").write_text("print('x')\n")  # both runs share the directory; no command changes it
    config = configure(names, model_class, str(tmp_path))
    replies = script(config, STEPS)
    mini_msgs, mini_reqs = run_mini(config, replies, "Fix x.py")
    ep, history = run_megaflow(harness, config, replies, "Fix x.py")
    assert mini_msgs[-1]["extra"]["exit_status"] == "Submitted"
    assert ep.fields["submission"] == mini_msgs[-1]["extra"]["submission"] == PATCH.replace("\\n", "\n")
    assert_same(mini_msgs, mini_reqs, history, harness)
    # what MegaFlow keeps besides the conversation: notes on superseded keys, the request options, the steps
    request = json.loads(ep.fields["agent_request"])
    assert ("tools" in request) == (not is_text(config))
    if "mode" in config["agent"]:
        assert history[0]["kind"] == "config_notes" and "agent.mode" in history[0]["content"]
    steps = trajectory_steps(history)
    assert len(steps) == len(STEPS) and steps[-1]["exit"]["status"] == "Submitted"
    assert steps[1]["action"] == {"type": "format_error"}


def run_both(harness, tmp_path, names, model_class, steps, **over):
    (tmp_path / "x.py").write_text("print('x')\n")
    config = configure(names, model_class, str(tmp_path), **over)
    replies = script(config, steps)
    mini_msgs, mini_reqs = run_mini(config, replies, "Fix x.py")
    ep, history = run_megaflow(harness, config, replies, "Fix x.py")
    return mini_msgs, mini_reqs, ep, history


@pytest.mark.parametrize(
    "over,steps,state,cause,status",
    [
        ({"agent": {"step_limit": 2}}, ["echo a", "echo b", "echo c"], "FAILED", "agent_limit", "LimitsExceeded"),
        (
            {"agent": {"max_consecutive_format_errors": 2}},
            ["echo a", None, None, "echo c"],
            "FAILED",
            "format",
            "RepeatedFormatError",
        ),
        (
            {"agent": {"wall_time_limit_seconds": 1}, "environment": {"timeout": 10}},
            ["sleep 1.5", "echo b"],
            "TIMED_OUT",
            "timeout",
            "TimeExceeded",
        ),
        ({"agent": {"step_limit": 0, "cost_limit": 0}}, ["echo a"] * 6 + [SUBMIT], "EVALUATING", "", "Submitted"),
    ],
    ids=["step_limit", "format_errors", "wall_time", "unlimited"],
)
def test_limits_end_runs_as_mini_does(harness, tmp_path, over, steps, state, cause, status):
    mini_msgs, mini_reqs, ep, history = run_both(harness, tmp_path, ("mini.yaml",), None, steps, **over)
    assert mini_msgs[-1]["extra"]["exit_status"] == status
    assert (ep.state, ep.fields.get("cause", "")) == (state, cause)
    assert_same(mini_msgs, mini_reqs, history, harness)


def test_cost_limit_with_mini_cost_tracking(harness, tmp_path):
    """litellm prices each call from the config's model registry, on both sides; cost_limit stops the run."""
    registry = tmp_path / "registry.json"
    registry.write_text(
        json.dumps(
            {
                "openai/priced-model": {  # registered for the whole process: a name no other test uses
                    "input_cost_per_token": 0.001,
                    "output_cost_per_token": 0.0,
                    "litellm_provider": "openai",
                    "mode": "chat",
                }
            }
        )
    )
    over = {
        "agent": {"cost_limit": 0.025},
        "model": {
            "litellm_model_registry": str(registry),
            "cost_tracking": "default",
            "model_name": "openai/priced-model",
        },
    }
    mini_msgs, mini_reqs, ep, history = run_both(harness, tmp_path, ("mini.yaml",), None, ["echo a"] * 5, **over)
    assert mini_msgs[-1]["extra"]["exit_status"] == "LimitsExceeded"
    assert (ep.state, ep.fields["cause"]) == ("FAILED", "agent_limit") and "cost 0.03" in ep.fields["error"]
    assert_same(mini_msgs, mini_reqs, history, harness)


def test_unpriced_model_fails_as_mini_does(harness, tmp_path):
    """cost_tracking 'default' and a model litellm cannot price: mini's RuntimeError ends the run."""
    mini_msgs, _, ep, history = run_both(
        harness,
        tmp_path,
        ("mini.yaml",),
        None,
        ["echo a"],
        model={"cost_tracking": "default", "model_name": "openai/unpriced"},
    )
    assert mini_msgs[-1]["extra"]["exit_status"] == "RuntimeError" == history[-1]["extra"]["exit_status"]
    assert ep.state == "FAILED" and "Error calculating cost" in ep.fields["error"]


def test_same_conversation_in_containers(settings, redis_client, docker_client, sandbox_image, tmp_path):
    """mini's DockerEnvironment and MegaFlow's Docker env host, same image: the same conversation.

    The time-out message names each side's own container; it is compared with the id masked.
    """
    from megaflow.env_hosts.docker_host import DockerHost

    host = DockerHost(docker_client, settings, name="parity-host", redis_client=redis_client)
    handle = host.create("parity-ep", sandbox_image, labels={"megaflow.prefix": settings.key_prefix})

    def execute(pending: dict[str, Any]) -> dict[str, Any]:
        res = host.execute(
            handle,
            pending["command"],
            timeout=pending.get("timeout"),
            workdir=pending.get("workdir"),
            env=pending.get("env"),
        )
        return {
            "role": "env",
            "kind": "exec",
            "command": pending["command"],
            "exit_code": res.exit_code,
            "output": res.output,
            "timed_out": res.timed_out,
            "duration_s": res.duration_s,
        }

    try:
        config = load("mini.yaml")
        config["model"].update(model_name="openai/scripted", cost_tracking="ignore_errors")
        config["environment"].update(environment_class="docker", cwd="/tmp", timeout=3)
        steps = [
            "echo hello && ls -d /etc",
            "printf 'a\\nb\\n'; exit 3",
            ["echo one", "echo two"],
            "sleep 20",
            f"{SUBMIT} && printf '{PATCH}'",
        ]
        replies = script(config, steps)
        mini_cfg = copy.deepcopy(config)
        mini_cfg["environment"].update(image=sandbox_image, run_args=["--rm", "--network", "none"])
        mini_msgs, mini_reqs = run_mini(mini_cfg, replies, "Fix x.py")
        harness = Harness(settings, redis_client, "/tmp", executor=execute)
        harness.rt.__dict__["env_host"] = host
        ep, history = harness.run(
            task({"type": "mini_swe_agent", "config": config}, image=sandbox_image, problem_statement="Fix x.py"),
            copy.deepcopy(replies),
            container=handle.to_json() if hasattr(handle, "to_json") else handle,
        )
        timed = [m["content"] for m in mini_msgs if "timed out" in str(m.get("content"))]
        assert timed and "docker" in timed[0] and "exec" in timed[0]
        mini_sent = [m for r in mini_reqs for m in r["messages"]]
        our_sent = [m for r in harness.requests for m in r["messages"]]
        for msgs, cid in (
            (mini_msgs + mini_sent, LAST_ENV[0].container_id),
            (history + our_sent, handle.id),
        ):
            for m in msgs:  # each side names its own container in the time-out message
                if isinstance(m.get("content"), str):
                    m["content"] = m["content"].replace(cid, "<cid>")
        assert ep.fields["submission"] == PATCH.replace("\\n", "\n")
        assert_same(mini_msgs, mini_reqs, history, harness)
    finally:
        host.close(handle)
        if LAST_ENV:
            LAST_ENV.pop().cleanup()  # mini's own container
