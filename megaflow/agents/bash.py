"""The bash agent: one shell command per model reply; a reply with the submit word ends the episode.

It is step-based: ``decide(history)`` looks at the conversation so far and says what happens next
(call the model, run a command, submit, or stop on a limit). It keeps no state of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megaflow.spec import AgentSpec, TaskSpec

SYSTEM_TEMPLATE = """You are a software engineer working in a Linux shell inside a container.
Reply with exactly one shell command in a ```bash code block per message. You will see its output.
When the task is done, reply with {submit_word} (alone) to submit your work."""

INSTANCE_TEMPLATE = """Working directory: {workdir}

<task>
{problem_statement}
</task>"""

FORMAT_ERROR = """Your reply had no command. Reply with exactly one shell command in a ```bash block,
or with {submit_word} to submit."""

_BLOCK = re.compile(r"```(?:bash|sh|shell)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass
class Action:
    """What the agent wants next: kind is model | exec | submit | format_error | limit."""

    kind: str
    command: str = ""
    message: str = ""
    reason: str = ""


class BashAgent:
    """Decides the next action of an episode from its history."""

    def __init__(self, spec: AgentSpec, *, max_steps: int, max_tokens: int | None = None):
        self.spec = spec
        self.max_steps = spec.max_steps or max_steps
        self.max_tokens = spec.max_tokens or max_tokens

    def initial_messages(self, task: TaskSpec) -> list[dict[str, Any]]:
        system = (self.spec.system_template or SYSTEM_TEMPLATE).format(submit_word=self.spec.submit_word)
        user = (self.spec.instance_template or INSTANCE_TEMPLATE).format(
            problem_statement=task.problem_statement, workdir=task.workdir, task_id=task.task_id
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def parse(self, reply: str) -> Action:
        """The action a model reply asks for."""
        if self.spec.submit_word in reply:
            return Action("submit")
        blocks = _BLOCK.findall(reply)
        if len(blocks) == 1 and blocks[0].strip():
            return Action("exec", command=blocks[0].strip())
        return Action("format_error", message=FORMAT_ERROR.format(submit_word=self.spec.submit_word))

    def decide(self, history: list[dict[str, Any]], *, tokens_used: int = 0) -> Action:
        """Next action: the model when the last message is the user's, else what the reply says."""
        if not history or history[-1].get("role") != "assistant":
            calls = sum(1 for m in history if m.get("role") == "assistant")
            if calls >= self.max_steps:
                return Action("limit", reason=f"step limit reached ({self.max_steps} model calls)")
            if self.max_tokens is not None and tokens_used >= self.max_tokens:
                return Action("limit", reason=f"token limit reached ({tokens_used} >= {self.max_tokens})")
            return Action("model")
        return self.parse(str(history[-1].get("content", "")))


def observation(exit_code: int | None, output: str, timed_out: bool) -> str:
    """The user message that reports a command's result to the model."""
    if timed_out:
        head = "The command timed out and was stopped."
    else:
        head = f"Exit code: {exit_code}"
    return f"{head}\n<output>\n{output}\n</output>"
