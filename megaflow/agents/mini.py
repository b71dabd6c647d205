"""mini-swe-agent configs on MegaFlow: loading them and checking every key at submit.

A config (mini's YAML layout: ``agent``, ``model``, ``environment``) becomes the agent section
``{"type": "mini_swe_agent", "config": {...}}``, run by megaflow.agents.mini_stepped. Every key is
honoured, or superseded by MegaFlow with a note kept in the trajectory (``SUPERSEDED``: how a
sandbox is started, interactive-mode keys; MegaFlow runs unattended, like ``mini-extra swebench``),
or rejected at submit with a message naming it. mini-swe-agent is an optional dependency
(``pip install 'megaflow[mini]'``); it is imported only when a mini config is used.

How keys map: ``agent.*`` limits and templates run in mini's own DefaultAgent; ``model.*`` in
mini's model class (``model_class``, default litellm: tool calls), whose ``model_kwargs`` and
bash tool become the episode's model-request options; ``environment.timeout`` / ``env`` / ``cwd``
(unset: the task's workdir) go with every command; ``interpreter`` wraps it (docker-like
classes; mini's local class runs through /bin/sh); ``environment_class`` also decides the
time-out message and the template variables, as in mini.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaflow.core.errors import SpecError

SUBMIT_MARKER = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"

AGENT_KEYS = {
    "system_template",
    "instance_template",
    "step_limit",
    "cost_limit",
    "wall_time_limit_seconds",
    "max_consecutive_format_errors",
    "agent_class",
}
MODEL_KEYS = {
    "model_name",
    "model_class",
    "model_kwargs",
    "observation_template",
    "format_error_template",
    "action_regex",
    "multimodal_regex",
    "set_cache_control",
    "cost_tracking",
    "litellm_model_registry",
}
ENV_KEYS = {"cwd", "timeout", "env", "interpreter", "environment_class", "forward_env"}

# Keys MegaFlow replaces with its own machinery; accepted, and listed in a note record of the episode.
SUPERSEDED = {
    "agent": {
        "mode": "no human in the loop: MegaFlow runs mini's DefaultAgent unattended (yolo)",
        "whitelist_actions": "no human in the loop (interactive agent only)",
        "confirm_exit": "no human in the loop (interactive agent only)",
    },
    "model": {"provider": "requests go through MegaFlow's model gateway (the task's model section)"},
    "environment": {
        k: "the sandbox is the episode's container on a MegaFlow env host (limits from settings)"
        for k in (
            "executable",
            "run_args",
            "container_timeout",
            "pull_timeout",
            "startup_timeout",
            "runtime_timeout",
            "deployment_timeout",
            "install_pipx",
            "modal_sandbox_kwargs",
            "sandbox_build_retries",
            "global_args",
            "exec_args",
            "wrapper_args",
        )
    },
}
REJECTED = {
    ("agent", "output_path"): "MegaFlow stores every trajectory as an artifact (a result's artifact_uri); remove it",
    ("environment", "image"): "set the task's image field instead",
    ("model", "outputs"): "scripted replies belong in the task's model section (backend: scripted, replies)",
}
# model_kwargs that pick an endpoint or credentials: MegaFlow's gateway owns those.
ENDPOINT_KWARGS = {
    "api_base",
    "base_url",
    "api_key",
    "api_version",
    "custom_llm_provider",
    "organization",
    "extra_headers",
    "headers",
    "timeout",
    "num_retries",
}
CONSUMED_KWARGS = {"drop_params"}  # litellm-only: MegaFlow's gateway never adds parameters a server lacks

ENV_CLASSES = {
    "docker",
    "local",
    "singularity",
    "swerex_docker",
    "swerex_modal",
    "bubblewrap",
    "contree",
    "minisweagent.environments.docker.DockerEnvironment",
    "minisweagent.environments.local.LocalEnvironment",
}
TEXT_MODEL_CLASSES = {"litellm_textbased", "openrouter_textbased"}
TOOL_MODEL_CLASSES = {"litellm", "openrouter", "requesty", "portkey"}
UNSTEPPABLE_MODEL_CLASSES = {
    "litellm_response": "speaks the Responses API; MegaFlow's gateway speaks chat completions",
    "openrouter_response": "speaks the Responses API; MegaFlow's gateway speaks chat completions",
    "portkey_response": "speaks the Responses API; MegaFlow's gateway speaks chat completions",
    "deterministic": "scripted replies belong in the task's model section (backend: scripted)",
}


def import_mini() -> Any:
    """Import mini-swe-agent quietly and offline (no banner, no cost-map download), or explain how to get it."""
    os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import minisweagent
    except ImportError:
        raise SpecError(
            "field 'agent.type': the mini_swe_agent agent needs mini-swe-agent; pip install 'megaflow[mini]'",
            field="agent.type",
        ) from None
    return minisweagent


@dataclass
class MiniConfig:
    """A mini-swe-agent config as MegaFlow task-spec pieces: the agent section, model hints, workdir."""

    agent: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    workdir: str | None = None


def load_mini_config(source: str | Path | dict[str, Any]) -> MiniConfig:
    """A mini-swe-agent YAML config (a path, a name mini ships such as ``swebench``, or a parsed dict)."""
    if isinstance(source, dict):
        data = source
    else:
        import yaml

        path = Path(source)
        if not path.exists():
            path = packaged_config(str(source)) or path
        if not path.exists():
            raise SpecError(f"agent config {source}: no such file (nor a config shipped with mini-swe-agent)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SpecError(f"agent config {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise SpecError("agent config: must be a mapping with agent / model / environment sections", field="agent")
    env = data.get("environment") or {}
    return MiniConfig(
        agent={"type": "mini_swe_agent", "config": data}, workdir=env.get("cwd") if isinstance(env, dict) else None
    )


def packaged_config(name: str) -> Path | None:
    """A config shipped with mini-swe-agent (``mini``, ``swebench``, ``benchmarks/swebench.yaml``), if installed."""
    try:
        base = Path(import_mini().__file__).parent / "config"
    except SpecError:
        return None
    for folder in ("", "extra", "benchmarks"):
        for candidate in (name, f"{name}.yaml"):
            path = base / folder / candidate
            if path.is_file():
                return path
    return None


def shipped_configs() -> list[Path]:
    """Every YAML config mini-swe-agent ships."""
    base = Path(import_mini().__file__).parent / "config"
    return sorted(base.rglob("*.yaml"))


def _fail(key: str, msg: str) -> SpecError:
    return SpecError(f"field 'agent.config.{key}': {msg}", field=f"agent.config.{key}")


def _check_template(key: str, text: Any) -> None:
    import jinja2

    if not isinstance(text, str):
        raise _fail(key, "must be a string (a Jinja2 template)")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise _fail(key, f"not a valid Jinja2 template: {exc} (line {exc.lineno})") from None


def config_notes(config: dict[str, Any]) -> list[str]:
    """Keys a config sets that MegaFlow supersedes or mini itself does not use, each with the reason."""
    notes = [
        f"{section}.{key}: {why}"
        for section, keys in SUPERSEDED.items()
        for key, why in keys.items()
        if key in (config.get(section) or {})
    ]
    model, agent = config.get("model") or {}, config.get("agent") or {}
    cls = model_class_name(model)
    if cls in TOOL_MODEL_CLASSES:
        if "action_regex" in model:
            notes.append(
                f"model.action_regex: not used by model_class {cls!r} (tool calls), as in mini itself; "
                "set model_class: litellm_textbased to parse actions from text"
            )
        prompts = str(agent.get("system_template", "")) + str(agent.get("instance_template", ""))
        if "mswea_bash_command" in prompts:
            notes.append(
                f"model.model_class: {cls!r} (tool calls, mini's default) while the prompts ask for text "
                "actions; mini users pass --model-class litellm_textbased for such configs"
            )
    env = config.get("environment") or {}
    if "interpreter" in env and env.get("environment_class") in (
        "local",
        "minisweagent.environments.local.LocalEnvironment",
    ):
        notes.append(
            "environment.interpreter: not used by mini's LocalEnvironment (commands run through /bin/sh), "
            "as in mini itself"
        )
    kwargs = model.get("model_kwargs") or {}
    notes += [
        f"model.model_kwargs.{k}: litellm-only, not needed by MegaFlow's gateway"
        for k in CONSUMED_KWARGS
        if k in kwargs
    ]
    return notes


def model_class_name(model: dict[str, Any]) -> str:
    """The model class mini would pick: ``model_class`` if set, else litellm (tool calls)."""
    return str(model.get("model_class") or "litellm")


def validate_mini_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check every key of a mini config (honoured, superseded or rejected); return it unchanged."""
    import_mini()
    from minisweagent.agents.default import AgentConfig
    from pydantic import ValidationError

    if not isinstance(config, dict):
        raise _fail("", "must be a mapping with agent / model / environment sections")
    for section in config:
        if section not in ("agent", "model", "environment"):
            raise _fail(
                section,
                "unknown section; a mini-swe-agent config has agent, model and environment "
                "(run-time options of mini's CLI have no place in a task spec)",
            )
    sections = {name: config.get(name) or {} for name in ("agent", "model", "environment")}
    for name, sec in sections.items():
        if not isinstance(sec, dict):
            raise _fail(name, "must be a mapping")
        allowed = {"agent": AGENT_KEYS, "model": MODEL_KEYS, "environment": ENV_KEYS}[name]
        for key in sec:
            if (name, key) in REJECTED:
                raise _fail(f"{name}.{key}", REJECTED[(name, key)])
            if key not in allowed and key not in SUPERSEDED[name]:
                raise _fail(
                    f"{name}.{key}",
                    f"unknown key for mini-swe-agent 2.4's {name} section; remove it or check the spelling",
                )
    agent, model, env = sections["agent"], sections["model"], sections["environment"]
    if agent.get("agent_class", "default") not in ("default", "minisweagent.agents.default.DefaultAgent"):
        raise _fail(
            "agent.agent_class",
            "MegaFlow steps mini's DefaultAgent; other agent classes run their own "
            "loop and cannot be stepped (remove the key)",
        )
    try:
        AgentConfig(**{k: v for k, v in agent.items() if k in AGENT_KEYS - {"agent_class"}})
    except ValidationError as exc:
        raise _fail("agent", _pydantic_message(exc)) from None
    for key in ("system_template", "instance_template"):
        _check_template(f"agent.{key}", agent[key])
    for key in ("observation_template", "format_error_template"):
        if key in model:
            _check_template(f"model.{key}", model[key])
    _check_model(model)
    _check_environment(env)
    return config


def _check_model(model: dict[str, Any]) -> None:
    cls = model_class_name(model)
    if cls in UNSTEPPABLE_MODEL_CLASSES:
        raise _fail("model.model_class", f"{cls!r} {UNSTEPPABLE_MODEL_CLASSES[cls]}")
    if cls not in TEXT_MODEL_CLASSES | TOOL_MODEL_CLASSES:
        model_family(cls)  # raises naming model.model_class when the class cannot be replayed
    kwargs = model.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _fail("model.model_kwargs", "must be a mapping of request parameters")
    for key in kwargs:
        if key in ENDPOINT_KWARGS:
            raise _fail(
                f"model.model_kwargs.{key}",
                "endpoints, credentials, time-outs and retries come from the "
                "task's model section and MegaFlow's settings; remove it",
            )
    if "action_regex" in model:
        import re

        try:
            re.compile(model["action_regex"])
        except (re.error, TypeError) as exc:
            raise _fail("model.action_regex", f"not a valid regular expression: {exc}") from None
    if model.get("set_cache_control") not in (None, "default_end"):
        raise _fail("model.set_cache_control", "must be 'default_end' or null")
    if model.get("cost_tracking", "default") not in ("default", "ignore_errors"):
        raise _fail("model.cost_tracking", "must be 'default' or 'ignore_errors'")


def _check_environment(env: dict[str, Any]) -> None:
    cls = env.get("environment_class", "docker")
    if cls not in ENV_CLASSES:
        raise _fail(
            "environment.environment_class",
            f"{cls!r}: commands run in the episode's container on a "
            f"MegaFlow env host; use one of {sorted(ENV_CLASSES)[:7]}",
        )
    if env.get("forward_env"):
        raise _fail(
            "environment.forward_env",
            "the agent worker's variables are not the submitter's; set the values under environment.env instead",
        )
    if "timeout" in env and (not isinstance(env["timeout"], (int, float)) or env["timeout"] <= 0):
        raise _fail("environment.timeout", "must be a positive number of seconds")
    if not isinstance(env.get("env", {}), dict):
        raise _fail("environment.env", "must be a mapping of variable names to values")
    interp = env.get("interpreter", ["bash", "-lc"])
    if not (isinstance(interp, list) and interp and all(isinstance(a, str) for a in interp)):
        raise _fail("environment.interpreter", "must be a non-empty list of strings, e.g. [bash, -c]")


def _pydantic_message(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        return f"{where}: {err.get('msg')}"
    return str(exc)


# --- model classes (used by the checks here and by megaflow.agents.mini_models) ---------------------
LITELLM, DICT = "litellm", "dict"


def resolve_model_class(name: str) -> type:
    """The class for ``model.model_class`` (a mini short name or a dotted path); portkey parses as litellm."""
    import_mini()
    from minisweagent.models import get_model_class

    if name == "portkey":  # its client library only carries the request, which MegaFlow's gateway makes
        name = "litellm"
    try:
        return get_model_class("", name)
    except ValueError as exc:
        raise SpecError(
            f"field 'agent.config.model.model_class': {exc}", field="agent.config.model.model_class"
        ) from None


def model_family(name: str) -> tuple[str, bool]:
    """(response shape, tool calls?) of a model class; SpecError if MegaFlow cannot replay into it."""
    cls = resolve_model_class(name)
    from minisweagent.models.litellm_model import LitellmModel
    from minisweagent.models.litellm_textbased_model import LitellmTextbasedModel
    from minisweagent.models.openrouter_model import OpenRouterModel
    from minisweagent.models.openrouter_textbased_model import OpenRouterTextbasedModel
    from minisweagent.models.requesty_model import RequestyModel

    textbased = issubclass(cls, (LitellmTextbasedModel, OpenRouterTextbasedModel))
    if issubclass(cls, LitellmModel):
        return LITELLM, not textbased
    if issubclass(cls, (OpenRouterModel, RequestyModel)):
        return DICT, not textbased
    raise SpecError(
        f"field 'agent.config.model.model_class': {name!r} is not one of mini's chat-completion model "
        "families (litellm, openrouter, requesty, or a subclass); MegaFlow cannot feed it replies",
        field="agent.config.model.model_class",
    )
