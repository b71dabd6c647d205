"""Grade one patch in one container, as ``run_evaluation.run_instance`` does, through an env host.

``grade_patch`` applies the model patch (the harness's apply chain), runs the row's eval script,
and grades the whole output with the harness's ``get_eval_report``. Outcomes follow the harness:
an empty patch is not run (``empty_patch``); a patch that does not apply or tests that time out
are errors with no report.json; otherwise report.json holds the harness's report.
"""

from __future__ import annotations

from typing import Any

from megaflow.swebench import harness
from megaflow.swebench.rows import harness_row
from megaflow.swebench.runner import InstanceLog, apply_patch, git_diff, run_eval_script

# What `git apply -v` prints when the eval script's test patch does not apply.
TEST_PATCH_ERRORS = ("error: patch failed", "patch does not apply", "error: corrupt patch", "No valid patches in input")


def prediction(row: dict[str, Any], patch: str | None, model: str | None) -> dict[str, Any]:
    return {"instance_id": row["instance_id"], "model_name_or_path": model or "None", "model_patch": patch}


def grade_log(row: dict[str, Any], patch: str | None, log: str, model: str | None = None) -> dict[str, Any]:
    """The harness's report and statuses of a test log, plus MegaFlow's forgery checks (they only refuse a pass)."""
    spec = harness.make_test_spec(harness_row(row))
    report = harness.grade_log(spec, prediction(row, patch, model), log)
    intact = harness.markers_intact(log, spec.eval_script)
    late = harness.late_passes(log, spec, spec.FAIL_TO_PASS + spec.PASS_TO_PASS) if report.get("resolved") else []
    if (late or not intact) and report.get("resolved"):
        report = {**report, "resolved": False}
    from swebench.harness.grading import parse_test_exit_code

    status, _ = harness.status_map(spec, log)
    return {
        "report": report,
        "markers_intact": intact,
        "late_passes": late,
        "test_results": status,
        "test_patch_applied": not any(e in log for e in TEST_PATCH_ERRORS),
        "test_exit_code": parse_test_exit_code(log),
        "eval_script": spec.eval_script,
    }


def grade_patch(
    host,
    handle,
    row: dict[str, Any],
    patch: str | None,
    *,
    timeout: float,
    model: str | None = None,
    apply: bool = True,
    log: InstanceLog | None = None,
) -> dict[str, Any]:
    """Apply ``patch`` in ``handle`` (unless ``apply`` is False: in place), run the eval script, grade."""
    log = log or InstanceLog()
    iid = row["instance_id"]
    workdir = row.get("workdir") or "/testbed"
    out: dict[str, Any] = {
        "instance_id": iid,
        "resolved": False,
        "graded": False,
        "empty_patch": False,
        "patch_successfully_applied": False,
        "error": None,
        "test_output": None,
        "report": None,
        "test_exit_code": None,
        "test_timed_out": False,
        "markers_intact": True,
        "log": log,
    }
    if patch in ("", None):
        out["empty_patch"] = True
        log.info(f"Empty patch for {iid}: not evaluated (the harness lists it under empty_patch_ids)")
        return out
    spec = harness.make_test_spec(harness_row(row))
    out["eval_script"] = spec.eval_script
    if apply:
        if not apply_patch(host, handle, patch, workdir, log):
            out["error"] = "the model patch did not apply (git apply, --3way, --reject, patch --fuzz=5)"
            return out
    else:
        log.info("Grading in place: the patch is already in the working tree")
    out["patch_successfully_applied"] = True
    before = git_diff(host, handle, workdir)
    log.info(f"Git diff before:\n{before}")
    run = run_eval_script(host, handle, spec.eval_script, timeout, log)
    text = run["output"]
    if run["timed_out"]:
        text += f"\n\nTimeout error: {timeout:g} seconds exceeded."
        out.update(test_output=text, test_timed_out=True, error=f"Test timed out after {timeout:g} seconds.")
        log.info(out["error"])
        return out
    after = git_diff(host, handle, workdir)
    log.info(f"Git diff after:\n{after}")
    if after != before:
        log.info("Git diff changed after running eval script")
    graded = grade_log(row, patch, text, model)
    report = graded["report"]
    if graded["late_passes"]:
        log.info(f"Tests passing after they failed in the same output (forged lines): {graded['late_passes']}")
    if not graded["markers_intact"]:
        log.info("The test output carries extra copies of the harness's markers: refused as forged")
    log.info(f"report: {report}\nResult for {iid}: resolved: {report['resolved']}")
    out.update(
        test_output=text,
        graded=True,
        report=report,
        resolved=bool(report["resolved"]),
        test_exit_code=graded["test_exit_code"],
        markers_intact=graded["markers_intact"],
        late_passes=graded["late_passes"],
        test_results=graded["test_results"],
        test_patch_applied=graded["test_patch_applied"],
    )
    return out
