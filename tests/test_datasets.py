"""Dataset rows of every family: loading (JSONL, JSON, Parquet), clear errors, conversion to task specs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("swebench")

from megaflow.core.errors import SpecError
from megaflow.core.spec import validate_specs
from megaflow.datasets import SWEBENCH_WORKDIR, instance_to_spec, load_instances, swebench_image, to_specs
from megaflow.demo_tasks import demo_specs, instances
from megaflow.swebench import harness

pytestmark = pytest.mark.swebench

REAL = {  # the shape of a SWE-bench (Verified) row, as exported from the Hugging Face hub
    "instance_id": "astropy__astropy-12907",
    "repo": "astropy/astropy",
    "base_commit": "d16bfe05a744909de4b27f5875fe0d4ed41ce607",
    "problem_statement": "Modeling's `separability_matrix` does not compute separability correctly for nested models",
    "patch": "diff --git a/astropy/modeling/separable.py b/astropy/modeling/separable.py\n",
    "test_patch": (
        "diff --git a/astropy/modeling/tests/test_separable.py b/astropy/modeling/tests/test_separable.py\n"
        "--- a/astropy/modeling/tests/test_separable.py\n+++ b/astropy/modeling/tests/test_separable.py\n"
        "@@ -1 +1 @@\n-a\n+b\n"
    ),
    "FAIL_TO_PASS": json.dumps(["astropy/modeling/tests/test_separable.py::test_separable[compound_model6-result6]"]),
    "PASS_TO_PASS": json.dumps(["astropy/modeling/tests/test_separable.py::test_coord_matrix"]),
    "version": "4.3",
    "hints_text": "",
    "environment_setup_commit": "298ccb478e6bf092953bca67a3d29dc6c35f6752",
}
HARNESS5 = dict(
    REAL,
    instance_id="django__django-11099",
    repo="django/django",
    version="3.0",
    image="swebench/sweb.eval.x86_64.django_1776_django-11099:latest",
    log_parser="parse_log_django",
    eval_type="pass_and_fail",
    FAIL_TO_PASS=json.dumps(["test_x (auth_tests.test_validators.T)"]),
    eval_script="#!/bin/bash\nset -uxo pipefail\ncd /testbed\n: '>>>>> Start Test Output'\n"
    "./tests/runtests.py --verbosity 2 auth_tests.test_validators\n"
    ": '>>>>> End Test Output'\n",
)


def test_demo_tasks_are_graded_by_the_harness_in_a_fresh_container():
    insts = instances()
    assert len(insts) == 12
    specs = validate_specs(demo_specs("fix"))
    row = specs[0].metadata["swebench"]["row"]
    assert row["log_parser"] == harness.NATIVE_UNITTEST and row["eval_script_source"] == "generated"
    assert specs[0].metadata["swebench"]["grading"] == "fresh" and "patch" not in row
    assert "python3 -m unittest -v tests/" in row["eval_script"] and ": '>>>>> Start Test Output'" in row["eval_script"]


def test_hub_rows_decode_lists_and_get_a_harness_shaped_script(tmp_path):
    path = tmp_path / "swe.jsonl"
    path.write_text(
        json.dumps(REAL) + "\n\n" + json.dumps(dict(REAL, instance_id="o__r-1", image_name="reg/r:1")) + "\n"
    )
    real, other = load_instances(path)
    assert real["FAIL_TO_PASS"] == ["astropy/modeling/tests/test_separable.py::test_separable[compound_model6-result6]"]
    assert real["version"] == "4.3" and real["environment_setup_commit"]  # extra keys are kept
    assert other["image"] == "reg/r:1"
    assert (
        real["image"]
        == swebench_image(REAL["instance_id"])
        == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
    )
    assert swebench_image("django__django-1", None) == "sweb.eval.x86_64.django__django-1:latest"
    script = real["eval_script"]
    assert f"git checkout {REAL['base_commit']} astropy/modeling/tests/test_separable.py" in script
    assert "pytest -rA -vv -o console_output_style=classic --tb=no astropy/modeling/tests/test_separable.py" in script
    assert "compound_model6" not in script.split("EOF_114329324912")[-1]  # no test id on the command line
    spec = validate_specs([instance_to_spec(REAL)])[0]
    assert spec.workdir == SWEBENCH_WORKDIR and spec.image == real["image"]
    assert "patch" not in spec.metadata["swebench"]["row"]  # the gold patch never reaches the episode record


def test_thousands_of_test_ids_stay_off_the_command_line():
    many = dict(REAL, PASS_TO_PASS=json.dumps([f"astropy/x/test_y.py::test_{i}[a b - c]" for i in range(5000)]))
    script = load_rows([many])[0]["eval_script"]
    assert len(script) < 2000 and "test_4999" not in script


def load_rows(raws):
    from megaflow.swebench.rows import normalize

    return [normalize(r) for r in raws]


def test_harness5_rows_keep_their_script_parser_and_image():
    row = load_rows([HARNESS5])[0]
    assert row["eval_script"] == HARNESS5["eval_script"] and row["eval_script_source"] == "row"
    spec = harness.make_test_spec(harness_row_of(row))
    assert spec.log_parser == "parse_log_django" and spec.image == HARNESS5["image"]
    assert ">>>>> Test Exit Code" in spec.eval_script  # the harness records the test command's exit status
    generated = load_rows(
        [
            dict(
                REAL,
                repo="django/django",
                test_patch=REAL["test_patch"].replace(
                    "astropy/modeling/tests/test_separable.py", "tests/auth_tests/test_validators.py"
                ),
            )
        ]
    )[0]
    assert (
        "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 auth_tests.test_validators"
        in generated["eval_script"]
        and generated["log_parser"] == "parse_log_django"
    )
    assert load_rows([dict(REAL, repo="sympy/sympy")])[0]["log_parser"] == "parse_log_sympy"


def harness_row_of(row):
    from megaflow.swebench.rows import harness_row

    return harness_row(row)


def test_rebench_rows_use_their_install_config():
    rebench = dict(
        REAL,
        instance_id="o__p-2",
        repo="o/p",
        docker_image="swerebench/sweb.eval.x86_64.o_1776_p-2",
        install_config={"test_cmd": "pytest --no-header -rA --tb=line", "log_parser": "parse_log_pytest"},
    )
    row = load_rows([rebench])[0]
    assert row["family"] == "swe-rebench" and row["image"] == rebench["docker_image"]
    assert "pytest --no-header -rA --tb=line astropy/modeling/tests/test_separable.py" in row["eval_script"]


def test_unsupported_rows_are_rejected_naming_the_field(tmp_path):
    multi = {"org": "o", "repo": "r", "number": 1, "instance_id": "o__r-1", "fix_patch": "", "test_patch": ""}
    with pytest.raises(SpecError, match="field 'fix_patch': a Multi-SWE-bench row"):
        load_rows([multi])
    smith = dict(REAL, instance_id="o__r.abc.func_x", repo="swesmith/o__r.abc", image_name="jyangballin/swesmith.x")
    with pytest.raises(SpecError, match="field 'eval_script': a SWE-smith row"):
        load_rows([smith])
    assert load_rows([dict(smith, eval_script=HARNESS5["eval_script"])])[0]["family"] == "swe-smith"
    with pytest.raises(SpecError, match="field 'log_parser'"):
        load_rows([dict(REAL, log_parser="parse_log_nonesuch")])
    with pytest.raises(SpecError, match="field 'eval_type'"):
        load_rows([dict(REAL, eval_type="sometimes")])
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(REAL) + "\n" + json.dumps({k: v for k, v in REAL.items() if k != "instance_id"}))
    with pytest.raises(SpecError, match=r"bad.jsonl:2: field 'instance_id': required"):
        load_instances(path)
    path.write_text(json.dumps(dict(REAL, FAIL_TO_PASS="[]", PASS_TO_PASS="")) + "\n")
    with pytest.raises(SpecError, match="nothing to evaluate"):
        load_instances(path)
    path.write_text(json.dumps(dict(REAL, FAIL_TO_PASS="not json")) + "\n")
    with pytest.raises(SpecError, match="field 'FAIL_TO_PASS'"):
        load_instances(path)
    with pytest.raises(SpecError, match="no such file"):
        load_instances(tmp_path / "missing.jsonl")
    with pytest.raises(SpecError, match="not in the dataset: nope"):
        load_instances(_one(tmp_path), ["nope"])


def _one(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(REAL) + "\n")
    return path


def test_parquet_rows_as_exported_from_the_hub(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist([REAL, dict(REAL, instance_id="astropy__astropy-1")]), path)
    rows = load_instances(path, ["astropy__astropy-1"])
    assert [r["instance_id"] for r in rows] == ["astropy__astropy-1"] and rows[0]["FAIL_TO_PASS"]


def test_prediction_specs_and_agent_configs(tmp_path):
    pred = {"instance_id": REAL["instance_id"], "model_name_or_path": "org/m", "model_patch": "diff"}
    spec = validate_specs([instance_to_spec(REAL, prediction=pred, run_id="r1")])[0]
    meta = spec.metadata["swebench"]
    assert meta["grading"] == "prediction" and meta["model_patch"] == "diff" and meta["run_id"] == "r1"
    assert spec.model.backend == "scripted"
    in_place = validate_specs([instance_to_spec(REAL, fresh_container=False)])[0]
    assert in_place.metadata["swebench"]["grading"] == "in_place"
    cfg = tmp_path / "mini.yaml"
    cfg.write_text(
        "agent:\n  instance_template: '{{task}}'\n  step_limit: 5\n"
        "environment:\n  cwd: /work\nmodel:\n  model_name: m1\n  model_kwargs: {temperature: 0.2}\n"
    )
    spec = validate_specs([instance_to_spec(REAL, agent_config=cfg, model={"backend": "openai"})])[0]
    # mini-swe-agent's own agent, stepped: its config whole; its model kwargs travel with each request
    assert spec.agent.type == "mini_swe_agent" and spec.workdir == "/work"
    assert spec.agent.config["agent"]["step_limit"] == 5
    assert spec.agent.config["model"]["model_kwargs"] == {"temperature": 0.2}
    assert spec.model.backend == "openai"
    # --agent-config applies to task-spec lines as well as instance lines
    mixed = to_specs([REAL, demo_specs("noop")[0]], agent_config={"max_steps": 9})
    assert mixed[0]["agent"] == {"max_steps": 9} and mixed[1]["agent"] == {"max_steps": 9}
