"""The bash agent: one shell command per model reply; a reply with the submit word ends the episode.

It is stepped (megaflow.agents.base): ``decide(ctx)`` looks at the newest history record (a model
reply or a command's raw result) and says what happens next; its only state is the count of
format errors in a row. Prompts, action format and limits come from the task's AgentSpec;
templates are Python ``str.format`` strings (unknown fields stay as written).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megaflow.agents.base import END, EXEC, MODEL, SUBMIT, AgentBase, Decision, StepContext
from megaflow.core import states
from megaflow.core.errors import SpecError
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
    """What a model reply asks for: kind is exec | submit | format_error."""

    kind: str
    command: str = ""
    message: str = ""


class _Keep(dict):
    """str.format_map mapping that leaves unknown ``{fields}`` as written."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


class BashAgent(AgentBase):
    """MegaFlow's own agent: decides an episode's next move from its newest history record."""

    default_regex = _BLOCK
    inline = True  # a regex over the newest record: cheap enough to run in the model/env step (agent_inline)

    def __init__(self, spec: AgentSpec, settings: Any = None):
        super().__init__(spec, settings)
        self.max_steps = spec.max_steps or getattr(settings, "max_steps", None) or 50
        self.max_tokens = spec.max_tokens
        self.max_format_errors = spec.max_format_errors or DEFAULT_MAX_FORMAT_ERRORS
        self.regex = re.compile(spec.action_regex or self.default_regex, re.DOTALL)

    @classmethod
    def validate_section(cls, section: dict[str, Any]) -> dict[str, Any]:
        if section.get("config"):
            raise SpecError(
                "field 'agent.config': the bash agent takes no config; set its agent.* fields "
                "(system_template, max_steps, ...) instead",
                field="agent.config",
            )
        return section

    # --- templates -----------------------------------------------------------------------------
    def render(self, template: str, **values: Any) -> str:
        try:
            return template.format_map(_Keep(values))
        except (ValueError, IndexError, AttributeError, KeyError):  # stray braces: show the template as is
            return template

    def initial_messages(self, task: TaskSpec) -> list[dict[str, Any]]:
        values = {
            "submit_word": self.spec.submit_word,
            "problem_statement": task.problem_statement,
            "task": task.problem_statement,
            "workdir": task.workdir,
            "task_id": task.task_id,
        }
        system = self.render(self.spec.system_template or SYSTEM_TEMPLATE, **values)
        user = self.render(self.spec.instance_template or INSTANCE_TEMPLATE, **values)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def observation(self, exit_code: int | None, output: str, timed_out: bool, command: str = "") -> str:
        """The user message that reports a command's result to the model."""
        if timed_out:
            return self.render(
                self.spec.timeout_template or TIMEOUT_TEMPLATE, output=output, command=command, exit_code=exit_code
            )
        return self.render(
            self.spec.action_observation_template or OBSERVATION_TEMPLATE,
            exit_code=exit_code,
            output=output,
            command=command,
        )

    def format_error(self, actions: list[str]) -> str:
        return self.render(
            self.spec.format_error_template or FORMAT_ERROR, submit_word=self.spec.submit_word, n_actions=len(actions)
        )

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

    # --- the step ------------------------------------------------------------------------------
    def decide(self, ctx: StepContext) -> Decision:
        """Start (prompts), react to a reply (run, submit, or a format error) or to a command's result.

        Every path to another model call checks the step and token limits first; the
        ``max_format_errors``-th bad reply in a row ends the episode (cause ``format``).
        """
        streak = int(ctx.state.get("format_streak", 0))
        if ctx.first:
            return self._to_model(ctx, self.initial_messages(ctx.task), {"format_streak": 0})
        last = ctx.last
        if last.get("role") == "assistant":
            action = self.parse(str(last.get("content") or ""))
            if action.kind == "exec":
                return Decision(
                    EXEC, exec={"command": action.command, **self.exec_options(ctx.task)}, state={"format_streak": 0}
                )
            if action.kind == "submit":
                return Decision(SUBMIT, state={"format_streak": 0})
            streak += 1
            record: dict[str, Any] = {"role": "user", "content": action.message, "kind": "format_error"}
            if streak >= self.max_format_errors:
                return Decision(
                    END,
                    records=[record],
                    outcome=states.FAILED,
                    cause=states.CAUSE_FORMAT,
                    reason=f"format error limit reached ({streak} replies in a row without one action)",
                )
            return self._to_model(ctx, [record], {"format_streak": streak}, incr={"format_errors": 1})
        if last.get("kind") == "exec":
            text = self.observation(
                last.get("exit_code"),
                str(last.get("output") or ""),
                bool(last.get("timed_out")),
                str(last.get("command") or ""),
            )
            record = {
                "role": "user",
                "content": text,
                "kind": "observation",
                "exit_code": last.get("exit_code"),
                "timed_out": bool(last.get("timed_out")),
            }
            return self._to_model(ctx, [record], {"format_streak": 0})
        return self._to_model(ctx, [], {"format_streak": streak})

    def exec_options(self, task: TaskSpec) -> dict[str, Any]:
        """Per-command options the env step honours (time limit, variables)."""
        out: dict[str, Any] = {}
        if self.spec.command_timeout_s:
            out["timeout"] = self.spec.command_timeout_s
        if self.spec.env:
            out["env"] = dict(self.spec.env)
        return out

    def _to_model(
        self,
        ctx: StepContext,
        records: list[dict[str, Any]],
        state: dict[str, Any],
        incr: dict[str, float] | None = None,
    ) -> Decision:
        """Another model call, unless a limit says stop (then the records still land in the history)."""
        calls = int(ctx.counters.get("model_calls", 0))
        tokens = int(ctx.counters.get("prompt_tokens", 0) + ctx.counters.get("completion_tokens", 0))
        if calls >= self.max_steps:
            return Decision(
                END,
                records=records,
                outcome=states.FAILED,
                cause=states.CAUSE_AGENT_LIMIT,
                reason=f"step limit reached ({self.max_steps} model calls)",
            )
        if self.max_tokens is not None and tokens >= self.max_tokens:
            return Decision(
                END,
                records=records,
                outcome=states.FAILED,
                cause=states.CAUSE_AGENT_LIMIT,
                reason=f"token limit reached ({tokens} >= {self.max_tokens})",
            )
        return Decision(MODEL, records=records, state=state, incr=dict(incr or {}))


def observation(exit_code: int | None, output: str, timed_out: bool) -> str:
    """The default user message that reports a command's result to the model."""
    if timed_out:
        return TIMEOUT_TEMPLATE.format(output=output)
    return OBSERVATION_TEMPLATE.format(exit_code=exit_code, output=output)
