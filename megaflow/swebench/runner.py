"""What evaluation runs inside a container, through the env host's calls only.

The host object is whatever ``rt.env_host`` is (Docker today, other backends later): this module
calls ``execute(handle, command, timeout=, workdir=)``, ``put_files(handle, {path: data})`` and
``get_file(handle, path)`` and reads ``exit_code`` / ``output`` / ``timed_out`` of a result; the
handle is passed through untouched.
"""

from __future__ import annotations

import shlex
import time
from typing import Any

from megaflow.core.errors import TaskError

SCRATCH = "/tmp/megaflow-eval"
CAPTURED_PATCH = f"{SCRATCH}/model.patch"
TEST_OUTPUT = f"{SCRATCH}/test_output.txt"
EVAL_SH = "/eval.sh"  # where the harness puts it
# Build artifacts never belong in a model patch (the repository's .gitignore usually covers them too).
PATCH_EXCLUDES = (
    "*.pyc",
    "*.pyo",
    "**/__pycache__/**",
    "**/*.egg-info/**",
    "**/.pytest_cache/**",
    "**/.mypy_cache/**",
    "*.so",
    "*.o",
)


class InstanceLog:
    """The per-instance log (the harness's run_instance.log), kept in memory."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        self.lines.append(f"{stamp} - INFO - {message}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _sh(host, handle, command: str, *, workdir: str | None, timeout: float):
    return host.execute(handle, command, timeout=timeout, workdir=workdir)


def head_sha(host, handle, workdir: str, timeout: float = 60) -> str:
    """The commit checked out in ``workdir`` ('' if none)."""
    res = _sh(host, handle, "git rev-parse HEAD", workdir=workdir, timeout=timeout)
    out = (res.output or "").strip().splitlines()
    return out[-1].strip() if res.exit_code == 0 and out else ""


def capture_patch(host, handle, workdir: str, base: str = "HEAD", timeout: float = 120) -> str:
    """The work in ``workdir`` as a binary git diff against ``base`` (the image's HEAD), artifacts left out.

    When ``base`` is not a commit of this container (a set-up that committed its own base), the
    oldest entry of HEAD's reflog stands in for it, then HEAD.
    """
    excludes = " ".join(shlex.quote(f":(exclude,glob){p}") for p in PATCH_EXCLUDES)
    script = (
        f"mkdir -p {SCRATCH}; B={shlex.quote(base)}; "
        'git cat-file -e "$B^{commit}" 2>/dev/null || B=$(git reflog --format=%H 2>/dev/null | tail -n 1); '
        '[ -n "$B" ] || B=HEAD; '
        f"git add -A -- . {excludes} >/dev/null 2>&1; "
        f'git -c core.fileMode=false diff --cached --binary --no-color "$B" > {CAPTURED_PATCH}'
    )
    res = _sh(host, handle, script, workdir=workdir, timeout=timeout)
    if res.exit_code != 0:
        return ""
    try:
        return host.get_file(handle, CAPTURED_PATCH).decode("utf-8", "replace")
    except TaskError:
        return ""


def apply_patch(host, handle, patch: str, workdir: str, log: InstanceLog, timeout: float = 300) -> bool:
    """Apply a model patch the way ``run_evaluation.run_instance`` does (its GIT_APPLY_CMDS, in order)."""
    from megaflow.swebench.harness import apply_commands, constants

    c = constants()
    host.put_files(handle, {c.CONTAINER_PATCH_FILE: patch.encode()})
    res = None
    for attempt, cmd in enumerate(apply_commands()):
        if attempt:  # a failed attempt (notably --reject) leaves partial state behind
            _sh(host, handle, "git checkout -- . ; git clean -fd", workdir=workdir, timeout=timeout)
        res = _sh(host, handle, f"{cmd} {c.CONTAINER_PATCH_FILE}", workdir=workdir, timeout=timeout)
        if res.exit_code == 0 and not res.timed_out:
            log.info(f"{c.APPLY_PATCH_PASS}:\n{res.output}")
            return True
        log.info(f"Failed to apply patch to container: {cmd}")
    check = _sh(host, handle, f"git apply --check --reverse {c.CONTAINER_PATCH_FILE}", workdir=workdir, timeout=timeout)
    if check.exit_code == 0:
        log.info(f"{c.APPLY_PATCH_PASS}: verified already applied")
        return True
    log.info(f"{c.APPLY_PATCH_FAIL}:\n{res.output if res else ''}")
    return False


def git_diff(host, handle, workdir: str) -> str:
    res = _sh(host, handle, "git -c core.fileMode=false diff", workdir=workdir, timeout=120)
    return (res.output or "").strip()


def run_eval_script(host, handle, script: str, timeout: float, log: InstanceLog) -> dict[str, Any]:
    """Run the eval script as the harness does (``/bin/bash /eval.sh``); the whole output is kept."""
    host.put_files(handle, {EVAL_SH: script.encode()})
    started = time.monotonic()
    res = host.execute(handle, f"mkdir -p {SCRATCH}; /bin/bash {EVAL_SH} > {TEST_OUTPUT} 2>&1", timeout=timeout)
    runtime = time.monotonic() - started
    try:
        output = host.get_file(handle, TEST_OUTPUT).decode("utf-8", "replace")
    except TaskError:
        output = res.output or ""
    log.info(f"Test runtime: {runtime:_.2f} seconds")
    return {"output": output, "timed_out": bool(res.timed_out), "runtime_s": round(runtime, 3)}
