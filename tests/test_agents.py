"""The agent seam without services: registry, dotted paths, submit-time checks, requests, trajectories."""

from __future__ import annotations

import pytest

from megaflow.agents import REGISTRY, agent_class, build_request, validate_agent_section
from megaflow.agents.bash import BashAgent
from megaflow.agents.mini import load_mini_config, shipped_configs, validate_mini_config
from megaflow.agents.trajectory import token_data, trajectory_steps
from megaflow.core.errors import SpecError
from megaflow.core.spec import validate_specs


def mini(**sections):
    base = {"agent": {"system_template": "sys", "instance_template": "{{task}}"}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return {"type": "mini_swe_agent", "config": base}


# --- registry ---------------------------------------------------------------------------------------
def test_types_resolve_by_name_and_by_dotted_path():
    assert agent_class("bash") is BashAgent and {"bash", "mini_swe_agent", "mini"} <= set(REGISTRY)
    cls = agent_class("examples.agents.echo_agent:EchoAgent")
    assert cls.__name__ == "EchoAgent" and agent_class("examples.agents.echo_agent.EchoAgent") is cls
    with pytest.raises(SpecError, match="unknown agent type 'nope'"):
        agent_class("nope")
    with pytest.raises(SpecError, match="cannot be imported"):
        agent_class("no_such_pkg.agents:Agent")
    with pytest.raises(SpecError, match="has no 'Missing'"):
        agent_class("examples.agents.echo_agent:Missing")
    with pytest.raises(SpecError, match="is not an agent"):
        agent_class("json:JSONDecoder")


def test_spec_type_is_open_but_shaped():
    spec = {"task_id": "t", "eval": {"command": "true"}, "agent": {"type": "mypkg.agents:MyAgent"}}
    assert validate_specs([spec])[0].agent.type == "mypkg.agents:MyAgent"  # core only checks the shape
    with pytest.raises(SpecError, match="agent.type"):
        validate_specs([dict(spec, agent={"type": "not a type!"})])


def test_validate_agent_section_runs_the_agents_own_checks():
    assert validate_agent_section({"type": "bash", "max_steps": 3}) == {"type": "bash", "max_steps": 3}
    assert validate_agent_section(None) == {"type": "bash"}
    with pytest.raises(SpecError, match="agent.config"):
        validate_agent_section({"type": "bash", "config": {"x": 1}})
    with pytest.raises(SpecError, match="config.commands must be a non-empty list"):
        validate_agent_section({"type": "examples.agents.echo_agent:EchoAgent", "config": {}})
    with pytest.raises(SpecError, match="agent.action_regex"):
        validate_agent_section({"action_regex": "no groups"})


# --- mini-swe-agent configs: every key honoured, superseded (noted) or rejected -------------------
@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    section = load_mini_config(path).agent
    if "agent" not in section["config"]:  # swebench_modal.yaml is merged onto swebench.yaml
        override, section = section["config"], load_mini_config("swebench").agent
        for name, values in override.items():
            section["config"][name].update(values)
        assert section["config"]["model"]["model_class"] == "portkey"
    assert validate_agent_section(section)["type"] == "mini_swe_agent"


@pytest.mark.parametrize(
    "sections,field,msg",
    [
        ({"agent": {"output_path": "/tmp/t.json"}}, "agent.output_path", "artifact"),
        ({"agent": {"step_limt": 3}}, "agent.step_limt", "unknown key"),
        ({"agent": {"step_limit": "many"}}, "agent", "step_limit"),
        ({"agent": {"agent_class": "interactive"}}, "agent.agent_class", "cannot be stepped"),
        ({"agent": {"instance_template": "{% if %}"}}, "agent.instance_template", "not a valid Jinja2"),
        ({"model": {"model_class": "litellm_response"}}, "model.model_class", "Responses API"),
        ({"model": {"model_class": "no.such.Model"}}, "model.model_class", "Unknown model class"),
        ({"model": {"model_kwargs": {"api_base": "http://x"}}}, "model.model_kwargs.api_base", "model section"),
        ({"model": {"observation_template": "{{ x"}}, "model.observation_template", "Jinja2"),
        ({"model": {"cost_tracking": "sometimes"}}, "model.cost_tracking", "ignore_errors"),
        ({"environment": {"environment_class": "mypkg.Env"}}, "environment.environment_class", "env host"),
        ({"environment": {"forward_env": ["HOME"]}}, "environment.forward_env", "environment.env"),
        ({"environment": {"image": "python:3.11"}}, "environment.image", "image field"),
        ({"environment": {"timeout": -1}}, "environment.timeout", "positive"),
        ({"run": {"task": "x"}}, "run", "unknown section"),
    ],
)
def test_bad_mini_keys_are_rejected_naming_the_key(sections, field, msg):
    with pytest.raises(SpecError, match=msg) as err:
        validate_agent_section(mini(**sections))
    assert err.value.field == f"agent.config.{field}"


def test_flat_fields_and_superseded_keys_of_a_mini_section():
    with pytest.raises(SpecError, match="agent.max_steps.*agent.config"):
        validate_agent_section({**mini(), "max_steps": 3})
    from megaflow.agents.mini import config_notes

    cfg = mini(
        agent={"mode": "confirm"}, environment={"run_args": ["--rm"]}, model={"model_kwargs": {"drop_params": True}}
    )["config"]
    assert validate_mini_config(cfg) is cfg
    notes = config_notes(cfg)
    assert any(n.startswith("agent.mode:") for n in notes) and any(n.startswith("environment.run_args:") for n in notes)
    assert any("drop_params" in n for n in notes)
    textual = mini(agent={"instance_template": "```mswea_bash_command\nls\n```"})["config"]
    assert any("--model-class litellm_textbased" in n for n in config_notes(textual))


def test_mini_configs_load_by_name_path_or_dict(tmp_path):
    assert load_mini_config("mini").agent["config"]["agent"]["step_limit"] == 0
    assert load_mini_config("swebench").workdir == "/testbed"
    path = tmp_path / "my.yaml"
    path.write_text("agent:\n  system_template: s\n  instance_template: '{{task}}'\n")
    assert load_mini_config(path).agent == {
        "type": "mini_swe_agent",
        "config": {"agent": {"system_template": "s", "instance_template": "{{task}}"}},
    }
    with pytest.raises(SpecError, match="no such file"):
        load_mini_config("/nonexistent/mini.yaml")


# --- the model request -------------------------------------------------------------------------------
def test_request_leaves_out_notes_raw_results_and_dropped_replies():
    history = [
        {"role": "note", "content": "n"},
        {"role": "system", "content": "s", "kind": "prompt"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "bad", "finish_reason": "stop", "prompt_tokens": 3},
        {"role": "user", "content": "fmt", "drop_reply": True, "kind": "format_error"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}],
        },
        {"role": "env", "kind": "exec", "output": "x"},
        {"role": "tool", "content": "obs", "tool_call_id": "c1", "extra": {"returncode": 0}},
        {"role": "exit", "content": "done"},
    ]
    req = build_request(history, {"tools": ["T"], "temperature": 0})
    assert req["tools"] == ["T"] and req["temperature"] == 0
    assert req["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "user", "content": "fmt"},
        {"role": "assistant", "content": None, "tool_calls": history[5]["tool_calls"]},
        {"role": "tool", "content": "obs", "tool_call_id": "c1"},
    ]
    marked = build_request(history, {"cache_control": "default_end"})
    assert "cache_control" not in marked and marked["messages"][-1] == {
        "role": "tool",
        "content": [{"type": "text", "text": "obs"}],
        "tool_call_id": "c1",
        "cache_control": {"type": "ephemeral"},
    }


# --- trajectory steps -------------------------------------------------------------------------------
def test_trajectory_steps_pair_replies_with_actions():
    history = [
        {"role": "system", "content": "s", "t": 1.0},
        {"role": "user", "content": "u", "t": 1.0},
        {
            "role": "assistant",
            "content": "```bash\nls\n```",
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "latency_s": 0.1,
            "token_ids": [1, 2],
            "t": 2.0,
        },
        {"role": "env", "kind": "exec", "command": "ls", "exit_code": 0, "output": "a", "duration_s": 0.2, "t": 2.4},
        {"role": "user", "kind": "observation", "content": "Exit code: 0", "t": 2.5},
        {"role": "assistant", "content": "hmm", "prompt_tokens": 9, "completion_tokens": 1, "t": 3.0},
        {"role": "user", "kind": "format_error", "content": "one block please", "t": 3.1},
        {"role": "assistant", "content": "MEGAFLOW_SUBMIT", "prompt_tokens": 12, "completion_tokens": 1, "t": 4.0},
        {"role": "evaluation", "content": "ok", "t": 5.0},
    ]
    steps = trajectory_steps(history)
    assert [s["action"]["type"] for s in steps] == ["exec", "format_error", "submit"]
    assert steps[0]["observation"]["exit_code"] == 0 and steps[0]["model"]["token_ids"] == [1, 2]
    assert steps[0]["observation"]["message"] == "Exit code: 0"
    assert steps[0]["wall_s"] == 1.0 and steps[1]["observation"]["message"] == "one block please"
    tokens = token_data(history)
    assert (tokens["prompt_tokens"], tokens["completion_tokens"], len(tokens["turns"])) == (26, 4, 3)
    mini_end = trajectory_steps(
        history[:3] + [{"role": "exit", "content": "p", "extra": {"exit_status": "Submitted", "submission": "p"}}]
    )
    assert mini_end[0]["action"] == {"type": "submit"} and mini_end[0]["exit"]["submission"] == "p"


def test_agent_config_option_applies_to_task_spec_lines():
    from megaflow.agents.base import with_agent_section

    line = {"task_id": "t", "eval": {"command": "true"}}
    section = load_mini_config("mini").agent
    assert with_agent_section(line, section)["agent"] is section
    assert with_agent_section(line, None) is line
    assert with_agent_section({**line, "agent": section}, section)["agent"] == section
    with pytest.raises(SpecError, match="f.jsonl:3: field 'agent': the line has its own agent section"):
        with_agent_section({**line, "agent": {"type": "bash"}}, section, "f.jsonl:3")


def test_conversation_of_a_growing_history_is_built_incrementally_and_equal_to_a_fresh_build():
    import copy

    from megaflow.agents import conversation

    def grow(hist: list[dict], i: int) -> list[dict]:
        recs = [{"role": "assistant", "content": f"reply {i}", "tool_calls": []}]
        if i % 3 == 2:  # a malformed reply: it leaves the conversation, as mini-swe-agent does
            recs.append({"role": "user", "content": "format error", "drop_reply": True, "chat": False})
        recs += [{"role": "env", "output": f"out {i}"}, {"role": "user", "content": f"observation {i}"}]
        return hist + recs  # a new list holding the same record objects, as the engine's history cache does

    hist = [{"role": "system", "content": "sys"}, {"role": "user", "content": "task", "name": None}]
    for i in range(30):
        hist = grow(hist, i)
        got = conversation.chat_messages(hist)
        assert got == conversation.chat_messages(copy.deepcopy(hist))  # re-read records: built from scratch
        assert [m["content"] for m in got[:2]] == ["sys", "task"] and "name" not in got[1]
        assert not any(m["content"] == f"reply {j}" for j in range(i + 1) if j % 3 == 2 for m in got)
    memo = conversation._MEMO[id(hist[0])]
    assert memo.n == len(hist) and memo.last is hist[-1]
