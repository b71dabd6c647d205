"""Agents without services: templates, action parsing, format errors, limits, mini-swe-agent configs."""

from __future__ import annotations

import textwrap

import pytest

from megaflow.core import states
from megaflow.agents import make_agent
from megaflow.agents.mini import MiniAgent, load_mini_config
from megaflow.agents.trajectory import token_data, trajectory_steps
from megaflow.core.errors import SpecError
from megaflow.core.spec import AgentSpec, TaskSpec, validate_specs

TASK = TaskSpec(task_id="t1", problem_statement="fix calc.add", eval={"command": "true"})

# The layout of mini-swe-agent v1 configs: every template under agent:.
MINI_V1 = textwrap.dedent("""\
    agent:
      system_template: "You fix bugs. Step limit {{step_limit}}."
      instance_template: |
        Please solve this issue: {{task}}
        Finish with `echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`.
      action_observation_template: |-
        <returncode>{{output.returncode}}</returncode>
        <output>
        {{output.output}}</output>
      format_error_template: "Please always provide EXACTLY ONE action in triple backticks, found {{actions|length}}."
      timeout_template: "Timed out: {{action['action']}} / {{output}}"
      step_limit: 7
      cost_limit: 3.0
      mode: yolo
    environment:
      cwd: /testbed
      timeout: 30
      env:
        PAGER: cat
    model:
      model_name: my-model
      model_kwargs:
        temperature: 0.0
        drop_params: true
    """)

# The v2 layout: observation / format templates and the action regex live under model:.
MINI_V2 = textwrap.dedent("""\
    agent:
      system_template: "sys"
      instance_template: "Task: {{task}}"
      step_limit: 0
    model:
      action_regex: "```mswea_bash_command\\\\s*\\n(.*?)\\n```"
      observation_template: "rc={{output.returncode}}"
      format_error_template: "found {{actions|length}} actions"
    environment:
      env: {}
    """)


def agent(**kw):
    return make_agent(AgentSpec(**kw), None)


# --- the bash agent -------------------------------------------------------------------------------
def test_custom_templates_fill_fields_and_keep_unknown_braces():
    a = agent(system_template="Submit with {submit_word}. Keep {this}.",
              instance_template="[{task_id}] {problem_statement} in {workdir}")
    sys_msg, user = a.initial_messages(TASK)
    assert sys_msg["content"] == "Submit with MEGAFLOW_SUBMIT. Keep {this}."
    assert user["content"] == "[t1] fix calc.add in /repo"


def test_format_error_reply_uses_the_template():
    a = agent(format_error_template="One ```bash block please ({n_actions} found).")
    act = a.decide([{"role": "assistant", "content": "```bash\nls\n```\n```bash\npwd\n```"}])
    assert act.kind == "format_error" and act.message == "One ```bash block please (2 found)."
    custom = agent(action_regex=r"<cmd>(.*?)</cmd>")
    assert custom.decide([{"role": "assistant", "content": "<cmd>ls -l</cmd>"}]).command == "ls -l"


def test_observation_templates():
    a = agent(action_observation_template="rc={exit_code} out={output}", timeout_template="slow: {command}")
    assert a.observation(3, "boom", False, "make") == "rc=3 out=boom"
    assert a.observation(None, "", True, "sleep 9") == "slow: sleep 9"
    default = agent()
    assert default.observation(0, "hi", False) == "Exit code: 0\n<output>\nhi\n</output>"


def test_limits_name_their_cause():
    a = agent(max_steps=2, max_format_errors=2)
    turn = [{"role": "assistant", "content": "```bash\nls\n```"},
            {"role": "user", "content": "o", "kind": "observation"}]
    act = a.decide([{"role": "user", "content": "task"}] + turn * 2)
    assert (act.kind, act.cause) == ("limit", states.CAUSE_AGENT_LIMIT) and "step limit" in act.reason
    bad = {"role": "assistant", "content": "?"}
    fmt = {"role": "user", "content": "fmt", "kind": "format_error"}
    assert a.decide([{"role": "user", "content": "task"}, bad]).kind == "format_error"
    act = a.decide([{"role": "user", "content": "task"}, bad, fmt, bad])
    assert (act.kind, act.cause) == ("limit", states.CAUSE_FORMAT) and "format error limit" in act.reason
    # a good action in between starts the count again
    b = agent(max_format_errors=2)
    assert b.decide([{"role": "user", "content": "t"}, bad, fmt] + turn + [bad]).kind == "format_error"
    # a format error does not get round the step limit
    act = agent(max_steps=1, max_format_errors=5).decide([{"role": "user", "content": "t"}, bad])
    assert (act.kind, act.cause) == ("limit", states.CAUSE_AGENT_LIMIT)
    tok = agent(max_tokens=10).decide([{"role": "user", "content": "t"}], tokens_used=10)
    assert (tok.kind, tok.cause) == ("limit", states.CAUSE_AGENT_LIMIT) and "token limit" in tok.reason


def test_bad_action_regex_is_rejected_at_submit():
    spec = {"task_id": "t", "eval": {"command": "true"}, "agent": {"action_regex": "no groups"}}
    with pytest.raises(SpecError, match="agent.action_regex"):
        validate_specs([spec])


# --- mini-swe-agent mode --------------------------------------------------------------------------
def test_mini_v1_config_maps_onto_the_spec(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(MINI_V1)
    cfg = load_mini_config(path)
    assert cfg.agent["type"] == "mini" and cfg.agent["max_steps"] == 7
    assert cfg.agent["command_timeout_s"] == 30 and cfg.agent["env"] == {"PAGER": "cat"}
    assert cfg.workdir == "/testbed" and cfg.model == {"model_name": "my-model", "temperature": 0.0}
    assert "agent.cost_limit" in cfg.ignored and "agent.mode" in cfg.ignored
    a = make_agent(AgentSpec(**cfg.agent))
    assert isinstance(a, MiniAgent)
    sys_msg, user = a.initial_messages(TASK)
    assert sys_msg["content"] == "You fix bugs. Step limit 7."
    assert user["content"].startswith("Please solve this issue: fix calc.add")
    act = a.decide([{"role": "assistant", "content": "THOUGHT: look\n```bash\nls -la\n```"}])
    assert (act.kind, act.command) == ("exec", "ls -la")
    bad = a.decide([{"role": "assistant", "content": "no action here"}])
    assert bad.kind == "format_error"
    assert bad.message == "Please always provide EXACTLY ONE action in triple backticks, found 0."
    assert a.observation(1, "err", False) == "<returncode>1</returncode>\n<output>\nerr</output>"
    assert a.observation(None, "part", True, "sleep 99") == "Timed out: sleep 99 / part"


def test_mini_submits_when_the_output_starts_with_the_marker():
    a = make_agent(AgentSpec(type="mini"))
    obs = {"role": "user", "kind": "observation", "content": "...",
           "output_head": "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\ndiff"}
    history = [{"role": "assistant", "content": "```bash\necho COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```"}, obs]
    assert a.decide(history).kind == "submit"
    old = dict(obs, output_head="MINI_SWE_AGENT_FINAL_OUTPUT")
    assert a.decide(history[:1] + [old]).kind == "submit"
    not_first = dict(obs, output_head="hello\nCOMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT")
    assert a.decide(history[:1] + [not_first]).kind == "model"
    # the submit word of the bash agent means nothing to a mini agent
    assert a.decide([{"role": "assistant", "content": "MEGAFLOW_SUBMIT"}]).kind == "format_error"


def test_mini_v2_config_regex_and_templates(tmp_path):
    path = tmp_path / "v2.yaml"
    path.write_text(MINI_V2)
    cfg = load_mini_config(path)
    assert "max_steps" not in cfg.agent  # step_limit 0 means no limit of its own
    a = make_agent(AgentSpec(**cfg.agent))
    act = a.decide([{"role": "assistant", "content": "```mswea_bash_command\ncat x\n```"}])
    assert (act.kind, act.command) == ("exec", "cat x")
    assert a.decide([{"role": "assistant", "content": "```bash\ncat x\n```"}]).message == "found 0 actions"
    assert a.observation(0, "o", False) == "rc=0"


def test_mini_default_regex_takes_both_fences_and_broken_template_is_a_spec_error():
    a = make_agent(AgentSpec(type="mini"))
    assert a.decide([{"role": "assistant", "content": "```mswea_bash_command\npwd\n```"}]).command == "pwd"
    spec = {"task_id": "t", "eval": {"command": "true"}, "agent": {"type": "mini", "instance_template": "{% if %}"}}
    with pytest.raises(SpecError, match="'agent'.*instance_template is not a valid Jinja2 template"):
        validate_specs([spec])
    broken = make_agent(AgentSpec(type="mini", system_template="{{ x.y() }}"))  # parses, fails to render
    with pytest.raises(SpecError, match="does not render"):
        broken.initial_messages(TASK)
    with pytest.raises(SpecError, match="no such file"):
        load_mini_config("/nonexistent/mini.yaml")


# --- trajectory steps ------------------------------------------------------------------------------
def test_trajectory_steps_pair_replies_with_actions():
    history = [
        {"role": "system", "content": "s", "t": 1.0}, {"role": "user", "content": "u", "t": 1.0},
        {"role": "assistant", "content": "```bash\nls\n```", "prompt_tokens": 5, "completion_tokens": 2,
         "latency_s": 0.1, "token_ids": [1, 2], "t": 2.0},
        {"role": "user", "kind": "observation", "command": "ls", "exit_code": 0, "output_head": "a", "duration_s": 0.2,
         "content": "Exit code: 0", "t": 2.5},
        {"role": "assistant", "content": "hmm", "prompt_tokens": 9, "completion_tokens": 1, "t": 3.0},
        {"role": "user", "kind": "format_error", "content": "one block please", "t": 3.1},
        {"role": "assistant", "content": "MEGAFLOW_SUBMIT", "prompt_tokens": 12, "completion_tokens": 1, "t": 4.0},
        {"role": "evaluation", "content": "ok", "t": 5.0},
    ]
    steps = trajectory_steps(history)
    assert [s["action"]["type"] for s in steps] == ["exec", "format_error", "submit"]
    assert steps[0]["observation"]["exit_code"] == 0 and steps[0]["model"]["token_ids"] == [1, 2]
    assert steps[0]["wall_s"] == 1.0 and steps[1]["observation"]["message"] == "one block please"
    tokens = token_data(history)
    assert (tokens["prompt_tokens"], tokens["completion_tokens"], len(tokens["turns"])) == (26, 4, 3)


def test_configs_shipped_with_an_installed_mini_swe_agent_are_found_by_name(tmp_path, monkeypatch):
    """mini-swe-agent stays optional: only its YAML files are read, found next to its package."""
    pkg = tmp_path / "minisweagent"
    (pkg / "config" / "extra").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config" / "extra" / "swebench.yaml").write_text(MINI_V1)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "minisweagent", raising=False)
    assert load_mini_config("swebench").agent["max_steps"] == 7
    assert load_mini_config("extra/swebench.yaml").workdir == "/testbed"
    with pytest.raises(SpecError, match="nor a config shipped with mini-swe-agent"):
        load_mini_config("nonexistent")
