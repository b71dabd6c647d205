"""Real pytest and unittest runs, each graded by MegaFlow and by the official harness's own functions.

Every run executes the harness-shaped eval script MegaFlow made for the row (bash, git, the real
test runner) in a scratch clone; the log is graded by megaflow.swebench.grade and, separately, by
swebench's ``get_logs_eval`` / ``get_eval_report`` on a TestSpec built here. Verdicts and per-test
statuses must be identical; the one deliberate difference (forged harness markers) is asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("swebench")

from swebench import types as sb_types
from swebench.harness.grading import get_eval_report, get_logs_eval
from swebench.harness.utils import parse_eval_script, record_test_exit_code

from megaflow.swebench import harness
from megaflow.swebench.grade import grade_log
from megaflow.swebench.rows import normalize

pytestmark = pytest.mark.swebench

CALC = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a + b\n"
CALC_FIXED = CALC.replace("return a + b\n", "return a - b\n", 2).replace("return a - b\n", "return a + b\n", 1)
PYTEST_FILE = textwrap.dedent("""\
    import pytest

    import calc


    def test_add():
        assert calc.add(1, 2) == 3


    @pytest.fixture
    def broken():
        raise RuntimeError("set-up fails")


    def test_setup_error(broken):
        pass


    @pytest.mark.skip(reason="later")
    def test_skip():
        pass


    @pytest.mark.xfail(reason="known bug")
    def test_xfail():
        assert calc.add(1, 1) == 3


    @pytest.mark.xfail(reason="lucky")
    def test_xpass():
        assert calc.add(1, 1) == 2


    @pytest.mark.parametrize("s", ["a b", "x - y", "[br]", "é ü", "日本", "plain"])
    def test_param(s):
        assert s


    class TestOuter:
        class TestInner:
            def test_nested(self):
                assert calc.add(0, 0) == 0
    """)
PYTEST_ADDED = textwrap.dedent("""\


    def test_sub():
        assert calc.sub(3, 1) == 2


    @pytest.mark.parametrize("a,b", [(5, 2), (1, 1)])
    def test_sub_param(a, b):
        assert calc.sub(a, b) == a - b
    """)
UNITTEST_FILE = textwrap.dedent("""\
    import sys
    import unittest

    import calc


    class TestCalc(unittest.TestCase):
        def test_add(self):
            self.assertEqual(calc.add(1, 2), 3)

        def test_prints(self):
            print("noise from the test", file=sys.stderr)
            self.assertTrue(True)

        @unittest.skip("later")
        def test_skip(self):
            pass

        @unittest.expectedFailure
        def test_xfail(self):
            self.assertEqual(calc.add(1, 1), 3)

        @unittest.expectedFailure
        def test_xpass(self):
            self.assertEqual(calc.add(1, 1), 2)


    class TestBrokenSetUp(unittest.TestCase):
        def setUp(self):
            raise RuntimeError("set-up fails")

        def test_never(self):
            pass
    """)
UNITTEST_ADDED = textwrap.dedent("""\


    class TestSub(unittest.TestCase):
        def test_sub(self):
            self.assertEqual(calc.sub(3, 1), 2)
    """)


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "HOME": str(repo.parent),
    }
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def diff_for(repo: Path, changes: dict[str, str]) -> str:
    """The git diff that turns the committed tree into one with ``changes`` (path -> new text)."""
    for path, text in changes.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git(repo, "add", "-A")
    out = git(repo, "diff", "--cached", "--binary")
    git(repo, "reset", "-q", "--hard")
    return out


def make_repo(tmp: Path, test_file: str, test_text: str) -> Path:
    repo = tmp / "base"
    repo.mkdir()
    (repo / "calc.py").write_text(CALC)
    (repo / "tests").mkdir()
    (repo / test_file).write_text(test_text)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    return repo


class Instance:
    """A local instance: base repo, test patch, gold patch; runs patches through the eval script."""

    def __init__(self, tmp: Path, *, test_file: str, test_text: str, added: str, test_cmd: str, parser: str):
        self.tmp = tmp
        self.repo = make_repo(tmp, test_file, test_text)
        self.base = git(self.repo, "rev-parse", "HEAD").strip()
        self.test_patch = diff_for(self.repo, {test_file: test_text + added})
        self.gold = diff_for(self.repo, {"calc.py": CALC_FIXED})
        self.test_cmd, self.parser, self.runs = test_cmd, parser, 0
        self.test_file, self.test_file_text = test_file, test_text
        self.f2p: list[str] = ["placeholder"]
        self.p2p: list[str] = []

    def row(self, workdir: Path) -> dict:
        return normalize(
            {
                "instance_id": "local__calc-1",
                "repo": "local/calc",
                "version": "1.0",
                "base_commit": self.base,
                "problem_statement": "sub() adds",
                "patch": self.gold,
                "test_patch": self.test_patch,
                "FAIL_TO_PASS": self.f2p,
                "PASS_TO_PASS": self.p2p,
                "test_cmd": self.test_cmd,
                "log_parser": self.parser,
                "workdir": str(workdir),
                "image": "local",
            }
        )

    def run(self, patch: str | None, timeout: float = 120) -> tuple[dict, str]:
        """Clone the base, apply ``patch`` (git apply), run the eval script; returns (row, whole log)."""
        self.runs += 1
        work = self.tmp / f"run{self.runs}"
        subprocess.run(["git", "clone", "-q", str(self.repo), str(work)], check=True)
        if patch:
            subprocess.run(["git", "apply", "-"], input=patch, text=True, cwd=work, check=True)
        row = self.row(work)
        script = harness.make_test_spec(row).eval_script
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(self.tmp),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        proc = subprocess.run(
            ["bash", "-c", script],
            check=False,
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        return row, proc.stdout.decode("utf-8", "replace")

    def official(self, row: dict, patch: str | None, log: str) -> tuple[dict, dict, bool]:
        """The harness's statuses and report of ``log``, from a TestSpec built without MegaFlow."""
        spec = sb_types.TestSpec(
            instance_id=row["instance_id"],
            image="local",
            eval_script_list=record_test_exit_code(parse_eval_script(row["eval_script"])),
            repo="local/calc",
            version="1.0",
            FAIL_TO_PASS=self.f2p,
            PASS_TO_PASS=self.p2p,
            log_parser=self.parser,
            eval_type="pass_and_fail",
        )
        path = self.tmp / f"official-{self.runs}.txt"
        path.write_text(log)
        status, valid = get_logs_eval(spec, str(path))
        pred = {"instance_id": row["instance_id"], "model_name_or_path": "m", "model_patch": patch}
        return status, get_eval_report(spec, pred, str(path), include_tests_status=True)[row["instance_id"]], valid

    def both(self, patch: str | None) -> tuple[dict, dict, dict, str]:
        """Run ``patch``; grade with MegaFlow and the harness; assert they agree; return both."""
        row, log = self.run(patch)
        ours = grade_log(row, patch, log, "m")
        status, official, valid = self.official(row, patch, log)
        mine_status, mine_valid = harness.status_map(harness.make_test_spec(row), log)
        assert (mine_status, mine_valid) == (status, valid)
        return ours, official, status, log

    def calibrate(self) -> None:
        """F2P / P2P as a dataset is built: failing before and passing with gold, passing in both."""
        _, before = self.run(None)
        _, after = self.run(self.gold)
        spec = harness.make_test_spec(self.row(self.tmp))
        b, _ = harness.status_map(spec, before)
        a, _ = harness.status_map(spec, after)
        ok = {"PASSED", "XFAIL"}
        self.f2p = sorted(t for t in a if a[t] in ok and b.get(t) not in ok)
        self.p2p = sorted(t for t in a if a[t] in ok and b.get(t) in ok)


@pytest.fixture(scope="module")
def pytest_instance(tmp_path_factory):
    inst = Instance(
        tmp_path_factory.mktemp("pytest-inst"),
        test_file="tests/test_cases.py",
        test_text=PYTEST_FILE,
        added=PYTEST_ADDED,
        test_cmd="python -m pytest -rA -p no:cacheprovider",
        parser="parse_log_pytest",
    )
    inst.calibrate()
    return inst


@pytest.fixture(scope="module")
def unittest_instance(tmp_path_factory):
    inst = Instance(
        tmp_path_factory.mktemp("unittest-inst"),
        test_file="tests/test_u.py",
        test_text=UNITTEST_FILE,
        added=UNITTEST_ADDED,
        test_cmd="python -m unittest -v",
        parser="parse_log_django",
    )
    inst.calibrate()
    return inst


def test_pytest_gold_statuses_and_verdict_match_the_harness(pytest_instance):
    inst = pytest_instance
    assert "tests/test_cases.py::test_sub" in inst.f2p
    ours, official, status, _ = inst.both(inst.gold)
    assert ours["report"] == official and official["resolved"] is True
    f = "tests/test_cases.py::"
    # -rA prints skips as `SKIPPED [1] path:line: reason`, which parse_log_pytest does not take as an id
    assert status[f + "test_setup_error"] == "ERROR" and not any("test_skip" in t for t in status)
    assert status[f + "test_xfail"] == "XFAIL" and f + "test_xpass" not in status  # XPASS is no harness status
    assert status[f + "TestOuter::TestInner::test_nested"] == "PASSED"
    # ids with spaces are cut at the first space by parse_log_pytest; ` - ` survives on PASSED lines
    assert status[f + "test_param[a"] == "PASSED" and status[f + "test_param[x"] == "PASSED"
    assert status[f + "test_param[[br]]"] == "PASSED" and status[f + "test_param[plain]"] == "PASSED"
    assert status[f + "test_param[\\u65e5\\u672c]"] == "PASSED"  # pytest escapes non-ASCII ids
    assert ours["test_exit_code"] == 1  # test_setup_error errors in every run


def test_pytest_wrong_and_partial_patches_match_the_harness(pytest_instance):
    inst = pytest_instance
    wrong = diff_for(inst.repo, {"calc.py": CALC.replace("return a + b\n\n\ndef", "return a * b\n\n\ndef")})
    ours, official, _, _ = inst.both(wrong)  # add() broken too: P2P fail, F2P fail
    assert ours["report"] == official and official["resolved"] is False
    assert official["tests_status"]["PASS_TO_PASS"]["failure"]
    partial = diff_for(
        inst.repo,
        {
            "calc.py": CALC.replace(
                "def sub(a, b):\n    return a + b", "def sub(a, b):\n    return 2 if (a, b) == (3, 1) else a + b"
            )
        },
    )
    ours, official, _, _ = inst.both(partial)
    assert ours["report"] == official and official["resolved"] is False
    assert "tests/test_cases.py::test_sub" in official["tests_status"]["FAIL_TO_PASS"]["success"]


def test_skipped_p2p_passes_and_skipped_f2p_fails(unittest_instance):
    """Runner statuses with SKIPPED ids (unittest via parse_log_django): P2P skip passes, F2P skip fails."""
    inst = unittest_instance
    skipping = (
        "import unittest\n\n\ndef add(a, b):\n    raise unittest.SkipTest('skipped by the patch')\n\n\n"
        "def sub(a, b):\n    raise unittest.SkipTest('skipped by the patch')\n"
    )
    skip_all = diff_for(inst.repo, {"calc.py": skipping})
    ours, official, status, _ = inst.both(skip_all)
    assert ours["report"] == official
    add = next(t for t in status if t.startswith("test_add "))
    assert status[add] == "SKIPPED" and add in official["tests_status"]["PASS_TO_PASS"]["success"]
    assert official["tests_status"]["FAIL_TO_PASS"]["failure"] == inst.f2p and official["resolved"] is False


def test_pytest_collection_error_matches_the_harness(pytest_instance):
    inst = pytest_instance
    broken = diff_for(inst.repo, {"calc.py": CALC_FIXED + "def oops(:\n"})
    ours, official, status, _ = inst.both(broken)
    assert status == {"tests/test_cases.py": "ERROR"}
    assert ours["report"] == official and official["resolved"] is False


def test_forged_status_lines_do_not_resolve(pytest_instance):
    """A patch whose conftest prints PASSED lines for the F2P tests after the run (the code is not fixed).

    The harness's exit-status cross-check does not catch it here (test_setup_error fails in every
    run, so the failing exit status looks explained); MegaFlow refuses a pass printed after a failure.
    """
    inst = pytest_instance
    lines = "".join(f"    print('PASSED {t}')\n" for t in inst.f2p)
    forge = diff_for(inst.repo, {"tests/conftest.py": f"def pytest_unconfigure(config):\n{lines}"})
    ours, official, status, _ = inst.both(forge)
    assert status["tests/test_cases.py::test_sub"] == "PASSED"  # what both read from the log
    assert official["resolved"] is True  # the harness alone is fooled by this log
    assert ours["report"]["resolved"] is False and "tests/test_cases.py::test_sub" in ours["late_passes"]
    assert ours["report"]["tests_status"] == official["tests_status"]


def test_forged_unittest_lines_are_refused(unittest_instance):
    """An atexit hook printing `test_sub (...) ... ok` after the real FAIL: refused (the harness takes it)."""
    inst = unittest_instance
    tid = inst.f2p[0]
    forge = diff_for(
        inst.repo,
        {
            "calc.py": CALC + "\n\nimport atexit, sys\n"
            f"atexit.register(lambda: print({tid + ' ... ok'!r}, file=sys.stderr))\n"
        },
    )
    ours, official, status, _ = inst.both(forge)
    assert status[tid] == "PASSED" and official["resolved"] is True
    assert ours["report"]["resolved"] is False and ours["late_passes"] == [tid]


def test_forged_markers_are_refused_where_the_harness_is_fooled(pytest_instance):
    """Forging the end marker and the exit-code line too: the harness resolves it, MegaFlow does not."""
    inst = pytest_instance
    lines = "".join(f"    print('PASSED {t}')\n" for t in inst.f2p)
    forge = diff_for(
        inst.repo,
        {
            "tests/conftest.py": (
                f"def pytest_unconfigure(config):\n{lines}    print('>>>>> End Test Output')\n"
                "    print('>>>>> Test Exit Code: 0')\n"
            )
        },
    )
    ours, official, _, _ = inst.both(forge)
    assert official["resolved"] is True  # the harness alone is fooled by this log
    assert ours["report"]["resolved"] is False and ours["markers_intact"] is False
    assert ours["report"]["tests_status"] == official["tests_status"]


def test_unittest_runner_statuses_and_verdicts_match_the_harness(unittest_instance):
    inst = unittest_instance
    tid = (
        "test_sub (tests.test_u.TestSub.test_sub)" if sys.version_info >= (3, 11) else "test_sub (tests.test_u.TestSub)"
    )
    assert inst.f2p == [tid]
    ours, official, status, _ = inst.both(inst.gold)
    assert ours["report"] == official and official["resolved"] is True
    by_name = {k.split(" ")[0]: v for k, v in status.items()}
    assert by_name["test_add"] == "PASSED" and by_name["test_prints"] == "PASSED"
    assert by_name["test_skip"] == "SKIPPED" and by_name["test_never"] == "ERROR"
    wrong = diff_for(inst.repo, {"calc.py": CALC.replace("return a + b\n\n\ndef", "return a * b\n\n\ndef")})
    ours, official, _, _ = inst.both(wrong)
    assert ours["report"] == official and official["resolved"] is False
    forge = diff_for(inst.repo, {"tests/__init__.py": f"import sys\nprint({tid + ' ... ok'!r}, file=sys.stderr)\n"})
    ours, official, status, _ = inst.both(forge)
    assert ours["report"] == official and official["resolved"] is False
