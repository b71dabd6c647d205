"""The official ``swebench`` package (5.x), imported lazily: test specs, log parsers and grading.

MegaFlow does not re-implement the harness: ``make_test_spec`` turns a row into the eval script
the harness runs, ``get_eval_report`` grades a test log exactly as ``run_evaluation`` does. This
module only adapts them (a log held in memory, a clear error when the package is missing) and
adds MegaFlow-native parser names for rows written in MegaFlow's own format.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from megaflow.core.errors import ConfigError

HARNESS_VERSION = "5.0.2"
INSTALL_HINT = "pip install 'megaflow[swebench]' (or swebench==5.0.2)"
# MegaFlow-native rows (demo tasks) name their tests ``pkg.mod.Class.test_x``; harness rows never use it.
NATIVE_UNITTEST = "megaflow_unittest"
LEGACY_PARSERS = {"pytest": "parse_log_pytest", "unittest": NATIVE_UNITTEST}


def swebench():
    """The imported ``swebench`` package, or ConfigError naming the install command."""
    try:
        import swebench
        from swebench.harness import grading  # noqa: F401  (the parts MegaFlow calls)
    except ImportError as exc:
        raise ConfigError(f"SWE-bench evaluation needs the official harness package: {INSTALL_HINT} ({exc})") from None
    _register_native_parsers()
    return swebench


def constants():
    swebench()
    from swebench.harness import constants as c

    return c


def _register_native_parsers() -> None:
    from swebench.harness.log_parsers import PARSER_REGISTRY

    PARSER_REGISTRY.setdefault(NATIVE_UNITTEST, parse_native_unittest)


_UNITTEST_HEAD = re.compile(r"^(?P<name>[A-Za-z_]\w*) \((?P<where>[\w.]+)\)")
_UNITTEST_STATUS = {
    "ok": "PASSED",
    "FAIL": "FAILED",
    "ERROR": "ERROR",
    "expected failure": "XFAIL",
    "unexpected success": "FAILED",
}


def parse_native_unittest(log: str, test_spec: Any = None) -> dict[str, str]:
    """``unittest -v`` output as ``pkg.mod.Class.test_x`` ids (MegaFlow-native rows only)."""
    out: dict[str, str] = {}
    current = None
    for line in log.splitlines():
        m = _UNITTEST_HEAD.match(line)
        rest = line
        if m:
            name, where = m["name"], m["where"]
            current = where if where.endswith("." + name) else f"{where}.{name}"
            rest = line[m.end() :]
        if current is None:
            continue
        text = rest.rsplit("... ", 1)[1] if " ... " in rest or rest.startswith("... ") else (None if m else line)
        if text is None:
            continue
        text = text.strip()
        status = "SKIPPED" if text.startswith("skipped") else _UNITTEST_STATUS.get(text)
        if status:
            out[current] = status
            current = None
    return out


def repo_parsers() -> dict[str, str]:
    """repo -> name of the harness's log parser for it (every language the harness knows)."""
    swebench()
    from swebench.harness.log_parsers import PARSER_REGISTRY, c, go, java, javascript, php, python, ruby, rust

    names = {id(fn): name for name, fn in reversed(list(PARSER_REGISTRY.items()))}
    out: dict[str, str] = {}
    for module in (python, javascript, c, go, java, php, ruby, rust):
        for attr in dir(module):
            if attr.startswith("MAP_REPO_TO_PARSER"):
                for repo, fn in getattr(module, attr).items():
                    if id(fn) in names:
                        out[repo] = names[id(fn)]
    return out


def parser_name(row_parser: str | None, repo: str) -> str:
    """The harness parser a row is graded with: its own, else the repo's, else pytest's."""
    registry = parser_registry()
    name = LEGACY_PARSERS.get(row_parser or "", row_parser or "")
    if name and name != "auto":
        if name not in registry:
            raise ConfigError(
                f"field 'log_parser': {row_parser!r} is not a parser of swebench {HARNESS_VERSION} "
                f"(known: parse_log_pytest, parse_log_django, parse_log_sympy, ...)"
            )
        return name
    return repo_parsers().get(repo, "parse_log_pytest")


def parser_registry() -> dict[str, Any]:
    swebench()
    from swebench.harness.log_parsers import PARSER_REGISTRY

    return PARSER_REGISTRY


def eval_type_for(repo: str, given: str | None) -> str:
    """``pass_and_fail`` unless the row says otherwise or the harness grades the repo fail-only."""
    c = constants()
    if given:
        c.EvalType(given)  # ValueError for an unknown value
        return given
    return c.EvalType.FAIL_ONLY.value if repo in c.FAIL_ONLY_REPOS else c.EvalType.PASS_AND_FAIL.value


def make_test_spec(row: dict[str, Any]):
    """The harness's TestSpec of a harness-shaped row (its eval script records the test exit code)."""
    swebench()
    from swebench.harness.utils import make_test_spec as make

    return make(row)


def grade_log(test_spec, prediction: dict[str, Any], log: str) -> dict[str, Any]:
    """The harness's per-instance report (``get_eval_report``) of a test log held in memory."""
    swebench()
    from swebench.harness.grading import get_eval_report

    fd, path = tempfile.mkstemp(prefix="megaflow-test-output-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(log)
        report = get_eval_report(
            test_spec=test_spec, prediction=prediction, test_log_path=path, include_tests_status=True
        )
    finally:
        os.unlink(path)
    return report[prediction["instance_id"]]


def status_map(test_spec, log: str) -> tuple[dict[str, str], bool]:
    """The harness's per-test statuses of a log (``get_logs_eval``) and whether the log was valid."""
    swebench()
    from swebench.harness.grading import get_logs_eval

    fd, path = tempfile.mkstemp(prefix="megaflow-test-output-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(log)
        return get_logs_eval(test_spec, path)
    finally:
        os.unlink(path)


def apply_commands() -> list[str]:
    """``run_evaluation.GIT_APPLY_CMDS``: git apply, --3way, --reject, then patch --fuzz=5."""
    swebench()
    from swebench.harness.run_evaluation import GIT_APPLY_CMDS

    return list(GIT_APPLY_CMDS)


def markers_intact(log: str, eval_script: str) -> bool:
    """False when a harness marker occurs more often than the eval script can print it.

    Under ``set -x`` each script line holding a marker shows it once (``: 'marker'``, its trace)
    or twice (``echo``, trace and output); twice per line is allowed, so logs of any harness
    version pass. Extra copies were printed by the code under test: a forged end marker or exit
    status (the harness reads the first ``Test Exit Code`` it finds). Never used to pass a run.
    """
    c = constants()
    for marker in (c.START_TEST_OUTPUT, c.END_TEST_OUTPUT, c.TEST_EXIT_CODE):
        allowed = 2 * sum(1 for line in eval_script.splitlines() if marker in line)
        if log.count(marker) > allowed:
            return False
    return True


def late_passes(log: str, test_spec, tests: list[str]) -> list[str]:
    """Listed tests whose status turns from FAILED/ERROR to a pass later in the test output.

    The harness keeps the last status a parser sees, so a line printed after the runner's own
    summary (a conftest hook, an atexit handler) can overwrite a failure. Runners print a test's
    failure after its pass, never before (a teardown error follows PASSED), so a pass that
    follows a failure of the same test is refused. Reading is line by line with the row's parser.
    """
    c = constants()
    parser = parser_registry()[test_spec.log_parser]
    region = log
    if c.START_TEST_OUTPUT in log and c.END_TEST_OUTPUT in log:
        region = log.split(c.START_TEST_OUTPUT)[1].split(c.END_TEST_OUTPUT)[0]
    wanted = set(tests)
    failed: set[str] = set()
    late: list[str] = []
    bad = {c.TestStatus.FAILED.value, c.TestStatus.ERROR.value}
    good = {c.TestStatus.PASSED.value, c.TestStatus.XFAIL.value}
    for line in region.split("\n"):
        if not line.strip():
            continue
        try:
            statuses = parser(line, test_spec)
        except Exception:  # noqa: BLE001, S112 - a parser fed one line may trip; that line proves nothing
            continue
        for test, status in statuses.items():
            if test not in wanted:
                continue
            if status in bad:
                failed.add(test)
            elif status in good and test in failed and test not in late:
                late.append(test)
    return late


def load_hub_dataset(name: str, split: str = "test") -> list[dict[str, Any]]:
    """A dataset by its Hugging Face name, through the harness's own loader (needs the hub or its cache)."""
    swebench()
    from swebench.harness.utils import load_swebench_dataset

    try:
        return [dict(r) for r in load_swebench_dataset(name, split)]
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs the name and the cause
        raise ConfigError(f"dataset {name!r} (split {split!r}) could not be loaded: {exc}") from None
