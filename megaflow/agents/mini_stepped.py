"""mini-swe-agent's own DefaultAgent, stepped: one event of its run loop per agent step.

mini's ``DefaultAgent.run`` is a loop of ``query()`` (limits, then one model call) and
``execute_actions()`` (each action through the environment, then observation messages). Here
each event is one step of an episode: the start renders mini's prompts; before a model call
mini's own ``query()`` checks the step / cost / wall-time limits; a recorded reply goes through
mini's model class (megaflow.agents.mini_models), which parses actions or raises FormatError;
each action is one exec on the env host, whose raw result is turned into mini's output dict and
checked by mini's ``_check_finished`` (Submitted); the observations come from mini's model.
What survives between steps is JSON (``STATE_KEYS``). History records carry mini's messages:
a malformed reply is dropped from the conversation (``drop_reply``), and the run ends with
mini's ``exit`` message (exit_status, submission).
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import traceback
from typing import Any

from megaflow.agents.base import END, EXEC, MODEL, SUBMIT, AgentBase, Decision, StepContext
from megaflow.agents.mini import config_notes, import_mini, validate_mini_config
from megaflow.core import states
from megaflow.core.errors import SpecError
from megaflow.core.spec import AgentSpec

STATE_KEYS = ("start_time", "n_calls", "cost", "n_format_errors", "actions", "outputs", "phase")
LOCAL = ("local", "minisweagent.environments.local.LocalEnvironment")
DOCKER_LIKE = (
    "docker",
    "swerex_docker",
    "singularity",
    "swerex_modal",
    "bubblewrap",
    "contree",
    "minisweagent.environments.docker.DockerEnvironment",
)
CAUSE_AGENT_ERROR = getattr(states, "CAUSE_AGENT_ERROR", states.CAUSE_AGENT_CONFIG)


class _Dispatch(Exception):
    """Raised where mini's ``query()`` would call the model: the call goes to the model service instead."""


class _DispatchModel:
    def query(self, messages: list[dict], **kwargs: Any) -> dict:
        raise _Dispatch


class MiniSweAgent(AgentBase):
    """Runs a mini-swe-agent config (``agent.config``) with mini's own classes, one event per step."""

    inline = True  # templates and parsing only, no I/O: may run in the model/env step (agent_inline)

    def __init__(self, spec: AgentSpec, settings: Any = None):
        super().__init__(spec, settings)
        self.config = spec.config
        self.env_cfg = dict(self.config.get("environment") or {})
        self.env_class = str(self.env_cfg.get("environment_class") or "docker")

    @classmethod
    def validate_section(cls, section: dict[str, Any]) -> dict[str, Any]:
        extra = sorted(k for k in section if k not in ("type", "config", "wall_time_s"))
        if extra:
            raise SpecError(
                f"field 'agent.{extra[0]}': the mini_swe_agent agent takes its settings from "
                "agent.config (mini's YAML layout: agent / model / environment)",
                field=f"agent.{extra[0]}",
            )
        validate_mini_config(section.get("config") or {})
        return section

    # --- mini's objects, rebuilt at every step from the config and the JSON state ------------------
    def _objects(self, ctx: StepContext, st: dict[str, Any]) -> Any:
        import_mini()
        from minisweagent.agents.default import DefaultAgent

        from megaflow.agents.mini_models import build_model

        model = build_model(dict(self.config.get("model") or {}), default_name=self._model_name(ctx))
        agent_cfg = {
            k: v
            for k, v in (self.config.get("agent") or {}).items()
            if k
            in (
                "system_template",
                "instance_template",
                "step_limit",
                "cost_limit",
                "wall_time_limit_seconds",
                "max_consecutive_format_errors",
            )
        }
        agent = DefaultAgent(model, _Environment(self, ctx), **agent_cfg)  # type: ignore[arg-type]  # duck-typed
        agent.n_calls = int(st.get("n_calls", 0))
        agent.cost = float(st.get("cost", 0.0))
        agent.n_consecutive_format_errors = int(st.get("n_format_errors", 0))
        agent._start_time = float(st.get("start_time", ctx.now))
        agent.extra_template_vars = {"task": ctx.task.problem_statement}
        return agent

    @staticmethod
    def _model_name(ctx: StepContext) -> str:
        extra = ctx.task.model.model_extra or {}
        return str(extra.get("model_name") or extra.get("model") or "megaflow")

    @staticmethod
    def _save(agent: Any, st: dict[str, Any], **changes: Any) -> dict[str, Any]:
        return {
            **st,
            "n_calls": agent.n_calls,
            "cost": agent.cost,
            "n_format_errors": agent.n_consecutive_format_errors,
            **changes,
        }

    # --- the step ---------------------------------------------------------------------------------
    def decide(self, ctx: StepContext) -> Decision:
        """One event of mini's run loop; mini's uncaught exceptions end the episode with its exit message."""
        try:
            return self._decide(ctx)
        except SpecError as exc:
            return _exit(exc, states.CAUSE_AGENT_CONFIG)
        except Exception as exc:  # noqa: BLE001  (as mini's handle_uncaught_exception: an exit message, the run ends)
            return _exit(exc, CAUSE_AGENT_ERROR)

    def _decide(self, ctx: StepContext) -> Decision:
        from minisweagent.exceptions import FormatError, Submitted

        st = dict(ctx.state)
        if ctx.first:
            st = {
                "start_time": ctx.now,
                "n_calls": 0,
                "cost": 0.0,
                "n_format_errors": 0,
                "actions": [],
                "outputs": [],
            }
            agent = self._objects(ctx, st)
            from megaflow.agents.mini_models import request_options

            records = [
                _record(
                    agent.model.format_message(
                        role="system", content=agent._render_template(agent.config.system_template)
                    ),
                    kind="prompt",
                ),
                _record(
                    agent.model.format_message(
                        role="user", content=agent._render_template(agent.config.instance_template)
                    ),
                    kind="prompt",
                ),
            ]
            notes = config_notes(self.config)
            if notes:
                records.insert(0, {"role": "note", "kind": "config_notes", "content": "\n".join(notes)})
            decision = self._query(agent, st, records)
            decision.request = request_options(agent.model)
            return decision
        agent = self._objects(ctx, st)
        last, phase = ctx.last, st.get("phase")
        if phase == "model" and last.get("role") == "assistant":
            from megaflow.agents.mini_models import replay

            try:
                message = replay(agent.model, last)
            except FormatError as exc:  # mini's run loop: count it, show the error, maybe stop
                agent.cost += exc.messages[0].get("extra", {}).get("cost", 0.0)
                agent.n_consecutive_format_errors += 1
                records = [_record(m, kind="format_error", drop_reply=True) for m in exc.messages]
                limit = agent.config.max_consecutive_format_errors
                if 0 < limit <= agent.n_consecutive_format_errors:
                    exit_msg = {
                        "role": "exit",
                        "content": "RepeatedFormatError",
                        "extra": {"exit_status": "RepeatedFormatError", "submission": ""},
                    }
                    return Decision(
                        END,
                        records=[*records, _record(exit_msg, kind="exit")],
                        state=self._save(agent, st),
                        outcome=states.FAILED,
                        cause=states.CAUSE_FORMAT,
                        reason=f"RepeatedFormatError: {agent.n_consecutive_format_errors} format errors "
                        "in a row (max_consecutive_format_errors)",
                    )
                return self._query(agent, st, records)
            agent.cost += message.get("extra", {}).get("cost", 0.0)
            actions = list(message.get("extra", {}).get("actions", []))
            st = self._save(agent, st, actions=actions, outputs=[])
            return self._next_action(agent, ctx, st)
        if phase == "exec" and last.get("role") == "env":
            output = self._output(ctx, last)
            try:
                agent.env._check_finished(output)
            except Submitted as exc:
                msg = exc.messages[0]
                submission = msg.get("extra", {}).get("submission", "")
                return Decision(
                    SUBMIT,
                    records=[_record(msg, kind="exit")],
                    state=self._save(agent, st, phase="done"),
                    submission=submission,
                )
            st = {**st, "outputs": [*st.get("outputs", []), output]}
            return self._next_action(agent, ctx, st)
        raise RuntimeError(
            f"mini_swe_agent: unexpected event (phase {phase!r}, last record role "
            f"{last.get('role')!r}, kind {last.get('kind')!r})"
        )

    def _next_action(self, agent: Any, ctx: StepContext, st: dict[str, Any]) -> Decision:
        """Run the reply's next action, or, when all ran, add mini's observations and query again."""
        actions, outputs = st.get("actions", []), st.get("outputs", [])
        if len(outputs) < len(actions):
            return Decision(EXEC, exec=self._exec(ctx, actions[len(outputs)]), state={**st, "phase": "exec"})
        observations = agent.model.format_observation_messages(
            {"extra": {"actions": actions}}, outputs, agent.get_template_vars()
        )
        agent.n_consecutive_format_errors = 0  # a clean step
        records = [_record(m, kind="observation") for m in observations]
        return self._query(agent, {**st, "actions": [], "outputs": []}, records)

    def _query(self, agent: Any, st: dict[str, Any], records: list[dict[str, Any]]) -> Decision:
        """mini's ``query()`` up to the model call: its limit checks, then the call goes to the model service."""
        from minisweagent.exceptions import LimitsExceeded, TimeExceeded

        model, agent.model = agent.model, _DispatchModel()
        try:
            agent.query()
        except _Dispatch:
            return Decision(MODEL, records=records, state=self._save(agent, st, phase="model"))
        except LimitsExceeded as exc:
            timed = isinstance(exc, TimeExceeded)
            msg = exc.messages[0]
            limits = {
                "step_limit": agent.config.step_limit,
                "cost_limit": agent.config.cost_limit,
                "wall_time_limit_seconds": agent.config.wall_time_limit_seconds,
            }
            return Decision(
                END,
                records=[*records, _record(msg, kind="exit")],
                state=self._save(agent, st),
                outcome=states.TIMED_OUT if timed else states.FAILED,
                cause=states.CAUSE_TIMEOUT if timed else states.CAUSE_AGENT_LIMIT,
                reason=f"{msg.get('content')}: {agent.n_calls} model calls, cost {agent.cost:g} (limits: {limits})",
            )
        finally:
            agent.model = model
        raise RuntimeError("mini's query() returned without calling the model")

    # --- the environment side ---------------------------------------------------------------------
    def _exec(self, ctx: StepContext, action: dict[str, Any]) -> dict[str, Any]:
        """The env step's order for one action: command (under mini's interpreter), time limit, cwd, env."""
        command = str(action.get("command", ""))
        interpreter = self._interpreter()
        if interpreter != ["bash", "-lc"]:  # the env host runs `bash -lc COMMAND`
            command = shlex.join([*interpreter, command])
        out: dict[str, Any] = {"command": command, "timeout": self._timeout()}
        if self.env_cfg.get("cwd"):
            out["workdir"] = self.env_cfg["cwd"]
        if self.env_cfg.get("env"):
            out["env"] = {str(k): str(v) for k, v in self.env_cfg["env"].items()}
        return out

    def _interpreter(self) -> list[str]:
        """mini's LocalEnvironment runs commands through /bin/sh (shell=True); the others through ``interpreter``."""
        if self.env_class in LOCAL:
            return ["sh", "-c"]
        return list(self.env_cfg.get("interpreter") or ["bash", "-lc"])

    def _timeout(self) -> int | float:
        return self.env_cfg.get("timeout", 30)  # mini's environments default to 30 s

    def _output(self, ctx: StepContext, rec: dict[str, Any]) -> dict[str, Any]:
        """mini's output dict for a command's raw result (a time-out reads as mini's environment says it)."""
        if not rec.get("timed_out"):
            return {"output": str(rec.get("output") or ""), "returncode": rec.get("exit_code"), "exception_info": ""}
        actions = ctx.state.get("actions", [])
        command = str(actions[len(ctx.state.get("outputs", []))].get("command", "")) if actions else ""
        exc = subprocess.TimeoutExpired(self._timeout_cmd(ctx, command), self._timeout())
        return {
            "output": str(rec.get("output") or ""),
            "returncode": -1,
            "exception_info": f"An error occurred while executing the command: {exc}",
            "extra": {"exception_type": type(exc).__name__, "exception": str(exc)},
        }

    def _timeout_cmd(self, ctx: StepContext, command: str) -> Any:
        """What mini's environment ran (it is named in the time-out message)."""
        if self.env_class not in DOCKER_LIKE:
            return command
        cwd = self.env_cfg.get("cwd") or ctx.task.workdir  # where it ran (unset: the task's workdir)
        cmd = [str(self.env_cfg.get("executable") or "docker"), "exec", "-w", cwd]
        for key, value in (self.env_cfg.get("env") or {}).items():
            cmd += ["-e", f"{key}={value}"]
        return [*cmd, str((ctx.container or {}).get("container_id") or ""), *self._interpreter(), command]


class _Environment:
    """mini's Environment protocol for template variables and the submit check; commands run on MegaFlow."""

    def __init__(self, agent: MiniSweAgent, ctx: StepContext):
        self.cfg, self.env_class = agent.env_cfg, agent.env_class
        self.image = ctx.task.image or getattr(ctx.settings, "default_image", "") or ""
        self.workdir = ctx.task.workdir

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        import os

        from minisweagent.utils.serialize import recursive_merge

        keys = {k: v for k, v in self.cfg.items() if k != "environment_class"}
        keys.setdefault("cwd", self.workdir)  # commands run in the task's workdir unless cwd says otherwise
        if self.env_class in LOCAL:
            from minisweagent.environments.local import LocalEnvironmentConfig

            return recursive_merge(
                LocalEnvironmentConfig(**keys).model_dump(), platform.uname()._asdict(), dict(os.environ), kwargs
            )
        if self.env_class in ("docker", "minisweagent.environments.docker.DockerEnvironment"):
            from minisweagent.environments.docker import DockerEnvironmentConfig

            keys = DockerEnvironmentConfig(image=self.image, **keys).model_dump()
        return recursive_merge(keys, platform.uname()._asdict(), kwargs)

    def _check_finished(self, output: dict[str, Any]) -> None:
        from minisweagent.environments.local import LocalEnvironment

        LocalEnvironment._check_finished(self, output)  # type: ignore[arg-type]  # mini's submit rule

    def execute(self, action: dict, cwd: str = "") -> dict[str, Any]:  # pragma: no cover - stepped instead
        raise RuntimeError("commands run on MegaFlow's env hosts, one step at a time")

    def serialize(self) -> dict[str, Any]:
        return {"info": {"config": {"environment": self.cfg, "environment_type": self.env_class}}}


def _record(message: dict[str, Any], *, kind: str, **extra: Any) -> dict[str, Any]:
    """A history record for one of mini's messages (its ``extra`` kept, bulky copies left out)."""
    rec = {k: v for k, v in message.items() if k != "extra"}
    meta = {k: v for k, v in (message.get("extra") or {}).items() if k not in ("response", "raw_output", "traceback")}
    if meta:
        rec["extra"] = meta
    return {**rec, "kind": kind, **extra}


def _exit(exc: Exception, cause: str) -> Decision:
    exit_msg = {
        "role": "exit",
        "content": str(exc),
        "extra": {
            "exit_status": type(exc).__name__,
            "submission": "",
            "exception_str": str(exc),
            "traceback": traceback.format_exc(),
        },
    }
    rec = _record(exit_msg, kind="exit")
    rec["extra"]["traceback"] = traceback.format_exc()[-4000:]
    return Decision(
        END,
        records=[rec],
        outcome=states.FAILED,
        cause=cause,
        reason=f"mini-swe-agent: {type(exc).__name__}: {exc}"[:2000],
    )
