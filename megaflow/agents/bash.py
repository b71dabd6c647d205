"""The bash agent: one shell command per model reply; a reply with the submit word ends the episode.

It is step-based: ``decide(history)`` looks at the conversation so far and says what happens next
(call the model, run a command, submit, or stop on a limit). It keeps no state of its own, so any
agent worker can take any step. Its prompts, action format and limits come from the task's
AgentSpec; templates are Python ``str.format`` strings (unknown fields stay as written).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megaflow.core import states
from megaflow.core.spec import AgentSpec, TaskSpec

SYSTEM_TEMPLATE = """You are a software engineer working in a Linux shell inside a container.
Reply with exactly one shell command in a ```bash code block per message. You will see its output.
When the task is done, reply with {submit_word} (alone) to submit your work."""

INSTANCE_TEMPLATE = """Working directory: {workdir}

<task>
{problem_statement}
</task>"""

FORMAT_ERROR = """Your reply had no command. Reply with exactly one shell command in a ```bash block,
or with {submit_word} to submit."""

OBSERVATION_TEMPLATE = "Exit code: {exit_code}\n<output>\n{output}\n</output>"
TIMEOUT_TEMPLATE = "The command timed out and was stopped.\n<output>\n{output}\n</output>"

DEFAULT_MAX_FORMAT_ERRORS = 3

_BLOCK = r"```(?:bash|sh|shell)?[ \t]*\n(.*?)```"


@dataclass
class Action:
    """What the agent wants next: kind is model | exec | submit | format_error | limit.

    A limit carries the failure ``cause`` (agent_limit or format) and a readable ``reason``.
    """

    kind: str
    command: str = ""
    message: str = ""
    reason: str = ""
    cause: str = ""


class _Keep(dict):
    """str.format_map mapping that leaves unknown ``{fields}`` as written."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


class BashAgent:
    """Decides the next action of an episode from its history."""

    default_regex = _BLOCK

    def __init__(self, spec: AgentSpec, *, max_steps: int, max_tokens: int | None = None):
        self.spec = spec
        self.max_steps = spec.max_steps or max_steps
        self.max_tokens = spec.max_tokens or max_tokens
        self.max_format_errors = spec.max_format_errors or DEFAULT_MAX_FORMAT_ERRORS
        self.regex = re.compile(spec.action_regex or self.default_regex, re.DOTALL)

    # --- templates -----------------------------------------------------------------------------
    def render(self, template: str, **values: Any) -> str:
        try:
            return template.format_map(_Keep(values))
        except (ValueError, IndexError, AttributeError, KeyError):  # stray braces: show the template as is
            return template

    def initial_messages(self, task: TaskSpec) -> list[dict[str, Any]]:
        values = {"submit_word": self.spec.submit_word, "problem_statement": task.problem_statement,
                  "task": task.problem_statement, "workdir": task.workdir, "task_id": task.task_id}
        system = self.render(self.spec.system_template or SYSTEM_TEMPLATE, **values)
        user = self.render(self.spec.instance_template or INSTANCE_TEMPLATE, **values)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def observation(self, exit_code: int | None, output: str, timed_out: bool, command: str = "") -> str:
        """The user message that reports a command's result to the model."""
        if timed_out:
            return self.render(self.spec.timeout_template or TIMEOUT_TEMPLATE, output=output, command=command,
                               exit_code=exit_code)
        return self.render(self.spec.action_observation_template or OBSERVATION_TEMPLATE, exit_code=exit_code,
                           output=output, command=command)

    def format_error(self, actions: list[str]) -> str:
        return self.render(self.spec.format_error_template or FORMAT_ERROR, submit_word=self.spec.submit_word,
                           n_actions=len(actions))

    # --- decisions -----------------------------------------------------------------------------
    def actions(self, reply: str) -> list[str]:
        return [a.strip() for a in self.regex.findall(reply)]

    def parse(self, reply: str) -> Action:
        """The action a model reply asks for."""
        if self.spec.submit_word in reply:
            return Action("submit")
        return self._one_action(reply)

    def _one_action(self, reply: str) -> Action:
        actions = self.actions(reply)
        if len(actions) == 1 and actions[0]:
            return Action("exec", command=actions[0])
        return Action("format_error", message=self.format_error(actions))

    def submitted(self, record: dict[str, Any]) -> bool:
        """Whether an observation record means the agent submitted (never, for the bash agent)."""
        return False

    def decide(self, history: list[dict[str, Any]], *, tokens_used: int = 0, model_calls: int | None = None,
               format_streak: int | None = None) -> Action:
        """Next action: the model when the last message is the user's, else what the reply says.

        Every path that leads to another model call (including a format-error reply) checks the
        step and token limits first; the ``max_format_errors``-th bad reply in a row ends the episode.
        ``model_calls`` and ``format_streak`` (the episode's counters) let a caller pass only the
        history's last record; without them they are counted from the history.
        """
        if history and history[-1].get("role") == "assistant":
            action = self.parse(str(history[-1].get("content", "")))
            if action.kind != "format_error":
                return action
            errors = (format_errors_in_a_row(history) if format_streak is None else format_streak) + 1
            if errors >= self.max_format_errors:
                return Action("limit", cause=states.CAUSE_FORMAT,
                              reason=f"format error limit reached ({errors} replies in a row without one action)")
            return self._limit(history, tokens_used, model_calls) or action
        last = history[-1] if history else {}
        if last.get("kind") == "observation" and self.submitted(last):
            return Action("submit")
        return self._limit(history, tokens_used, model_calls) or Action("model")

    def _limit(self, history: list[dict[str, Any]], tokens_used: int, model_calls: int | None) -> Action | None:
        """The limit another model call would break, if any."""
        calls = sum(1 for m in history if m.get("role") == "assistant") if model_calls is None else model_calls
        if calls >= self.max_steps:
            return Action("limit", cause=states.CAUSE_AGENT_LIMIT,
                          reason=f"step limit reached ({self.max_steps} model calls)")
        if self.max_tokens is not None and tokens_used >= self.max_tokens:
            return Action("limit", cause=states.CAUSE_AGENT_LIMIT,
                          reason=f"token limit reached ({tokens_used} >= {self.max_tokens})")
        return None


def format_errors_in_a_row(history: list[dict[str, Any]]) -> int:
    """How many format-error replies the history holds since the last good action."""
    n = 0
    for rec in reversed(history):
        if rec.get("role") == "assistant":
            continue
        if rec.get("kind") == "format_error":
            n += 1
        else:
            break
    return n


def observation(exit_code: int | None, output: str, timed_out: bool) -> str:
    """The default user message that reports a command's result to the model."""
    if timed_out:
        return TIMEOUT_TEMPLATE.format(output=output)
    return OBSERVATION_TEMPLATE.format(exit_code=exit_code, output=output)
