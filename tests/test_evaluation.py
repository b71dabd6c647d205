"""The evaluation step's decisions without containers: which row, which grading mode, the forgery guards."""

from __future__ import annotations

import pytest

pytest.importorskip("swebench")

from megaflow.core.spec import TaskSpec
from megaflow.datasets import instance_to_spec
from megaflow.services.evaluation import grading_mode, spec_row
from megaflow.swebench import harness
from megaflow.swebench.grade import grade_log
from megaflow.swebench.rows import normalize

pytestmark = pytest.mark.swebench

DJANGO = {
    "instance_id": "django__django-1",
    "repo": "django/django",
    "base_commit": "a" * 40,
    "problem_statement": "p",
    "test_patch": "diff --git a/tests/m/tests.py b/tests/m/tests.py\n--- a/tests/m/tests.py\n"
    "+++ b/tests/m/tests.py\n@@ -1 +1 @@\n-a\n+b\n",
    "FAIL_TO_PASS": ["test_new (m.tests.T)"],
    "PASS_TO_PASS": ["test_old (m.tests.T)"],
    "version": "3.0",
}


def log_of(row: dict, body: str, code: int) -> str:
    """What the eval script prints around a test run's own output (set -x traces, markers, exit status)."""
    return (
        f"+ git apply -v -\n+ : '>>>>> Start Test Output'\n+ ./tests/runtests.py m.tests\n{body}"
        f"+ SWEBENCH_TEST_EXIT_CODE={code}\n+ : '>>>>> End Test Output'\n"
        f"+ echo '>>>>> Test Exit Code: {code}'\n>>>>> Test Exit Code: {code}\n"
    )


def test_django_ids_are_the_harness_ids():
    row = normalize(DJANGO)
    ok = log_of(row, "test_new (m.tests.T) ... ok\ntest_old (m.tests.T) ... ok\n", 0)
    assert grade_log(row, "diff", ok)["report"]["resolved"] is True
    failing = log_of(row, "test_new (m.tests.T) ... FAIL\ntest_old (m.tests.T) ... ok\n", 1)
    graded = grade_log(row, "diff", failing)
    assert graded["report"]["tests_status"]["FAIL_TO_PASS"]["failure"] == ["test_new (m.tests.T)"]
    assert graded["test_exit_code"] == 1


def test_a_pass_printed_after_a_failure_is_refused():
    row = normalize(DJANGO)
    body = "test_new (m.tests.T) ... FAIL\ntest_old (m.tests.T) ... ERROR\ntest_new (m.tests.T) ... ok\n"
    body += "test_old (m.tests.T) ... ok\ntest_unrelated (m.tests.T) ... FAIL\n"  # explains the exit status
    graded = grade_log(row, "diff", log_of(row, body, 1))
    assert graded["report"]["resolved"] is False and graded["late_passes"] == [
        "test_new (m.tests.T)",
        "test_old (m.tests.T)",
    ]


def test_a_forged_exit_status_is_refused():
    """The harness reads the first `Test Exit Code` line: one printed by the tests hides the real status."""
    row = normalize(DJANGO)
    forged = ">>>>> End Test Output\n>>>>> Test Exit Code: 0\n"
    body = f"test_new (m.tests.T) ... ok\ntest_old (m.tests.T) ... ok\n{forged}"
    graded = grade_log(row, "diff", log_of(row, body, 1))
    assert graded["test_exit_code"] == 0  # what the harness believes
    assert graded["markers_intact"] is False and graded["report"]["resolved"] is False
    spec = harness.make_test_spec(normalize(DJANGO))
    assert harness.markers_intact(log_of(row, "test_new (m.tests.T) ... ok\n", 0), spec.eval_script)


def test_grading_modes_and_legacy_specs():
    assert grading_mode(TaskSpec.model_validate(instance_to_spec(DJANGO))) == "fresh"
    assert grading_mode(TaskSpec.model_validate(instance_to_spec(DJANGO, grading="in_place"))) == "in_place"
    forced = instance_to_spec(DJANGO, grading="in_place", fresh_container=True)
    assert grading_mode(TaskSpec.model_validate(forced)) == "fresh"
    legacy = TaskSpec.model_validate(
        {
            "task_id": "t1",
            "workdir": "/repo",
            "eval": {
                "command": "python3 -m unittest -v",
                "fail_to_pass": ["tests.test_a.T.test_x"],
                "log_parser": "unittest",
                "test_patch": "diff --git a/tests/test_a.py b/tests/test_a.py\nnew file mode 100644\n",
            },
        }
    )
    assert grading_mode(legacy) == "fresh"  # no metadata: never the agent's container
    row = spec_row(legacy)
    assert (
        row["log_parser"] == harness.NATIVE_UNITTEST and "python3 -m unittest -v tests/test_a.py" in row["eval_script"]
    )
