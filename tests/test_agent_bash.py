"""The bash agent's decisions, without any service."""

from megaflow.agents.bash import BashAgent
from megaflow.core.spec import SUBMIT_WORD, AgentSpec, TaskSpec


def agent(**kw) -> BashAgent:
    return BashAgent(AgentSpec(**kw), max_steps=3)


def test_first_decision_is_a_model_call():
    a = agent()
    msgs = a.initial_messages(TaskSpec(task_id="t", problem_statement="fix it", eval={"command": "true"}))
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert SUBMIT_WORD in msgs[0]["content"] and "fix it" in msgs[1]["content"]
    assert a.decide(msgs).kind == "model"


def test_parse_command_submit_and_format_error():
    a = agent()
    act = a.decide([{"role": "assistant", "content": "ok\n```bash\nls -la /repo\n```"}])
    assert (act.kind, act.command) == ("exec", "ls -la /repo")
    assert a.decide([{"role": "assistant", "content": f"done {SUBMIT_WORD}"}]).kind == "submit"
    bad = a.decide([{"role": "assistant", "content": "I think the bug is in calc.py"}])
    assert bad.kind == "format_error" and "```bash" in bad.message
    two = a.decide([{"role": "assistant", "content": "```bash\nls\n```\n```bash\npwd\n```"}])
    assert two.kind == "format_error"


def test_step_and_token_limits():
    a = agent()
    history = [{"role": "user", "content": "x"}] + [{"role": "assistant", "content": "a"},
                                                     {"role": "user", "content": "o"}] * 3
    act = a.decide(history)
    assert act.kind == "limit" and "step limit" in act.reason
    b = agent(max_tokens=100)
    act = b.decide([{"role": "user", "content": "x"}], tokens_used=150)
    assert act.kind == "limit" and "token limit" in act.reason
