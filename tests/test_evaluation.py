"""SWE-bench grading without services: test-output parsers, the verdict, test ids in the command."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from megaflow.services.evaluation import grade, parse_log, parse_pytest, parse_unittest, patch_files, runner_command


def test_unittest_verbose_output_of_this_python(tmp_path):
    """Parse what `python -m unittest -v` really prints (id form differs before and after 3.11)."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "test_m.py").write_text(textwrap.dedent("""\
        import unittest

        class TestM(unittest.TestCase):
            def test_ok(self):
                pass

            def test_fail(self):
                self.assertEqual(1, 2)

            def test_error(self):
                raise RuntimeError("x")

            def test_prints(self):
                print("noise from the test")

            @unittest.skip("later")
            def test_skip(self):
                pass

            @unittest.expectedFailure
            def test_xfail(self):
                self.assertEqual(1, 2)
        """))
    proc = subprocess.run([sys.executable, "-m", "unittest", "-v", "pkg.test_m"], cwd=tmp_path,
                          capture_output=True, text=True)
    status = parse_unittest(proc.stdout + proc.stderr)
    base = "pkg.test_m.TestM."
    assert status == {base + "test_ok": "PASSED", base + "test_fail": "FAILED", base + "test_error": "ERROR",
                      base + "test_prints": "PASSED", base + "test_skip": "SKIPPED", base + "test_xfail": "XFAIL"}


def test_unittest_older_id_form_and_status_on_its_own_line():
    log = ("test_a (tests.test_x.TestX) ... ok\n"
           "test_b (tests.test_x.TestX) ... some output\nFAIL\n"
           "test_c (tests.test_x.TestX.test_c)\nA docstring line ... ERROR\n"
           "ERROR: test_c (tests.test_x.TestX.test_c)\n")
    assert parse_unittest(log) == {"tests.test_x.TestX.test_a": "PASSED", "tests.test_x.TestX.test_b": "FAILED",
                                   "tests.test_x.TestX.test_c": "ERROR"}


def test_pytest_summary_and_verbose_lines():
    log = textwrap.dedent("""\
        tests/test_a.py::test_one PASSED                                  [ 25%]
        tests/test_a.py::test_two[x-1] FAILED                             [ 50%]
        =========================== short test summary info ===========================
        PASSED tests/test_a.py::test_one
        FAILED tests/test_a.py::test_two[x-1] - AssertionError: assert 1 == 2
        ERROR tests/test_b.py::test_setup - RuntimeError
        SKIPPED [1] tests/test_c.py:3: no reason
        XFAIL tests/test_c.py::test_known - bug 12
        XPASS tests/test_c.py::test_lucky
        """)
    assert parse_pytest(log) == {"tests/test_a.py::test_one": "PASSED", "tests/test_a.py::test_two[x-1]": "FAILED",
                                 "tests/test_b.py::test_setup": "ERROR", "tests/test_c.py::test_known": "XFAIL",
                                 "tests/test_c.py::test_lucky": "FAILED"}
    assert parse_log(log, "auto")["tests/test_a.py::test_one"] == "PASSED"


def test_grade_is_swebench_resolution():
    status = {"f1": "PASSED", "f2": "XFAIL", "p1": "PASSED", "p2": "FAILED"}
    r = grade(status, ["f1", "f2"], ["p1"])
    assert r["resolved"] is True
    assert r["tests_status"]["FAIL_TO_PASS"] == {"success": ["f1", "f2"], "failure": []}
    r = grade(status, ["f1", "missing"], ["p1", "p2"])
    assert r["resolved"] is False
    assert r["tests_status"]["FAIL_TO_PASS"]["failure"] == ["missing"]
    assert r["tests_status"]["PASS_TO_PASS"] == {"success": ["p1"], "failure": ["p2"]}
    assert grade({}, [], [])["resolved"] is False


def test_tests_command_and_patch_files():
    assert runner_command("pytest -rA", ["a.py::t[x y]", "b"]) == "pytest -rA 'a.py::t[x y]' b"
    assert runner_command("./runtests.py {tests} --parallel 1", ["m.T"]) == "./runtests.py m.T --parallel 1"
    patch = "diff --git a/x/t.py b/x/t.py\n--- a/x/t.py\n+++ b/x/t.py\ndiff --git a/n.py b/n.py\nnew file mode 100644\n"
    assert patch_files(patch) == ["x/t.py", "n.py"]
