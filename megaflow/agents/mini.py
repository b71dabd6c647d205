"""mini-swe-agent compatible mode: its YAML agent configs, Jinja2 templates and action format.

``load_mini_config(path_or_dict)`` turns a mini-swe-agent config (v1: every template under
``agent:``; v2: observation/format-error templates and ``action_regex`` under ``model:``,
``cwd``/``timeout``/``env`` under ``environment:``) into MegaFlow's agent, model and workdir
settings. ``MiniAgent`` then behaves like mini-swe-agent's DefaultAgent, one step at a time: one
fenced command per reply, a format-error reply otherwise, and a command whose output starts with
``COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`` (or the older ``MINI_SWE_AGENT_FINAL_OUTPUT``) submits.
mini-swe-agent itself is not needed; Jinja2 is imported only when a mini agent renders.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaflow.agents.bash import BashAgent
from megaflow.core.errors import SpecError

SUBMIT_MARKERS = ("COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT", "MINI_SWE_AGENT_FINAL_OUTPUT")

# Accepts both the v1 fence (```bash) and the v2 one (```mswea_bash_command).
DEFAULT_ACTION_REGEX = r"```(?:bash|mswea_bash_command)\s*\n(.*?)\n```"

SYSTEM_TEMPLATE = "You are a helpful assistant that can interact with a computer shell."
INSTANCE_TEMPLATE = (
    "Your task: {{task}}\n\nReply with exactly one shell command in a ```bash code block per message. "
    "When you are done, run `echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT` on its own."
)
OBSERVATION_TEMPLATE = "<returncode>{{output.returncode}}</returncode>\n<output>\n{{output.output}}\n</output>"
FORMAT_ERROR_TEMPLATE = ("Please always provide EXACTLY ONE action in triple backticks, "
                         "found {{actions|length}} actions.")
TIMEOUT_TEMPLATE = (
    "The last command <command>{{action['action']}}</command> timed out and has been killed.\n"
    "The output of the command was:\n<output>\n{{output}}\n</output>\n"
    "Please try another command and make sure to avoid those requiring interactive input."
)

_TEMPLATES = ("system_template", "instance_template", "action_observation_template", "format_error_template",
              "timeout_template", "action_regex")


@dataclass
class MiniConfig:
    """A mini-swe-agent config mapped onto a task spec: ``agent`` and ``model`` sections, workdir."""

    agent: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    workdir: str | None = None
    ignored: list[str] = field(default_factory=list)


def load_mini_config(source: str | Path | dict[str, Any]) -> MiniConfig:
    """Read a mini-swe-agent YAML config (path or already-parsed dict) into a MiniConfig."""
    if isinstance(source, dict):
        data = source
    else:
        import yaml

        path = Path(source)
        if not path.exists():
            path = _packaged_config(str(source)) or path
        if not path.exists():
            raise SpecError(f"agent config {source}: no such file (nor a config shipped with mini-swe-agent, "
                            "if installed)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SpecError(f"agent config {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise SpecError("agent config: must be a mapping with an 'agent' section", field="agent")
    agent_in = dict(data.get("agent") or {})
    model_in = dict(data.get("model") or {})
    env_in = dict(data.get("environment") or {})
    ignored: list[str] = []
    agent: dict[str, Any] = {"type": "mini"}
    for name in _TEMPLATES:
        for section in (agent_in, model_in, env_in):
            if section.get(name):
                agent[name] = section.pop(name)
                break
    if "action_observation_template" not in agent:  # v2 textbased models call it observation_template
        for section in (model_in, env_in, agent_in):
            if section.get("observation_template"):
                agent["action_observation_template"] = section.pop("observation_template")
                break
    step_limit = agent_in.pop("step_limit", 0) or 0
    if float(step_limit) > 0:
        agent["max_steps"] = int(step_limit)
    if env_in.get("timeout"):
        agent["command_timeout_s"] = float(env_in.pop("timeout"))
    if env_in.get("env"):
        agent["env"] = {str(k): str(v) for k, v in env_in.pop("env").items()}
    for key in ("max_tokens", "wall_time_s", "max_format_errors"):  # MegaFlow extensions, if present
        if key in agent_in:
            agent[key] = agent_in.pop(key)
    # Left over: cost_limit (no prices here; use max_tokens), interactive-mode keys, class names.
    ignored += [f"agent.{k}" for k in agent_in]
    model: dict[str, Any] = {}
    if model_in.get("model_name"):
        model["model_name"] = model_in.pop("model_name")
    for key, value in (model_in.pop("model_kwargs", None) or {}).items():
        if key in ("temperature", "top_p", "max_tokens", "seed", "stop"):
            model[key] = value
        else:
            ignored.append(f"model.model_kwargs.{key}")
    ignored += [f"model.{k}" for k in model_in]
    workdir = env_in.pop("cwd", None) or None
    ignored += [f"environment.{k}" for k in env_in]
    return MiniConfig(agent=agent, model=model, workdir=workdir, ignored=sorted(ignored))


def _packaged_config(name: str) -> Path | None:
    """A config shipped with mini-swe-agent (e.g. ``swebench`` or ``extra/swebench.yaml``), when installed."""
    try:
        import minisweagent  # optional: only its YAML files are read
    except ImportError:
        return None
    base = Path(minisweagent.__file__).parent / "config"
    for folder in ("", "extra", "benchmarks"):
        for candidate in (name, f"{name}.yaml"):
            path = base / folder / candidate
            if path.is_file():
                return path
    return None


class MiniAgent(BashAgent):
    """mini-swe-agent's DefaultAgent, step by step: Jinja2 templates, output-marker submission."""

    default_regex = DEFAULT_ACTION_REGEX

    def render(self, template: str, **values: Any) -> str:
        import jinja2

        env = jinja2.Environment(undefined=jinja2.Undefined, keep_trailing_newline=True)
        config = {"step_limit": self.spec.max_steps or 0, "cost_limit": 0.0,
                  "system": "Linux", "release": "", "version": "", "machine": platform.machine()}
        try:
            return env.from_string(template).render(**config, **values)
        except jinja2.TemplateError as exc:
            raise SpecError(f"agent template does not render: {exc}", field="agent") from None

    def initial_messages(self, task) -> list[dict[str, Any]]:
        values = {"task": task.problem_statement, "problem_statement": task.problem_statement,
                  "workdir": task.workdir, "cwd": task.workdir, "task_id": task.task_id}
        return [{"role": "system", "content": self.render(self.spec.system_template or SYSTEM_TEMPLATE, **values)},
                {"role": "user", "content": self.render(self.spec.instance_template or INSTANCE_TEMPLATE, **values)}]

    def observation(self, exit_code: int | None, output: str, timed_out: bool, command: str = "") -> str:
        if timed_out:
            return self.render(self.spec.timeout_template or TIMEOUT_TEMPLATE, action={"action": command},
                               output=output)
        out = {"returncode": exit_code, "output": output, "exception_info": ""}
        return self.render(self.spec.action_observation_template or OBSERVATION_TEMPLATE, output=out)

    def format_error(self, actions: list[str]) -> str:
        return self.render(self.spec.format_error_template or FORMAT_ERROR_TEMPLATE, actions=actions)

    def parse(self, reply: str):
        return self._one_action(reply)

    def submitted(self, record: dict[str, Any]) -> bool:
        lines = str(record.get("output_head") or "").splitlines()
        return bool(lines) and lines[0].strip() in SUBMIT_MARKERS
