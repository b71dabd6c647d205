"""The environment service: provision, exec, evaluate and close an episode's container on this host."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from megaflow.core import states
from megaflow.core.errors import InfraError, RetryableError, TaskError
from megaflow.services import lifecycle
from megaflow.services.agent import advance_to_agent
from megaflow.services.sandbox import labels as _labels
from megaflow.services.sandbox import setup as _setup

if TYPE_CHECKING:
    from megaflow.services.root import Root as Runtime

BOOT_BUSY = "boot_busy"


def provision(rt: Runtime, episode_id: str, step: int, *, final_attempt: bool = True) -> str:
    """Create the episode's container, write its files, run its set-up, then hand it to the agent."""
    ep = rt.engine.claim(episode_id, step)
    if ep is None:
        return "dropped"
    if ep.host and ep.host != rt.host:  # re-admitted to another host since this task was sent
        return "dropped"
    # mark it started and take a boot slot (one script)
    boot = rt.resources.start_boot(rt.host, ep.id)
    if boot == "requeued":  # the sweep re-queued it (never started in time): not ours now
        return "requeued"
    if ep.state != states.ENV_STARTING:
        try:
            rt.engine.advance(ep, keep_step=True, state=states.ENV_STARTING, phase="env_starting")
        except BaseException:
            if boot == "ok":  # its retry takes the slot again (the same holder renews it)
                with contextlib.suppress(Exception):  # else its lease frees it
                    rt.resources.release_boot(rt.host, ep.id)
            raise
    if boot == "busy":  # the host's boot limiter is full: the task comes back shortly, holding nothing
        return BOOT_BUSY
    spec = ep.spec
    try:
        handle = rt.env_host.create(
            ep.id,
            ep.fields.get("image") or rt.settings.default_image,
            labels=_labels(rt, ep),
            mode=ep.fields.get("mode") or rt.settings.env_mode,
            network=spec.network,
            user=spec.user,
            workdir=spec.workdir,
        )
        try:
            _setup(rt, handle, spec)
        except BaseException:
            rt.env_host.close(handle)
            raise
    except TaskError as exc:
        lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_SETUP, error=str(exc))
        return "failed"
    except (RetryableError, InfraError) as exc:
        if isinstance(exc, RetryableError) and not final_attempt:
            rt.engine.advance(ep, keep_step=True, incr={"attempt": 1}, event_fields={"retry": str(exc)[:500]})
        return _infra_failure(rt, ep, exc, "provision", final_attempt)
    finally:
        rt.resources.release_boot(rt.host, ep.id)
    fields: dict[str, Any] = {"container": handle.to_json()}
    event_fields: dict[str, Any] = {"host": rt.host, "container_id": handle.id, "mode": handle.mode}
    note = _launch_note(rt, ep)
    if note is not None:  # it waited for a host the autoscaler launched: its record says so
        fleet = [*ep.fleet_events(), note]
        fields["fleet"] = fleet
        event_fields["fleet"] = fleet
    applied = advance_to_agent(
        rt, ep, history=[], state=states.RUNNING, phase="env_ready", fields=fields, event_fields=event_fields
    )
    if not applied:  # a duplicate delivery won the race: this container is ours to remove
        rt.env_host.close(handle)
        return "dropped"
    return "ok"


def _launch_note(rt: Runtime, ep) -> dict[str, Any] | None:
    """The elastic fleet's note when this host was launched after the episode was queued (one HGET)."""
    from megaflow.elastic.usage import launch_note

    queued = ep.phase_times().get("queued")
    if queued is None:
        return None
    try:
        return launch_note(rt.redis, rt.settings.key_prefix, rt.host, queued)
    except Exception:  # a note is never worth failing a provision for
        return None


def _infra_failure(rt: Runtime, ep, exc: Exception, what: str, final_attempt: bool) -> str:
    """Let Celery retry a retryable failure; otherwise end the episode as an infra failure."""
    if isinstance(exc, RetryableError) and not final_attempt:
        raise exc
    lifecycle.finish(rt, ep, states.FAILED, cause=states.CAUSE_INFRA, error=f"{what}: {exc}", close_here=True)
    return "failed"


def execute(rt: Runtime, episode_id: str, step: int, *, final_attempt: bool = True) -> str:
    """Run the agent's pending command and report its output back to the agent."""
    ep = rt.engine.claim(episode_id, step)
    if ep is None:
        return "dropped"
    spec = ep.spec
    pending = ep.pending or {}
    command = pending.get("command", "")
    timeout = pending.get("timeout") or spec.agent.command_timeout_s or rt.settings.command_timeout_s
    try:
        res = rt.env_host.execute(
            _sandbox(ep),
            command,
            timeout=timeout,
            workdir=pending.get("workdir") or spec.workdir,
            env=pending.get("env") or spec.agent.env or None,
        )
    except (RetryableError, InfraError) as exc:
        return _infra_failure(rt, ep, exc, "exec", final_attempt)
    # the raw result; the agent renders its observation from it when it next steps
    record = res.history_record(command)
    advance_to_agent(rt, ep, history=[record], fields={"pending": ""})
    return "ok"


def evaluate(rt: Runtime, episode_id: str, step: int, *, final_attempt: bool = True) -> str:
    """Score the episode (exit code, or SWE-bench style per megaflow.services.evaluation), then end it."""
    ep = rt.engine.claim(episode_id, step)
    if ep is None:
        return "dropped"
    spec = ep.spec
    handle = _sandbox(ep)
    report = None
    try:
        if spec.eval.swebench:
            from megaflow.services.evaluation import evaluate_instance

            report = evaluate_instance(rt, ep, handle)
        elif spec.eval.files:
            rt.env_host.put_files(handle, spec.eval.files)
        if report is None:
            res = rt.env_host.execute(
                handle,
                spec.eval.command,
                timeout=spec.eval.timeout_s or rt.settings.eval_timeout_s,
                workdir=spec.workdir,
            )
    except (RetryableError, InfraError) as exc:
        return _infra_failure(rt, ep, exc, "evaluate", final_attempt)
    if report is not None:
        reward = 1.0 if report["resolved"] else 0.0
        record = {
            "role": "evaluation",
            "content": report.get("log_tail", ""),
            "exit_code": report.get("test_exit_code"),
            "timed_out": bool(report.get("test_timed_out")),
            "duration_s": report["duration_s"],
            "report": {k: v for k, v in report.items() if k != "log_tail"},
        }
        fields = {"eval_exit_code": str(report.get("test_exit_code")), "resolved": "1" if report["resolved"] else "0"}
    else:
        reward = 1.0 if (res.exit_code == 0 and not res.timed_out) else 0.0
        record = {
            "role": "evaluation",
            "content": res.output,
            "exit_code": res.exit_code,
            "timed_out": res.timed_out,
            "duration_s": round(res.duration_s, 4),
        }
        fields = {"eval_exit_code": str(res.exit_code)}
    state = states.SUCCEEDED if reward > 0 else states.FAILED
    # the record, the scores and the end in one advance (claim read the whole history just now)
    if not lifecycle.finish(
        rt,
        ep,
        state,
        reward=reward,
        cause=None if reward > 0 else states.CAUSE_TESTS,
        close_here=True,
        history=[record],
        fields=fields,
        loaded=True,
    ):
        return "dropped"
    return state


def _sandbox(ep) -> dict[str, Any]:
    """The episode's sandbox handle; an episode past provisioning without one lost it (infra)."""
    handle = ep.container
    if not handle:
        raise InfraError(f"episode {ep.id} has no sandbox at step {ep.step} (state {ep.state})")
    return handle


def close(rt: Runtime, episode_id: str, handle: dict[str, Any]) -> str:
    """Remove a finished episode's container and release its slots."""
    lifecycle.close_container(rt, episode_id, handle)
    return "closed"


class EnvService:
    """The env service of one env host: its steps, bound to this process's root."""

    def __init__(self, root: Runtime):
        self.root = root

    def provision(self, episode_id: str, step: int, *, final_attempt: bool = True) -> str:
        return provision(self.root, episode_id, step, final_attempt=final_attempt)

    def execute(self, episode_id: str, step: int, *, final_attempt: bool = True) -> str:
        return execute(self.root, episode_id, step, final_attempt=final_attempt)

    def evaluate(self, episode_id: str, step: int, *, final_attempt: bool = True) -> str:
        return evaluate(self.root, episode_id, step, final_attempt=final_attempt)

    def close(self, episode_id: str, handle: dict[str, Any]) -> str:
        return close(self.root, episode_id, handle)

    def prefetch(self, images: list[str]) -> dict[str, Any]:
        from megaflow.env_hosts.images import prefetch as do_prefetch

        return do_prefetch(self.root.env_host, images)
