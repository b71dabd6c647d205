"""The agent seam: the ``Agent`` protocol, what one step sees and decides, and the agent registry.

An agent is stepped: the agent service calls ``decide(ctx)`` once per event of an episode (its
start, a model reply, a command's result) and applies the ``Decision`` it returns. Whatever the
agent must remember between steps is JSON (``Decision.state``, handed back as ``ctx.state``), so
any agent worker can take any step. Agent types are built-in names (``REGISTRY``) or a dotted path
to a user's class (``mypkg.agents:MyAgent``), imported lazily.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import ValidationError

from megaflow.core.errors import SpecError
from megaflow.core.spec import AgentSpec, TaskSpec

# What the episode does after a step.
MODEL, EXEC, SUBMIT, END = "model", "exec", "submit", "end"
WAIT = "wait"  # an installed agent runs detached in the sandbox: its env host watches it, no slot held
NEXT_KINDS = (MODEL, EXEC, SUBMIT, END, WAIT)

# Built-in agent types -> "module:Class", imported only when an episode (or a submit) uses them.
REGISTRY: dict[str, str] = {
    "bash": "megaflow.agents.bash:BashAgent",
    "mini_swe_agent": "megaflow.agents.mini_stepped:MiniSweAgent",
    "mini": "megaflow.agents.mini_stepped:MiniSweAgent",  # the old name: mini-swe-agent's own agent now
    "installed": "megaflow.agents.installed:InstalledAgent",  # a CLI agent's own program, run in the sandbox
}

_DOTTED = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")


@dataclass
class StepContext:
    """What an agent sees at one step of an episode."""

    task: TaskSpec
    history: list[dict[str, Any]]  # the history's last record (or all of it, if the agent asks: needs_history)
    history_len: int  # records in the whole history (0 at the episode's first step)
    state: dict[str, Any]  # the agent's JSON state, as its previous Decision left it ({} at first)
    counters: dict[str, float] = field(default_factory=dict)  # engine counters: model_calls, prompt_tokens, ...
    container: dict[str, Any] | None = None  # the env handle (container_id, host, ...)
    settings: Any = None
    now: float = 0.0  # wall clock of this step (time.time())

    @property
    def first(self) -> bool:
        return self.history_len == 0

    @property
    def last(self) -> dict[str, Any]:
        """The newest history record: the model reply or command result this step reacts to."""
        return self.history[-1] if self.history else {}


@dataclass
class Decision:
    """What an agent wants next, and the records this step adds to the history.

    ``next``: ``model`` (call the model), ``exec`` (run ``exec["command"]``; optional ``timeout``,
    ``workdir``, ``env``), ``submit`` (evaluate; ``submission`` is what the agent submitted) or
    ``end`` (finish now with ``outcome``/``cause``/``reason``). ``request`` holds model-request
    options (``tools``, ``tool_choice``, sampling keys) kept for every later call of the episode.
    """

    next: str
    records: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] | None = None
    exec: dict[str, Any] | None = None
    request: dict[str, Any] | None = None
    submission: str | None = None
    outcome: str = ""
    cause: str = ""
    reason: str = ""
    incr: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.next not in NEXT_KINDS:
            raise ValueError(f"Decision.next must be one of {NEXT_KINDS}, got {self.next!r}")
        if self.next == EXEC and not (self.exec and isinstance(self.exec.get("command"), str)):
            raise ValueError("an exec Decision needs exec={'command': ...}")


@runtime_checkable
class Agent(Protocol):
    """A stepped agent: built from the task's agent section, asked what to do at every event."""

    def decide(self, ctx: StepContext) -> Decision:
        """The next move of the episode, given the newest history record and the agent's state."""
        ...


class AgentBase:
    """Optional base class: the constructor and hooks the agent service uses, with defaults.

    ``needs_history``: "tail" (only the newest record, the default) or "all" (the whole history
    at every step; costlier). ``inline``: True when ``decide`` is cheap and touches nothing outside
    its context (no I/O): with ``settings.agent_inline`` the model and env workers then run it
    right after the step it reacts to, in that step's advance. ``validate_section`` checks an agent
    section at submit (raise ``ValueError`` or ``SpecError`` naming the key) and returns it normalised.
    """

    needs_history: ClassVar[str] = "tail"
    inline: ClassVar[bool] = False

    def __init__(self, spec: AgentSpec, settings: Any = None):
        self.spec = spec
        self.settings = settings

    @classmethod
    def validate_section(cls, section: dict[str, Any]) -> dict[str, Any]:
        return section

    def decide(self, ctx: StepContext) -> Decision:  # pragma: no cover - abstract
        raise NotImplementedError


def agent_class(type_name: str) -> type:
    """The class for an agent type: a registered name or a dotted path (``pkg.mod:Class``)."""
    target = REGISTRY.get(type_name)
    if target is None:
        if not _DOTTED.match(type_name):
            raise SpecError(
                f"field 'agent.type': unknown agent type {type_name!r}; use one of "
                f"{sorted(REGISTRY)} or a dotted path to your class (mypkg.agents:MyAgent)",
                field="agent.type",
            )
        target = type_name
    if ":" in target:
        module_name, attr = target.split(":", 1)
    else:
        module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = " (pip install 'megaflow[mini]')" if "minisweagent" in str(exc) else ""
        raise SpecError(
            f"field 'agent.type': agent {type_name!r} cannot be imported: {exc}{hint}", field="agent.type"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise SpecError(f"field 'agent.type': module {module_name!r} has no {attr!r}", field="agent.type")
    if not callable(getattr(cls, "decide", None)):
        raise SpecError(
            f"field 'agent.type': {type_name!r} is not an agent (it has no decide(ctx) method)", field="agent.type"
        )
    return cls


def make_agent(spec: AgentSpec, settings: Any = None) -> Any:
    """The agent for an agent section (``cls(spec, settings)``)."""
    return agent_class(spec.type)(spec, settings)


def validate_agent_section(section: dict[str, Any] | None) -> dict[str, Any]:
    """Check a task's agent section against the registry (at submit); return it normalised.

    Raises SpecError naming the field (``agent.type``, ``agent.config.model.model_class``, ...).
    """
    raw = dict(section or {})
    try:
        spec = AgentSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(["agent", *(str(p) for p in err["loc"])])
        msg = "unknown field; remove it or check the spelling" if err["type"] == "extra_forbidden" else err["msg"]
        raise SpecError(f"field '{where}': {msg}", field=where) from None
    cls = agent_class(spec.type)
    hook = getattr(cls, "validate_section", None)
    if hook is None:
        return spec.model_dump(exclude_defaults=True) | {"type": spec.type}
    try:
        out = hook(spec.model_dump(exclude_defaults=True) | {"type": spec.type})
    except SpecError:
        raise
    except ValueError as exc:
        raise SpecError(f"field 'agent': {exc}", field="agent") from None
    AgentSpec.model_validate(out)  # a hook must return a valid section
    return out


def with_agent_section(record: dict[str, Any], section: dict[str, Any] | None, where: str = "") -> dict[str, Any]:
    """A task-spec line with the agent section given on the command line (``--agent-config``).

    A line without an ``agent`` section gets it; a line with a different one is an error (never
    one silently winning over the other).
    """
    if section is None:
        return record
    own = record.get("agent")
    if own is not None and own != section:
        prefix = f"{where}: " if where else ""
        raise SpecError(
            f"{prefix}field 'agent': the line has its own agent section and --agent-config gives "
            "another; keep one of them",
            field="agent",
        )
    return {**record, "agent": section}
