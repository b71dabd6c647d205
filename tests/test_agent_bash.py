"""The bash agent's decisions, step by step, without any service."""

from megaflow.agents.base import StepContext
from megaflow.agents.bash import BashAgent
from megaflow.core import states
from megaflow.core.spec import SUBMIT_WORD, AgentSpec, TaskSpec

TASK = TaskSpec(task_id="t", problem_statement="fix it", eval={"command": "true"})


def agent(**kw) -> BashAgent:
    return BashAgent(AgentSpec(**kw))


def ctx(last=None, state=None, **counters) -> StepContext:
    history = [last] if last else []
    return StepContext(task=TASK, history=history, history_len=len(history) * 3, state=state or {}, counters=counters)


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_first_step_writes_the_prompts_and_calls_the_model():
    d = agent().decide(ctx())
    assert d.next == "model" and [r["role"] for r in d.records] == ["system", "user"]
    assert SUBMIT_WORD in d.records[0]["content"] and "fix it" in d.records[1]["content"]


def test_reply_becomes_exec_submit_or_format_error():
    a = agent(command_timeout_s=7, env={"A": "1"})
    d = a.decide(ctx(reply("ok\n```bash\nls -la /repo\n```")))
    assert (d.next, d.exec) == ("exec", {"command": "ls -la /repo", "timeout": 7, "env": {"A": "1"}})
    assert a.decide(ctx(reply(f"done {SUBMIT_WORD}"))).next == "submit"
    bad = a.decide(ctx(reply("I think the bug is in calc.py")))
    assert bad.next == "model" and bad.records[0]["kind"] == "format_error" and bad.state == {"format_streak": 1}
    assert "```bash" in bad.records[0]["content"]


def test_observation_is_rendered_from_the_raw_result():
    a = agent(action_observation_template="rc={exit_code} out={output}", timeout_template="slow: {command}")
    raw = {"role": "env", "kind": "exec", "command": "make", "exit_code": 3, "output": "boom", "timed_out": False}
    assert a.decide(ctx(raw)).records[0]["content"] == "rc=3 out=boom"
    assert a.decide(ctx(dict(raw, timed_out=True, exit_code=None))).records[0]["content"] == "slow: make"
    assert agent().observation(0, "hi", False) == "Exit code: 0\n<output>\nhi\n</output>"


def test_limits_name_their_cause():
    d = agent(max_steps=2).decide(ctx({"role": "env", "kind": "exec", "output": ""}, model_calls=2))
    assert (d.next, d.cause) == ("end", states.CAUSE_AGENT_LIMIT) and "step limit reached (2" in d.reason
    assert d.records and d.records[0]["kind"] == "observation"  # the last observation still lands in the history
    d = agent(max_format_errors=2).decide(ctx(reply("?"), state={"format_streak": 1}))
    assert (d.next, d.cause) == ("end", states.CAUSE_FORMAT) and "format error limit" in d.reason
    d = agent(max_tokens=100).decide(ctx(reply("?"), prompt_tokens=90, completion_tokens=20))
    assert (d.next, d.cause) == ("end", states.CAUSE_AGENT_LIMIT) and "token limit" in d.reason
    # a good action starts the count again
    assert agent().decide(ctx(reply("```bash\nls\n```"), state={"format_streak": 2})).state == {"format_streak": 0}
