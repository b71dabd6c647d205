"""One real instance end to end, no network: a local git repository, an image built here, real containers.

The evaluation step (megaflow.services.evaluation.evaluate_instance) runs on a real Redis episode
and the Docker env host: gold resolves, an empty patch does not, a forging conftest does not, an
agent that tampers with its own container does not (grading in place, the opt-in, is fooled, which
is why it is opt-in), a hanging test is an error, and the run summary is the harness's own.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("swebench")

from megaflow.core.spec import validate_specs
from megaflow.datasets import instance_to_spec
from megaflow.services.root import Root as Runtime
from megaflow.swebench import layout
from megaflow.swebench.images import build_from_git_repo
from tests.test_swebench_grading import CALC, CALC_FIXED, diff_for, git

pytestmark = pytest.mark.swebench

IID = "local__calc-7"
TESTS = textwrap.dedent("""\
    import calc


    def test_add():
        assert calc.add(1, 2) == 3


    def test_add_zero():
        assert calc.add(0, 5) == 5
    """)
ADDED = "\n\ndef test_sub():\n    assert calc.sub(3, 1) == 2\n"
SITE = (
    Path(sys.executable).parent.parent / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
)
PYTEST_PKGS = ("_pytest", "pytest", "pluggy", "iniconfig", "packaging", "pygments", "py.py")
FORGE = "def pytest_unconfigure(config):\n    print('PASSED tests/test_calc.py::test_sub')\n"
FAKE_PYTEST = (
    '#!/bin/sh\nfor t in test_add test_add_zero test_sub; do echo "PASSED tests/test_calc.py::$t"; done\nexit 0\n'
)


@pytest.fixture(scope="module")
def instance(tmp_path_factory, docker_client, sandbox_image):
    """The local instance: repo at base_commit plus an image commit on top, its image built once."""
    tmp = tmp_path_factory.mktemp("swe-e2e")
    repo = tmp / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "calc.py").write_text(CALC)
    (repo / "tests" / "test_calc.py").write_text(TESTS)
    (repo / "pytest.ini").write_text("[pytest]\npythonpath = .\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    base = git(repo, "rev-parse", "HEAD").strip()
    (repo / "setup.cfg").write_text("[metadata]\nname = calc\n")  # the image's own commit (SWE-bench images carry one)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "image set-up")
    test_patch = diff_for(repo, {"tests/test_calc.py": TESTS + ADDED})
    gold = diff_for(repo, {"calc.py": CALC_FIXED})
    pytest_bin = tmp / "pytest"
    pytest_bin.write_text("#!/usr/bin/python3\nimport sys\nimport pytest\nsys.exit(pytest.console_main())\n")
    pytest_bin.chmod(0o755)
    dist = [
        d.name
        for p in ("pytest", "pluggy", "iniconfig", "packaging", "pygments")
        for d in SITE.glob(f"{p}-*.dist-info")
    ]
    extra = {f"/usr/local/lib/python3.11/dist-packages/{p}": SITE / p for p in (*PYTEST_PKGS, *dist)}
    extra["/usr/local/bin/pytest"] = pytest_bin
    extra["/usr/bin/patch"] = Path(shutil.which("patch"))
    image = build_from_git_repo(docker_client, IID, repo, base_image=sandbox_image, extra=extra)
    row = {
        "instance_id": IID,
        "repo": "local/calc",
        "version": "1.0",
        "base_commit": base,
        "problem_statement": "sub() adds instead of subtracting.",
        "patch": gold,
        "test_patch": test_patch,
        "FAIL_TO_PASS": json.dumps(["tests/test_calc.py::test_sub"]),
        "PASS_TO_PASS": json.dumps(["tests/test_calc.py::test_add", "tests/test_calc.py::test_add_zero"]),
        "image": image,
        "test_cmd": "pytest -rA -p no:cacheprovider",
        "log_parser": "parse_log_pytest",
    }
    yield {"row": row, "gold": gold, "repo": repo, "image": image}
    docker_client.images.remove(image, force=True)


@pytest.fixture
def rt(settings, docker_client):
    runtime = Runtime(settings, role="env")
    yield runtime
    runtime.env_host.shutdown()


def episode(rt, row, **kwargs):
    kwargs = {"run_id": "e2e", "timeout_s": 60, **kwargs}
    spec = instance_to_spec(row, model={"backend": "scripted", "replies": ["x"]}, **kwargs)
    _, ids = rt.engine.create_batch(validate_specs([spec]), "swe-tester")
    return rt.engine.load(ids[0])


def agent_run(rt, instance, *commands: str, files: dict[str, str] | None = None, **kwargs) -> dict:
    """Start the agent's container, act in it, then run the evaluation step on it."""
    from megaflow.services.evaluation import evaluate_instance
    from megaflow.services.sandbox import labels

    ep = episode(rt, instance["row"], **kwargs)
    handle = rt.env_host.create(
        ep.id, instance["image"], labels=labels(rt, ep), mode="ephemeral", user=ep.spec.user, workdir=ep.spec.workdir
    )
    try:
        if files:
            rt.env_host.put_files(handle, files)
        for command in commands:
            res = rt.env_host.execute(handle, command, timeout=60, workdir="/testbed")
            assert res.exit_code == 0, res.output
        return evaluate_instance(rt, ep, handle)
    finally:
        rt.env_host.close(handle)


def brief(report: dict) -> str:
    """What a failed assertion shows: the verdict's inputs, not the whole report."""
    keys = (
        "grading",
        "error",
        "empty_patch",
        "patch_successfully_applied",
        "test_exit_code",
        "markers_intact",
        "harness_report",
        "model_patch",
    )
    return json.dumps({k: report.get(k) for k in keys}, indent=1)[:3000] + "\n" + report.get("log_tail", "")[-3000:]


def stored(rt, report: dict, name: str) -> str | None:
    uri = report["artifacts"].get(name)
    return rt.artifacts.get_bytes(uri).decode() if uri else None


def test_gold_resolves_in_a_fresh_container_and_the_patch_is_diffed_against_the_image_head(rt, instance):
    report = agent_run(rt, instance, "git apply /tmp/gold.patch", files={"/tmp/gold.patch": instance["gold"]})
    assert report["resolved"] is True and report["fresh_container"] is True, brief(report)
    assert report["model_patch"] == instance["gold"]  # the image's own commit (setup.cfg) is not in it
    harness_report = json.loads(stored(rt, report, "report.json"))[IID]
    assert harness_report["resolved"] is True
    assert harness_report["tests_status"]["FAIL_TO_PASS"]["success"] == ["tests/test_calc.py::test_sub"]
    assert ">>>>> Start Test Output" in stored(rt, report, "test_output.txt")
    assert "Applied Patch" in stored(rt, report, "run_instance.log")
    assert stored(rt, report, "patch.diff") == instance["gold"]


def test_empty_patch_does_not_resolve(rt, instance):
    report = agent_run(rt, instance, "ls")
    assert report["resolved"] is False and report["empty_patch"] is True
    assert "report.json" not in report["artifacts"]  # the harness lists it under empty_patch_ids


def test_forging_conftest_does_not_resolve(rt, instance):
    report = agent_run(rt, instance, "true", files={"/testbed/tests/conftest.py": FORGE})
    assert report["resolved"] is False, brief(report)
    assert "tests/conftest.py" in report["model_patch"]


def test_tampering_agent_does_not_resolve_but_in_place_grading_is_fooled(rt, instance):
    tamper = {"/usr/local/bin/pytest": FAKE_PYTEST, "/testbed/NOTES.md": "looked around\n"}
    report = agent_run(rt, instance, "chmod +x /usr/local/bin/pytest", files=tamper)
    assert report["resolved"] is False and report["grading"] == "fresh", brief(report)
    fooled = agent_run(rt, instance, "chmod +x /usr/local/bin/pytest", files=tamper, grading="in_place")
    assert fooled["grading"] == "in_place" and fooled["resolved"] is True  # why in place is an explicit opt-in


def test_hanging_tests_are_an_error_without_report(rt, instance):
    hang = CALC_FIXED.replace("return a - b", "import time\n    time.sleep(3600)")
    report = agent_run(rt, instance, "true", files={"/testbed/calc.py": hang}, timeout_s=15)
    assert report["resolved"] is False and report["test_timed_out"] is True
    assert "Timeout error: 15 seconds exceeded." in stored(rt, report, "test_output.txt")
    assert "report.json" not in report["artifacts"]


def test_predictions_are_graded_and_summarised_like_the_harness(rt, instance, tmp_path):
    from megaflow.services.evaluation import evaluate_instance

    preds = {IID: {"instance_id": IID, "model_name_or_path": "org/model", "model_patch": instance["gold"]}}
    ep = episode(rt, instance["row"], prediction=preds[IID])
    handle = rt.env_host.create(ep.id, instance["image"], mode="ephemeral", user=ep.spec.user, workdir=ep.spec.workdir)
    try:
        report = evaluate_instance(rt, ep, handle)
    finally:
        rt.env_host.close(handle)
    assert report["grading"] == "prediction" and report["resolved"] is True
    assert layout.read_report(rt.artifacts, "e2e", "org/model", IID)[IID]["resolved"] is True
    bad = {
        "instance_id": IID,
        "model_name_or_path": "org/model",
        "model_patch": "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n",
    }
    ep = episode(rt, instance["row"], prediction=bad, run_id="e2e-bad")
    handle = rt.env_host.create(ep.id, instance["image"], mode="ephemeral", user=ep.spec.user, workdir=ep.spec.workdir)
    try:
        report = evaluate_instance(rt, ep, handle)
    finally:
        rt.env_host.close(handle)
    assert report["resolved"] is False and report["patch_successfully_applied"] is False
    layout.mirror_run(rt.artifacts, "e2e", preds, tmp_path)
    summary = layout.run_summary(preds, [instance["row"]], "e2e", tmp_path)
    assert summary["resolved_ids"] == [IID] and summary["error_ids"] == [] and summary["resolved_instances"] == 1
    layout.mirror_run(rt.artifacts, "e2e-bad", {IID: bad}, tmp_path)
    summary = layout.run_summary({IID: bad}, [instance["row"]], "e2e-bad", tmp_path)
    assert summary["error_ids"] == [IID] and summary["resolved_ids"] == []
