"""Installed agents: a coding agent's own program run detached in the episode's container.

The task's agent section names an install step and a command line; ``{problem_statement}``,
``{workdir}``, ``{instance_id}`` and ``{image}`` are filled in shell-quoted. The first step
installs and starts the program detached (``setsid nohup``: it outlives the exec that started it);
the episode then waits for its end, holding no worker slot: with a ``wait`` decision (a
countdown poll task on the env host) where the agent service offers one, else by short bounded
checks. When the program exits the episode goes to evaluation; past ``timeout_s`` it is killed
and the episode ends TIMED_OUT. Its output tail and exit status are in the trajectory.

Use it as ``agent: {type: "megaflow.agents.installed:InstalledAgent", config: {install: ..., command: ...}}``.
"""

from __future__ import annotations

import re
import shlex
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megaflow.agents import base as B
from megaflow.agents.base import END, EXEC, SUBMIT, AgentBase, Decision, StepContext
from megaflow.core import states

RUN_DIR = "/tmp/.megaflow-installed"
WAIT = "wait"  # Decision kind the agent service may offer: poll later on the env host, holding no slot
_STATUS = re.compile(r"^MF_STATUS (running|exited (-?\d+))$", re.M)


class InstalledConfig(BaseModel):
    """The ``config`` of an installed agent's section."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(
        ..., min_length=1, description="Command line of the agent; {problem_statement} etc. filled in."
    )
    install: str = Field("", description="Shell commands run once before the start (e.g. pip install ...).")
    install_timeout_s: float = Field(900.0, gt=0, description="Time limit of the install step and the start.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of the agent's process.")
    timeout_s: float = Field(3600.0, gt=0, description="Kill the agent and end the episode TIMED_OUT after this.")
    poll_s: float = Field(2.0, gt=0, le=60, description="How often its end is checked.")
    output_tail_bytes: int = Field(20000, ge=0, le=1_000_000, description="Output tail kept in the trajectory.")
    gateway: bool = Field(
        False, description="Give the program OPENAI_API_KEY (a key naming the episode) and OPENAI_BASE_URL."
    )
    gateway_base_url: str = Field(
        "http://127.0.0.1:8881/v1", description="OPENAI_BASE_URL inside the container (the relay to the gateway)."
    )


def _fill(template: str, task: Any) -> str:
    values = {
        "problem_statement": task.problem_statement,
        "workdir": task.workdir,
        "instance_id": getattr(task, "instance_id", "") or "",
        "image": getattr(task, "image", "") or "",
    }
    return re.sub(r"\{(\w+)\}", lambda m: shlex.quote(str(values[m[1]])) if m[1] in values else m[0], template)


START_WAIT_S = 20  # the start waits this long at most for the program to be in its own session

# Start run.sh detached in its own session; its output to RUN_DIR/out, its exit status to RUN_DIR/exit.
# The exec that runs this kills its own process group when the script ends: the script returns only
# once the program wrote its pid from inside the new session (a forked child not yet through setsid
# on a loaded machine would be killed with the group, and the episode would wait for a program that
# never ran). The pid is the new session's and process group's id (kill_script signals the group).
START_SCRIPT = (
    f'D={RUN_DIR}\nrm -f "$D/pid"\n'
    'setsid nohup bash -c \'echo $$ > "$0/pid.tmp"; mv "$0/pid.tmp" "$0/pid"; '
    'bash "$0/run.sh" > "$0/out" 2>&1; echo $? > "$0/exit.tmp"; '
    'mv "$0/exit.tmp" "$0/exit"\' "$D" < /dev/null > /dev/null 2>&1 &\n'
    f'i=0\nwhile [ ! -s "$D/pid" ] && [ $i -lt {START_WAIT_S * 10} ]; do sleep 0.1; i=$((i+1)); done\n'
    '[ -s "$D/pid" ] || { echo "megaflow: the agent did not start within '
    f'{START_WAIT_S}s" >&2; exit 1; }}\n'
    'echo "megaflow: agent started (pid $(cat "$D/pid"))"\n'
)


def launch_script(cfg: InstalledConfig, task: Any, *, start: bool = True) -> str:
    """Write run.sh and install; then (``start``) start the agent detached."""
    eof = f"MF_EOF_{uuid.uuid4().hex}"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in cfg.env.items())
    run = f"cd {shlex.quote(task.workdir)}\n{exports}{_fill(cfg.command, task)}\n"
    script = f'set -e\nD={RUN_DIR}\nmkdir -p "$D"\ncat > "$D/run.sh" <<\'{eof}\'\n{run}{eof}\n{cfg.install}\n'
    return script + (START_SCRIPT if start else "")


def check_script(cfg: InstalledConfig, wait_s: float = 0.0) -> str:
    """Status line ``MF_STATUS running|exited N`` (waiting up to ``wait_s`` for the end), then the output tail."""
    loops = int(wait_s / 0.2)
    return (
        f'D={RUN_DIR}\ni=0\nwhile [ ! -f "$D/exit" ] && [ $i -lt {loops} ]; do sleep 0.2; i=$((i+1)); done\n'
        'if [ -f "$D/exit" ]; then echo "MF_STATUS exited $(cat "$D/exit")"; '
        f"tail -c {cfg.output_tail_bytes} \"$D/out\" 2>/dev/null; else echo 'MF_STATUS running'; fi\n"
    )


def kill_script(cfg: InstalledConfig) -> str:
    """Stop the agent's whole process group, then print its output tail."""
    return (
        f'D={RUN_DIR}\nP=$(cat "$D/pid" 2>/dev/null)\n'
        '[ -n "$P" ] && { kill -TERM -- -$P 2>/dev/null; sleep 1; kill -KILL -- -$P 2>/dev/null; }\n'
        f"echo 'MF_STATUS killed'; tail -c {cfg.output_tail_bytes} \"$D/out\" 2>/dev/null; true\n"
    )


def parse_status(output: str) -> tuple[str, int | None, str]:
    """(running | exited | unknown, exit code, output after the status line) of a check's output."""
    m = _STATUS.search(output or "")
    if not m:
        return "unknown", None, output or ""
    rest = (output[m.end() :]).lstrip("\n")
    return ("running", None, rest) if m[1] == "running" else ("exited", int(m[2]), rest)


class InstalledAgent(AgentBase):
    """Runs the task's own agent program detached in the container and waits for its end."""

    @classmethod
    def validate_section(cls, section: dict[str, Any]) -> dict[str, Any]:
        try:
            InstalledConfig.model_validate(section.get("config") or {})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(["config", *(str(p) for p in err["loc"])])
            raise ValueError(f"{where}: {err['msg']}") from None
        return section

    def decide(self, ctx: StepContext) -> Decision:
        cfg = InstalledConfig.model_validate(self.spec.config)
        st = dict(ctx.state or {})
        phase = st.get("phase", "")
        last = ctx.last
        if phase == "":
            # with a gateway, the env host starts the program (it issues the key): install only here
            later = cfg.gateway and WAIT in B.NEXT_KINDS
            st.update(phase="launched", start_later=later)
            script = launch_script(cfg, ctx.task, start=not later)
            return Decision(EXEC, state=st, exec={"command": script, "timeout": cfg.install_timeout_s})
        if phase == "waiting" and last.get("kind") == "installed_start":  # the env host could not start it
            return Decision(
                END,
                state=st,
                outcome=states.FAILED,
                cause=states.CAUSE_SETUP,
                reason=f"start failed (exit {last.get('exit_code')}): {str(last.get('output', ''))[-1000:]}",
            )
        if phase == "launched":
            if last.get("exit_code") != 0 or last.get("timed_out"):
                return Decision(
                    END,
                    state=st,
                    outcome=states.FAILED,
                    cause=states.CAUSE_SETUP,
                    reason=f"install or start failed (exit {last.get('exit_code')}): "
                    f"{str(last.get('output', ''))[-1000:]}",
                )
            st.update(phase="waiting", deadline=ctx.now + cfg.timeout_s)
            return self._wait(cfg, st)
        if phase == "waiting":
            status, code, tail = parse_status(str(last.get("output", "")))
            if status == "exited":
                record = {"role": "agent", "kind": "installed_exit", "exit_code": code, "output": tail}
                return Decision(SUBMIT, state={**st, "phase": "done"}, records=[record])
            if ctx.now >= float(st.get("deadline", 0)):
                st.update(phase="killed")
                return Decision(EXEC, state=st, exec={"command": kill_script(cfg), "timeout": 30})
            return self._wait(cfg, st)
        if phase == "killed":
            _, _, tail = parse_status(str(last.get("output", "")))
            record = {"role": "agent", "kind": "installed_exit", "exit_code": None, "output": tail, "timed_out": True}
            return Decision(
                END,
                state=st,
                records=[record],
                outcome=states.TIMED_OUT,
                cause=states.CAUSE_TIMEOUT,
                reason=f"the installed agent ran past its timeout_s ({cfg.timeout_s:g}s) and was killed",
            )
        return Decision(
            END,
            state=st,
            outcome=states.FAILED,
            cause=states.CAUSE_AGENT_ERROR,
            reason=f"installed agent: unknown phase {phase!r}",
        )

    def _wait(self, cfg: InstalledConfig, st: dict) -> Decision:
        if WAIT in B.NEXT_KINDS:  # the agent service polls on the env host with a countdown: no slot held
            wait = {"command": check_script(cfg), "poll_s": cfg.poll_s, "deadline": st["deadline"]}
            if st.get("start_later"):
                wait.update(start=START_SCRIPT, gateway_base_url=cfg.gateway_base_url)
            return Decision(WAIT, state=st, exec=wait)
        # fallback: a check that waits at most poll_s in the container (an env slot for that long)
        return Decision(EXEC, state=st, exec={"command": check_script(cfg, cfg.poll_s), "timeout": cfg.poll_s + 30})
