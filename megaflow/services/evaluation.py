"""SWE-bench style evaluation: apply the test patch, run the listed tests, grade FAIL_TO_PASS/PASS_TO_PASS.

It runs in the episode's container, or (``eval.fresh_container``) in a fresh container of the same
image where the agent's patch is applied to a clean checkout first. The report it returns has
SWE-bench's shape (``resolved``, ``tests_status`` with success/failure lists per category) plus the
per-test statuses and the agent's patch; the episode's reward is 1.0 when resolved.

Test output is read with a parser per runner: ``unittest`` (``-v`` lines
``test_x (mod.Class.test_x) ... ok``) and ``pytest`` (``-rA`` summary ``PASSED path::test``, or
``-v`` lines ``path::test PASSED``); ``auto`` merges both.
"""

from __future__ import annotations

import re
import shlex
import time
from typing import Any

from megaflow.core.errors import TaskError

PASSED, FAILED, ERROR, SKIPPED, XFAIL = "PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL"
PASS_STATUSES = frozenset({PASSED, XFAIL})

SCRATCH = "/tmp/megaflow-eval"
MODEL_PATCH = f"{SCRATCH}/model.patch"
TEST_PATCH = f"{SCRATCH}/test.patch"
TEST_LOG = f"{SCRATCH}/test.log"
PATCH_CAP = 200_000
LOG_TAIL = 20_000

# --- parsing test output --------------------------------------------------------------------------
_UNITTEST_HEAD = re.compile(r"^(?P<name>[A-Za-z_]\w*) \((?P<where>[\w.]+)\)")
_UNITTEST_STATUS = {"ok": PASSED, "FAIL": FAILED, "ERROR": ERROR, "expected failure": XFAIL,
                    "unexpected success": FAILED}
_PYTEST_STATUSES = (PASSED, FAILED, ERROR, SKIPPED, XFAIL, "XPASS")
_PYTEST_VERBOSE = re.compile(r"^(?P<id>\S+::\S+)\s+(?P<status>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def _unittest_status(text: str) -> str | None:
    text = text.strip()
    if text.startswith("skipped"):
        return SKIPPED
    return _UNITTEST_STATUS.get(text)


def parse_unittest(log: str) -> dict[str, str]:
    """Per-test status from ``python -m unittest -v`` output (Python 3.11+ and older id forms)."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in log.splitlines():
        m = _UNITTEST_HEAD.match(line)
        rest = line
        if m:
            name, where = m["name"], m["where"]
            current = where if where.endswith("." + name) else f"{where}.{name}"
            rest = line[m.end():]
        if current is None:
            continue
        status = None
        if " ... " in rest or rest.startswith("... "):
            status = _unittest_status(rest.rsplit("... ", 1)[1])
        elif not m:  # the status on a line of its own, after output the test printed
            status = _unittest_status(line)
        if status:
            out[current] = status
            current = None
    return out


def parse_pytest(log: str) -> dict[str, str]:
    """Per-test status from pytest ``-rA`` summary lines or ``-v`` progress lines."""
    out: dict[str, str] = {}
    for line in log.splitlines():
        line = line.rstrip()
        m = _PYTEST_VERBOSE.match(line)
        if m:
            out[m["id"]] = FAILED if m["status"] == "XPASS" else m["status"]
            continue
        for status in _PYTEST_STATUSES:
            if line.startswith(status + " "):
                test = line[len(status) + 1:].split(" - ", 1)[0].strip()
                if "::" in test:
                    out[test] = FAILED if status == "XPASS" else status
                break
    return out


def parse_log(log: str, parser: str = "auto") -> dict[str, str]:
    if parser == "unittest":
        return parse_unittest(log)
    if parser == "pytest":
        return parse_pytest(log)
    return {**parse_unittest(log), **parse_pytest(log)}


def grade(status: dict[str, str], fail_to_pass: list[str], pass_to_pass: list[str]) -> dict[str, Any]:
    """SWE-bench's verdict: resolved when every FAIL_TO_PASS and PASS_TO_PASS test passes (missing = failed)."""
    report: dict[str, Any] = {}
    for label, tests in (("FAIL_TO_PASS", fail_to_pass), ("PASS_TO_PASS", pass_to_pass)):
        ok = [t for t in tests if status.get(t) in PASS_STATUSES]
        report[label] = {"success": ok, "failure": [t for t in tests if t not in ok]}
    resolved = bool(fail_to_pass or pass_to_pass) and not any(report[k]["failure"] for k in report)
    return {"resolved": resolved, "tests_status": report}


def patch_files(patch: str) -> list[str]:
    """Paths a unified diff touches (its ``b/`` side)."""
    files = []
    for line in patch.splitlines():
        m = re.match(r"^diff --git a/(\S+) b/(\S+)", line)
        if m and m[2] not in files:
            files.append(m[2])
    return files


def runner_command(command: str, tests: list[str]) -> str:
    """The runner command with the test ids filled in (``{tests}``) or appended."""
    quoted = " ".join(shlex.quote(t) for t in tests)
    if "{tests}" in command:
        return command.replace("{tests}", quoted)
    return f"{command} {quoted}".strip()


# --- running in a container ---------------------------------------------------------------------
def _sh(rt, handle: dict, command: str, workdir: str, timeout: float | None = None):
    return rt.env_host.execute(handle, command, timeout=timeout or rt.settings.command_timeout_s, workdir=workdir)


def base_ref(spec) -> str:
    """The commit the agent started from: the instance's base_commit when it names one, else HEAD."""
    commit = str(spec.metadata.get("base_commit") or "")
    return commit if re.fullmatch(r"[0-9a-f]{7,40}", commit) else "HEAD"


def capture_patch(rt, handle: dict, workdir: str, base: str = "HEAD") -> str:
    """The agent's changes as a git diff against ``base`` (new files included, byte code left out)."""
    res = _sh(rt, handle, f"mkdir -p {SCRATCH} && git add -A -- . ':(exclude)*.pyc' "
                          f">/dev/null 2>&1; git diff --cached --binary --no-color {base} > {MODEL_PATCH}", workdir)
    if res.exit_code != 0:
        return ""
    try:
        return rt.env_host.get_file(handle, MODEL_PATCH).decode("utf-8", "replace")
    except TaskError:
        return ""


def _apply(rt, handle: dict, path: str, workdir: str) -> tuple[bool, str]:
    res = _sh(rt, handle, f"git apply -v {path} || patch --batch --fuzz=5 -p1 -i {path}", workdir)
    return res.exit_code == 0 and not res.timed_out, res.output[-2000:]


def run_tests(rt, handle: dict, spec, workdir: str) -> dict[str, Any]:
    """Reset the test files, apply the test patch, run the listed tests and grade them."""
    ev = spec.eval
    base = base_ref(spec)
    out: dict[str, Any] = {"test_patch_applied": True}
    _sh(rt, handle, f"mkdir -p {SCRATCH}", workdir)
    if ev.test_patch:
        resets = " ; ".join(
            f"if git cat-file -e {base}:{shlex.quote(f)} 2>/dev/null; then git checkout -q {base} -- {shlex.quote(f)}; "
            f"else rm -f {shlex.quote(f)}; fi" for f in patch_files(ev.test_patch))
        if resets:
            _sh(rt, handle, resets, workdir)
        rt.env_host.put_files(handle, {TEST_PATCH: ev.test_patch})
        ok, log = _apply(rt, handle, TEST_PATCH, workdir)
        if not ok:
            out.update(test_patch_applied=False, resolved=False, error="the test patch did not apply",
                       log_tail=log)
            return out
    if ev.files:
        rt.env_host.put_files(handle, ev.files)
    tests = ev.fail_to_pass + ev.pass_to_pass
    command = runner_command(ev.command, tests)
    timeout = ev.timeout_s or rt.settings.eval_timeout_s
    res = _sh(rt, handle, f"( {command} ) > {TEST_LOG} 2>&1", workdir, timeout=timeout)
    try:
        log = rt.env_host.get_file(handle, TEST_LOG).decode("utf-8", "replace")
    except TaskError:
        log = res.output
    status = parse_log(log, ev.log_parser)
    out.update(grade(status, ev.fail_to_pass, ev.pass_to_pass))
    out.update(test_command=command, test_exit_code=res.exit_code, test_timed_out=res.timed_out,
               test_results=status, log_tail=log[-LOG_TAIL:])
    if res.timed_out:
        out["error"] = f"the tests ran past the {timeout:g}s evaluation limit"
    return out


def evaluate_instance(rt, ep, handle: dict) -> dict[str, Any]:
    """Evaluate a SWE-bench style episode; returns the report (``resolved`` decides the reward).

    Docker failures propagate as InfraError / RetryableError, like every env step.
    """
    spec = ep.spec
    started = time.monotonic()
    patch = capture_patch(rt, handle, spec.workdir, base_ref(spec))
    report: dict[str, Any] = {"instance_id": spec.task_id, "fresh_container": spec.eval.fresh_container,
                              "patch_exists": bool(patch.strip()), "patch_successfully_applied": True}
    try:
        if spec.eval.fresh_container:
            report.update(_in_fresh_container(rt, ep, spec, patch))
        else:
            report.update(run_tests(rt, handle, spec, spec.workdir))
    except TaskError as exc:  # e.g. the fresh container's set-up failed: not resolved, say why
        report.update(resolved=False, error=str(exc))
    report["resolved"] = bool(report.get("resolved"))
    report["model_patch"] = patch[:PATCH_CAP]
    report["duration_s"] = round(time.monotonic() - started, 3)
    return report


def _in_fresh_container(rt, ep, spec, patch: str) -> dict[str, Any]:
    from megaflow.services.sandbox import labels as _labels
    from megaflow.services.sandbox import setup as _setup

    image = ep.fields.get("image") or rt.settings.default_image
    # Labelled with the episode's own id: the reaper keeps it while the episode is live.
    handle = rt.env_host.create(ep.id, image, labels=_labels(rt, ep), mode="ephemeral", network=spec.network,
                                user=spec.user, workdir=spec.workdir)
    try:
        _setup(rt, handle, spec)
        if patch.strip():
            _sh(rt, handle, f"mkdir -p {SCRATCH}", spec.workdir)
            rt.env_host.put_files(handle, {MODEL_PATCH: patch})
            ok, log = _apply(rt, handle, MODEL_PATCH, spec.workdir)
            if not ok:
                return {"patch_successfully_applied": False, "resolved": False,
                        "error": "the agent's patch did not apply to a fresh checkout", "log_tail": log}
        return run_tests(rt, handle, spec, spec.workdir)
    finally:
        rt.env_host.close(handle)
