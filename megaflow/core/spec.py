"""Task specs: what a user submits for one episode, validated before anything is enqueued."""

from __future__ import annotations

from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from megaflow.core.errors import SpecError

SUBMIT_WORD = "MEGAFLOW_SUBMIT"


class ModelSpec(BaseModel):
    """Which model answers this episode. Extra keys (endpoints, temperature, ...) go to the backend."""

    model_config = ConfigDict(extra="allow")

    backend: str | None = Field(None, description="Backend name (scripted, openai); default: settings.model_backend.")
    replies: list[str] | None = Field(None, description="Replies replayed in order by the scripted backend.")


class AgentSpec(BaseModel):
    """Which agent runs the episode and how: its type, its own config and its limits.

    ``type`` is a registered agent (``bash``, ``mini_swe_agent``; see megaflow.agents.base.REGISTRY)
    or a dotted path to a user's class (``mypkg.agents:MyAgent``); it is checked against the
    registry at submit (megaflow.agents.validate_agent_section), since core cannot import agents.
    ``config`` is the agent's own configuration (for ``mini_swe_agent``: a mini-swe-agent YAML
    config's ``agent`` / ``model`` / ``environment`` sections). The template, action and limit fields
    below are the ``bash`` agent's (Python ``str.format`` templates).
    """

    model_config = ConfigDict(extra="forbid")

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


class EvalSpec(BaseModel):
    """How the episode is scored.

    Plain: ``command``'s exit code gives the reward (0 -> 1.0). SWE-bench style (when
    ``fail_to_pass`` or ``pass_to_pass`` is given): apply ``test_patch``, run ``command`` with the
    listed tests, parse per-test results; reward 1.0 when resolved (see megaflow.services.evaluation).
    """

    model_config = ConfigDict(extra="forbid")

    command: str = Field(..., min_length=1, description="Shell command run in the container after submit "
                                                        "(SWE-bench style: the test runner; tests are appended "
                                                        "or fill a {tests} placeholder).")
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


class TaskSpec(BaseModel):
    """One episode: an image, files and set-up, a problem, a model, an agent and an evaluation."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(..., min_length=1, max_length=200, description="The task's name (instance id).")
    image: str | None = Field(None, description="Container image; default settings.default_image.")
    mode: Literal["ephemeral", "persistent"] | None = Field(None, description="Default settings.env_mode.")
    network: bool = Field(False, description="Give the container a network (off by default).")
    workdir: str = Field("/repo", description="Working directory of every command.")
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
            if not path.startswith("/"):
                raise ValueError(f"file path {path!r} must be absolute (start with /)")
        return v

    @field_validator("workdir")
    @classmethod
    def _absolute_workdir(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("workdir must be an absolute path")
        return v


def _describe(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(spec)"
    msg = err["msg"]
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
        try:
            spec = TaskSpec.model_validate(raw)
        except ValidationError as exc:
            field, msg = _describe(exc)
            raise SpecError(f"field '{field}': {msg}", index=i, field=field) from None
        if spec.model.backend in (None, "scripted") and spec.model.replies is not None and not spec.model.replies:
            raise SpecError("field 'model.replies': the scripted backend needs at least one reply", index=i,
                            field="model.replies")
        out.append(spec)
    if not out:
        raise SpecError("no specs given: submit at least one task")
    return out
