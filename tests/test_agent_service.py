"""The agent service's step over a real Redis: agents by type and by dotted path, driven in-process.

``Harness`` drives an episode through the real engine and the real ``agent_step``; the model and
env steps are stand-ins that keep their contracts (an assistant record per call; a raw ``env``
record per command, run locally under ``bash -lc`` with a time limit). test_mini_parity uses it too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from megaflow.agents import build_request
from megaflow.core import states
from megaflow.core.spec import validate_specs
from megaflow.services import lifecycle
from megaflow.services.agent import advance_to_agent, agent_step
from megaflow.services.root import Root as Runtime

Reply = dict[str, Any]  # an OpenAI assistant message (content, tool_calls) plus optional finish_reason


class Harness:
    """One process plays every service: the engine and agent step are real, model and env are stand-ins.

    The stand-ins hand their results on as the real services do (``advance_to_agent``), so with
    ``settings.agent_inline`` the agent decides inside them and its own step runs only for fallbacks.
    """

    def __init__(self, settings, redis_client, workdir: str, executor: Callable[[dict], dict] | None = None):
        self.rt = Runtime(settings, role="test")  # its engine's next tasks land on queue lists nobody reads
        self.workdir = workdir
        self.executor = executor  # pending -> raw record (a real env host); default: a local subprocess
        self.requests: list[dict[str, Any]] = []  # what the model service would send, call by call

    def run(
        self,
        spec: dict[str, Any],
        replies: list[Reply] | Callable[[dict], Reply],
        max_hops: int = 200,
        container: dict[str, Any] | None = None,
    ) -> tuple[Any, list[dict[str, Any]]]:
        """Run one episode to its end (or its evaluation); return (episode, whole history)."""
        eng = self.rt.engine
        _, (eid,) = eng.create_batch(validate_specs([spec]), "tester")
        ep = eng.load(eid, history=False)
        eng.advance(
            ep,
            state=states.RUNNING,
            phase="env_ready",
            fields={"host": "test-host", **({"container": container} if container else {})},
            next_task=lifecycle.to_agent(),
        )
        queue = list(replies) if isinstance(replies, list) else None
        for _ in range(max_hops):
            ep = eng.load(eid)
            if ep.terminal or ep.state == states.EVALUATING:
                return ep, ep.history
            name = json.loads(ep.fields["next"])["name"]
            if name == lifecycle.AGENT_STEP:
                agent_step(self.rt, eid, ep.step)
            elif name == lifecycle.MODEL_COMPLETE:
                request = build_request(ep.history, json.loads(ep.fields.get("agent_request") or "{}"))
                self.requests.append(request)
                reply = queue.pop(0) if queue is not None else replies(request)  # type: ignore[operator]
                self.model_step(ep, reply)
            elif name == lifecycle.ENV_EXEC:
                self.env_step(ep)
            else:
                raise AssertionError(f"unexpected next task {name}")
        raise AssertionError("episode did not end")

    def model_step(self, ep, reply: Reply) -> None:
        """The model service's contract: one assistant record with the whole message and its usage."""
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        record = {
            "role": "assistant",
            "content": reply.get("content"),
            "step": ep.step,
            "finish_reason": reply.get("finish_reason") or ("tool_calls" if reply.get("tool_calls") else "stop"),
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "usage": usage,
            "model_name": "scripted",
        }
        if reply.get("tool_calls"):
            record["tool_calls"] = reply["tool_calls"]
        advance_to_agent(
            self.rt, ep, history=[record], incr={"model_calls": 1, "prompt_tokens": 10, "completion_tokens": 5}
        )

    def env_step(self, ep) -> None:
        """The env service's contract: run ``pending`` (bash -lc, time limit, cwd, env), record it raw."""
        pending = ep.pending or {}
        if self.executor is not None:
            record = self.executor(pending)
            advance_to_agent(self.rt, ep, history=[record], fields={"pending": ""})
            return
        timeout = float(pending.get("timeout") or 60)
        started = time.monotonic()
        proc = subprocess.Popen(
            ["bash", "-lc", pending["command"]],
            cwd=pending.get("workdir") or self.workdir,
            env=os.environ | dict(pending.get("env") or {}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            code, timed_out = proc.returncode, False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            code, timed_out = None, True
        record = {
            "role": "env",
            "kind": "exec",
            "command": pending["command"],
            "exit_code": code,
            "output": out,
            "timed_out": timed_out,
            "duration_s": round(time.monotonic() - started, 4),
        }
        advance_to_agent(self.rt, ep, history=[record], fields={"pending": ""})


def task(agent: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"task_id": "t1", "problem_statement": "say hello", "eval": {"command": "true"}, "agent": agent, **kw}


@pytest.fixture
def harness(settings, redis_client, tmp_path):
    return Harness(settings, redis_client, str(tmp_path))


def test_bash_agent_renders_observations_from_raw_results(harness):
    replies = [
        {"content": "```bash\necho hi; exit 3\n```"},
        {"content": "no command here"},
        {"content": "```bash\nsleep 20\n```"},
        {"content": "MEGAFLOW_SUBMIT"},
    ]
    ep, hist = harness.run(task({"type": "bash", "command_timeout_s": 2}), replies)
    assert ep.state == states.EVALUATING
    kinds = [(r["role"], r.get("kind")) for r in hist]
    assert kinds == [
        ("system", None),
        ("user", None),
        ("assistant", None),
        ("env", "exec"),
        ("user", "observation"),
        ("assistant", None),
        ("user", "format_error"),
        ("assistant", None),
        ("env", "exec"),
        ("user", "observation"),
        ("assistant", None),
    ]
    assert hist[4]["content"] == "Exit code: 3\n<output>\nhi\n\n</output>"
    assert hist[9]["content"].startswith("The command timed out")
    # the model saw the chat records only, never the raw env records
    assert [m["role"] for m in harness.requests[-1]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]


def test_bash_agent_limits_end_the_episode_with_a_cause(harness):
    ep, _ = harness.run(task({"type": "bash", "max_steps": 2}), [{"content": "```bash\ntrue\n```"}] * 3)
    assert (ep.state, ep.fields["cause"]) == (states.FAILED, states.CAUSE_AGENT_LIMIT)
    assert "step limit reached (2 model calls)" in ep.fields["error"]
    ep, _ = harness.run(task({"type": "bash", "max_format_errors": 2}), [{"content": "x"}, {"content": "y"}])
    assert (ep.state, ep.fields["cause"]) == (states.FAILED, states.CAUSE_FORMAT)


def test_user_agent_by_dotted_path_runs_an_episode(harness):
    """The README example (examples/agents/echo_agent.py), loaded lazily by its dotted path."""
    agent = {"type": "examples.agents.echo_agent:EchoAgent", "config": {"commands": ["echo one", "echo two"]}}
    ep, hist = harness.run(task(agent), [{"content": "unused"}])
    assert ep.state == states.EVALUATING and ep.fields["submission"] == "one\ntwo"
    assert [r["content"] for r in hist if r.get("role") == "user"][-1] == "Ran 2 commands."
    assert json.loads(ep.fields["agent_state"]) == {"done": 2, "outputs": ["one", "two"]}


def test_an_agent_that_cannot_load_ends_the_episode(harness):
    ep, _ = harness.run(task({"type": "examples.agents.missing:Nope"}), [])
    assert (ep.state, ep.fields["cause"]) == (states.FAILED, states.CAUSE_AGENT_CONFIG)
    assert "cannot be imported" in ep.fields["error"]
