"""Task specs: what a user submits for one episode, validated before anything is enqueued."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from megaflow.core import guards
from megaflow.core.errors import SpecError

SUBMIT_WORD = "MEGAFLOW_SUBMIT"


class ModelSpec(BaseModel):
    """Which model answers this episode: an open section. ``backend`` names the backend (a short name
    or a dotted path); every other key is the backend's own config, validated by that backend
    (``megaflow.model_gateway.validate_model_section``, at submit and again at run time)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    backend: str | None = Field(
        None,
        description="Backend name (scripted, openai) or a dotted path to a user's "
        "backend class; default: settings.model_backend.",
    )
    replies: list[Any] | None = Field(
        None,
        description="Replies replayed in order by the scripted backend "
        "(strings, or assistant messages with tool_calls).",
    )

    # --- bad input (issue 17): model options finite and in range (megaflow.core.guards) ----------
    @model_validator(mode="after")
    def _guard_options(self) -> ModelSpec:
        guards.model_options(dict(self.model_extra or {}))
        return self


class AgentSpec(BaseModel):
    """Which agent runs the episode and how: its type, its own config and its limits.

    ``type`` is a registered agent (``bash``, ``mini_swe_agent``; see megaflow.agents.base.REGISTRY)
    or a dotted path to a user's class (``mypkg.agents:MyAgent``); it is checked against the
    registry at submit (megaflow.agents.validate_agent_section), since core cannot import agents.
    ``config`` is the agent's own configuration (for ``mini_swe_agent``: a mini-swe-agent YAML
    config's ``agent`` / ``model`` / ``environment`` sections). The template, action and limit fields
    below are the ``bash`` agent's (Python ``str.format`` templates).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: str = Field("bash", min_length=1, description="Agent type: a registered name or mypkg.module:Class.")
    config: dict[str, Any] = Field(default_factory=dict, description="The agent's own config (validated by it).")
    max_steps: int | None = Field(None, ge=1, description="Model calls allowed; default settings.max_steps.")
    max_tokens: int | None = Field(None, ge=1, description="Total prompt+completion tokens allowed.")
    wall_time_s: float | None = Field(
        None, gt=0, description="Agent wall-time budget; default settings.episode_budget_s."
    )
    max_format_errors: int | None = Field(
        None, ge=1, description="Format errors in a row that end the episode (cause 'format'); default 3."
    )
    submit_word: str = Field(SUBMIT_WORD, min_length=3, description="A reply containing this word submits (bash).")
    system_template: str | None = Field(None, description="System prompt; {submit_word} is filled in.")
    instance_template: str | None = Field(None, description="First user message; {problem_statement} is filled in.")
    action_observation_template: str | None = Field(
        None, description="User message reporting a command's result (fields: exit_code, output, command)."
    )
    format_error_template: str | None = Field(None, description="Reply to a model message without exactly one action.")
    timeout_template: str | None = Field(None, description="User message after a command timed out.")
    action_regex: str | None = Field(None, description="Regex whose one group is the command (DOTALL).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of every command.")
    command_timeout_s: float | None = Field(
        None, gt=0, description="Per-command limit; default settings.command_timeout_s."
    )

    @field_validator("type")
    @classmethod
    def _type_shape(cls, v: str) -> str:
        import re

        if not re.match(r"^[A-Za-z_][\w.]*([:.][A-Za-z_]\w*)?$", v):
            raise ValueError(
                "must be a registered agent name (bash, mini_swe_agent, ...) or a dotted path "
                "to a class (mypkg.agents:MyAgent)"
            )
        return v

    @field_validator("action_regex")
    @classmethod
    def _one_group(cls, v: str | None) -> str | None:
        if v is not None:
            import re

            try:
                groups = re.compile(v).groups
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
            if groups != 1:
                raise ValueError("must have exactly one capturing group (the command)")
        return v

    # --- bad input (issue 17): limits in range, a safe environment (megaflow.core.guards) --------
    @field_validator("max_steps", "max_tokens", "wall_time_s", "max_format_errors", "command_timeout_s")
    @classmethod
    def _guard_limits(cls, v: float | None, info: ValidationInfo) -> float | None:
        guards.bounded(v, *guards.SPEC_BOUNDS[str(info.field_name)], "value")
        return v

    @field_validator("env")
    @classmethod
    def _guard_env(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            guards.env_var(name, value)
        return v

    @field_validator("submit_word")
    @classmethod
    def _guard_word(cls, v: str) -> str:
        return guards.plain_text(v, 200)


class EvalSpec(BaseModel):
    """How the episode is scored.

    Plain: ``command``'s exit code gives the reward (0 -> 1.0). SWE-bench style (when
    ``fail_to_pass`` or ``pass_to_pass`` is given): apply ``test_patch``, run ``command`` with the
    listed tests, parse per-test results; reward 1.0 when resolved (see megaflow.services.evaluation).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    command: str = Field(
        ...,
        min_length=1,
        description="Shell command run in the container after submit "
        "(SWE-bench style: the test runner; tests are appended "
        "or fill a {tests} placeholder).",
    )
    timeout_s: float | None = Field(None, gt=0, description="Default settings.eval_timeout_s.")
    files: dict[str, str] = Field(default_factory=dict, description="Files written just before evaluation (tests).")
    test_patch: str | None = Field(None, description="Diff applied (git apply) before the tests run.")
    fail_to_pass: list[str] = Field(default_factory=list, description="Tests that must pass after the fix.")
    pass_to_pass: list[str] = Field(default_factory=list, description="Tests that must keep passing.")
    log_parser: Literal["auto", "unittest", "pytest"] = Field("auto", description="How test output is read.")
    fresh_container: bool = Field(False, description="Evaluate the agent's patch in a fresh container.")

    @property
    def swebench(self) -> bool:
        return bool(self.fail_to_pass or self.pass_to_pass)

    # --- bad input (issue 17): commands, paths, test ids and limits (megaflow.core.guards) --------
    @field_validator("command")
    @classmethod
    def _guard_command(cls, v: str) -> str:
        return guards.command(v)

    @field_validator("timeout_s")
    @classmethod
    def _guard_timeout(cls, v: float | None) -> float | None:
        guards.bounded(v, *guards.SPEC_BOUNDS["timeout_s"], "value")
        return v

    @field_validator("files")
    @classmethod
    def _guard_files(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            guards.container_path(path, "file path", file=True)
        return v

    @field_validator("fail_to_pass", "pass_to_pass")
    @classmethod
    def _guard_tests(cls, v: list[str]) -> list[str]:
        for test in v:
            guards.plain_text(test, 4096, "test id")
        return v


class TaskSpec(BaseModel):
    """One episode: an image, files and set-up, a problem, a model, an agent and an evaluation."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task_id: str = Field(..., min_length=1, max_length=200, description="The task's name (instance id).")
    image: str | None = Field(None, description="Container image; default settings.default_image.")
    mode: Literal["ephemeral", "persistent"] | None = Field(None, description="Default settings.env_mode.")
    network: bool = Field(False, description="Give the container a network (off by default).")
    workdir: str = Field("/repo", description="Working directory of every command.")
    user: str | None = Field(
        None,
        pattern=r"^(root|[0-9]{1,9}(:[0-9]{1,9})?)$",
        description="Who commands run as: 'root' (images whose repository is root-owned, e.g. SWE-bench's "
        "/testbed) or 'UID[:GID]'; default settings.container_user (unprivileged).",
    )
    files: dict[str, str] = Field(default_factory=dict, description="Absolute path -> text written before set-up.")
    setup: list[str] = Field(default_factory=list, description="Shell commands run after the files are written.")
    problem_statement: str = Field("", description="What the agent must do.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    agent: AgentSpec = Field(default_factory=AgentSpec)
    eval: EvalSpec
    policy_version: str | None = Field(None, description="Policy/model version tag recorded with each call.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form, kept on the record.")

    @field_validator("files")
    @classmethod
    def _absolute(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            guards.container_path(path, "file path", file=True)
        return v

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, v: str) -> str:
        return guards.container_path(v, "workdir")

    # --- bad input (issue 17): safe ids and names, plain commands, bounded metadata --------------
    @field_validator("task_id")
    @classmethod
    def _guard_task_id(cls, v: str) -> str:
        return guards.named(v, guards.TASK_ID, guards.TASK_ID_RULE)

    @field_validator("image")
    @classmethod
    def _guard_image(cls, v: str | None) -> str | None:
        return None if v is None else guards.image_ref(v)

    @field_validator("setup")
    @classmethod
    def _guard_setup(cls, v: list[str]) -> list[str]:
        for i, cmd in enumerate(v):
            guards.command(cmd, f"setup[{i}]")
        return v

    @field_validator("policy_version")
    @classmethod
    def _guard_version(cls, v: str | None) -> str | None:
        return None if v is None else guards.plain_text(v, 200)

    @field_validator("metadata")
    @classmethod
    def _guard_metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        problem = guards.json_problem(v, max_depth=guards.MAX_DEPTH - 1)
        if problem:
            path, what = problem
            raise guards.field_error(path[:3], f"{guards.dotted(('metadata', *path))} {what}")
        return v


def _describe(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(spec)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check the spelling (allowed: see megaflow.core.spec.TaskSpec)"
    elif err["type"] == "missing":
        msg = "required field is missing; add it"
    return field, msg


def validate_specs(specs: Iterable[dict[str, Any] | TaskSpec]) -> list[TaskSpec]:
    """Validate every spec; the first bad one raises SpecError naming its index and field."""
    out: list[TaskSpec] = []
    for i, raw in enumerate(specs):
        if isinstance(raw, TaskSpec):
            out.append(raw)
            continue
        if not isinstance(raw, dict):
            raise SpecError(f"must be a JSON object, got {type(raw).__name__}", index=i)
        problem = guards.json_problem(raw)  # before pydantic: no RecursionError, NaN or bad Unicode gets in
        if problem:
            path, what = problem
            field = ".".join(str(p) for p in path[: 2 if path and path[0] in ("model", "agent", "eval") else 1])
            field = field or "(spec)"
            raise SpecError(f"field '{field}': {guards.dotted(path) or 'the spec'} {what}", index=i, field=field)
        try:
            spec = TaskSpec.model_validate(raw)
        except ValidationError as exc:
            field, msg = _describe(exc)
            raise SpecError(f"field '{field}': {msg}", index=i, field=field) from None
        if spec.model.backend in (None, "scripted") and spec.model.replies is not None and not spec.model.replies:
            raise SpecError(
                "field 'model.replies': the scripted backend needs at least one reply", index=i, field="model.replies"
            )
        out.append(spec)
    if not out:
        raise SpecError("no specs given: submit at least one task")
    return out
