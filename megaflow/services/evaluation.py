"""SWE-bench evaluation step: the official harness's verdict, in a fresh container by default.

``evaluate_instance(rt, ep, handle)`` captures the agent's work as a diff against the image's
HEAD, starts a new container from the instance image (``rt.env_host.create``), applies the patch
the way the harness does, runs the row's eval script (markers, recorded exit status, the repo's own
test command) and grades the whole log with ``swebench``'s ``get_eval_report`` (megaflow.swebench).

Grading modes, from ``spec.metadata["swebench"]["grading"]``:
- ``fresh`` (default): never trusts the agent's container; only its diff leaves it.
- ``in_place``: explicit opt-in for RL reward speed; runs the eval script in the agent's container,
  so an agent that tampers with its tools there can fool it (``eval.fresh_container: true`` overrides).
- ``prediction``: an evaluation-only episode; the patch comes from predictions.jsonl and is graded
  in the episode's own container when no command ran there, else in a fresh one.
Per instance the harness's files (report.json, test_output.txt, patch.diff, eval.sh,
run_instance.log) go to the artifact store under ``swebench/<run_id>/<model>/<instance_id>/``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from megaflow.core.errors import TaskError

PATCH_CAP = 200_000
LOG_TAIL = 20_000


def spec_row(spec) -> dict[str, Any]:
    """The harness-shaped row of an episode: from its metadata, else built from its EvalSpec."""
    from megaflow.swebench.rows import normalize

    meta = spec.metadata.get("swebench")
    if isinstance(meta, dict) and meta.get("row"):
        return meta["row"]
    ev = spec.eval
    raw = {
        "instance_id": spec.task_id,
        "repo": str(spec.metadata.get("repo") or ""),
        "base_commit": str(spec.metadata.get("base_commit") or ""),
        "test_patch": ev.test_patch or "",
        "FAIL_TO_PASS": ev.fail_to_pass,
        "PASS_TO_PASS": ev.pass_to_pass,
        "test_cmd": ev.command,
        "log_parser": ev.log_parser,
        "workdir": spec.workdir,
        "image": spec.image or "",
        "repo_files": {},
    }
    return normalize(raw, f"task {spec.task_id}")


def grading_mode(spec) -> str:
    """``metadata.swebench.grading`` (fresh unless it says in_place / prediction); fresh_container true forces fresh.

    A stored spec carries every EvalSpec default, so ``fresh_container: false`` cannot be told
    from "not given"; the in-place opt-in is therefore ``grading: in_place`` only.
    """
    meta = spec.metadata.get("swebench") if isinstance(spec.metadata.get("swebench"), dict) else {}
    mode = meta.get("grading") or "fresh"
    if mode == "in_place" and spec.eval.fresh_container:
        return "fresh"
    return mode if mode in ("fresh", "in_place", "prediction") else "fresh"


def _model_name(spec) -> str:
    meta = spec.metadata.get("swebench") if isinstance(spec.metadata.get("swebench"), dict) else {}
    extra = spec.model.model_extra or {}
    return str(
        meta.get("model_name_or_path")
        or extra.get("model")
        or extra.get("model_name")
        or spec.model.backend
        or "megaflow"
    )


def _ran_commands(ep) -> bool:
    return any(m.get("kind") == "observation" or m.get("command") for m in ep.history)


def evaluate_instance(rt, ep, handle: dict) -> dict[str, Any]:
    """Evaluate a SWE-bench style episode; returns the report (``resolved`` decides the reward).

    Docker failures propagate as InfraError / RetryableError, like every env step.
    """
    from megaflow.swebench.grade import grade_patch
    from megaflow.swebench.runner import InstanceLog, capture_patch, head_sha

    spec = ep.spec
    started = time.monotonic()
    row = spec_row(spec)
    meta = spec.metadata.get("swebench") if isinstance(spec.metadata.get("swebench"), dict) else {}
    mode = grading_mode(spec)
    run_id = str(meta.get("run_id") or ep.batch_id)
    model = _model_name(spec)
    timeout = spec.eval.timeout_s or rt.settings.eval_timeout_s
    workdir = row.get("workdir") or spec.workdir
    log = InstanceLog()
    log.info(f"Evaluating {row['instance_id']} (run {run_id}, grading {mode}, eval script {row['eval_script_source']})")
    fresh = None
    patch: str | None = None
    try:
        if mode == "prediction":
            patch = meta.get("model_patch")
            if _ran_commands(ep):
                fresh = _fresh(rt, ep, spec)
            target = fresh or handle
        elif mode == "in_place":
            patch = capture_patch(rt.env_host, handle, workdir, "HEAD")
            target = handle
        else:
            fresh = _fresh(rt, ep, spec)
            submitted = _submitted_patch(ep)
            if submitted is not None:  # what the agent submitted (mini-swe-agent submits its `git diff`)
                log.info("Model patch: the agent's submission")
                patch = submitted
            else:
                base = head_sha(rt.env_host, fresh, workdir) or "HEAD"
                log.info(f"Image HEAD in the fresh container: {base}")
                patch = capture_patch(rt.env_host, handle, workdir, base)
            target = fresh
        log.info(f"Model patch: {len(patch or '')} characters")
        result = grade_patch(
            rt.env_host, target, row, patch, timeout=timeout, model=model, apply=mode != "in_place", log=log
        )
    except TaskError as exc:  # the fresh container's set-up failed: not resolved, say why
        log.info(f"Error: {exc}")
        result = {
            "instance_id": row["instance_id"],
            "resolved": False,
            "graded": False,
            "error": str(exc),
            "empty_patch": False,
            "patch_successfully_applied": False,
            "test_output": None,
            "report": None,
            "test_exit_code": None,
            "test_timed_out": False,
            "markers_intact": True,
        }
    finally:
        if fresh is not None:
            rt.env_host.close(fresh)
    return _report(rt, row, result, patch, log, run_id=run_id, model=model, mode=mode, started=started)


def _submitted_patch(ep) -> str | None:
    """The agent's submission when it is a diff (the harness's agents submit their patch); else None."""
    text = ep.fields.get("submission") or ""
    return text if text.lstrip().startswith(("diff --git", "--- ")) else None


def _fresh(rt, ep, spec):
    """A new container of the instance image, labelled with the episode (the reaper keeps it while live)."""
    from megaflow.services.sandbox import labels as _labels
    from megaflow.services.sandbox import setup as _setup

    image = spec.image or ep.fields.get("image") or rt.settings.default_image
    handle = rt.env_host.create(
        ep.id,
        image,
        labels=_labels(rt, ep),
        mode="ephemeral",
        network=spec.network,
        user=spec.user,
        workdir=spec.workdir,
    )
    try:
        _setup(rt, handle, spec)
    except BaseException:
        rt.env_host.close(handle)
        raise
    return handle


def _report(rt, row, result, patch, log, *, run_id, model, mode, started) -> dict[str, Any]:
    from megaflow.swebench import layout

    iid = row["instance_id"]
    files = {layout.INSTANCE_LOG: log.text()}
    if patch:
        files[layout.PATCH] = patch
    if result.get("eval_script"):
        files[layout.EVAL_SH] = result["eval_script"]
    if result.get("test_output") is not None:
        files[layout.TEST_OUTPUT] = result["test_output"]
    if result.get("graded"):
        files[layout.REPORT] = json.dumps({iid: result["report"]}, indent=4)
    artifacts = {}
    store = getattr(rt, "artifacts", None)
    if store is not None:
        artifacts = layout.write_instance(store, run_id, model, iid, files)
    harness_report = result.get("report") or {}
    output = result.get("test_output") or ""
    return {
        "instance_id": iid,
        "run_id": run_id,
        "model_name_or_path": model,
        "grading": mode,
        "fresh_container": mode != "in_place",
        "resolved": bool(result.get("resolved")),
        "patch_exists": bool(patch),
        "empty_patch": bool(result.get("empty_patch")),
        "patch_successfully_applied": bool(result.get("patch_successfully_applied")),
        "error": result.get("error"),
        "harness_report": harness_report or None,
        "tests_status": harness_report.get("tests_status"),
        "test_results": result.get("test_results"),
        "test_patch_applied": result.get("test_patch_applied"),
        "test_exit_code": result.get("test_exit_code"),
        "test_timed_out": bool(result.get("test_timed_out")),
        "markers_intact": result.get("markers_intact", True),
        "eval_script_source": row.get("eval_script_source"),
        "artifacts": artifacts,
        "model_patch": (patch or "")[:PATCH_CAP],
        "log_tail": output[-LOG_TAIL:],
        "duration_s": round(time.monotonic() - started, 3),
    }
