"""SWE-bench instances: loading JSONL, clear errors, conversion to task specs; demo tasks in that form."""

from __future__ import annotations

import json

import pytest

from megaflow.datasets import (SWEBENCH_WORKDIR, instance_to_spec, load_instances, swebench_image, to_specs)
from megaflow.demo_tasks import demo_specs, instances
from megaflow.core.errors import SpecError
from megaflow.core.spec import validate_specs

REAL = {  # the shape of a SWE-bench (Verified) row, as exported from the Hugging Face hub
    "instance_id": "astropy__astropy-12907", "repo": "astropy/astropy",
    "base_commit": "d16bfe05a744909de4b27f5875fe0d4ed41ce607",
    "problem_statement": "Modeling's `separability_matrix` does not compute separability correctly for nested models",
    "patch": "diff --git a/astropy/modeling/separable.py b/astropy/modeling/separable.py\n",
    "test_patch": "diff --git a/astropy/modeling/tests/test_separable.py b/astropy/modeling/tests/test_separable.py\n",
    "FAIL_TO_PASS": json.dumps(["astropy/modeling/tests/test_separable.py::test_separable[compound_model6-result6]"]),
    "PASS_TO_PASS": json.dumps(["astropy/modeling/tests/test_separable.py::test_coord_matrix"]),
    "version": "4.3", "hints_text": "",
}


def test_demo_tasks_are_swebench_instances_and_their_specs_validate():
    insts = instances()
    assert len(insts) == 12
    for inst in insts:
        assert {"instance_id", "repo", "base_commit", "problem_statement", "patch", "test_patch", "FAIL_TO_PASS",
                "PASS_TO_PASS", "image_name"} <= set(inst)
    specs = validate_specs(demo_specs("fix"))
    assert all(s.eval.swebench and s.eval.test_patch and s.eval.log_parser == "unittest" for s in specs)
    assert specs[0].eval.fail_to_pass == insts[0]["FAIL_TO_PASS"] and specs[0].image is None


def test_load_jsonl_decodes_json_lists_and_names_the_image(tmp_path):
    path = tmp_path / "swe.jsonl"
    custom = dict(REAL, instance_id="org__repo-1", image="registry.local/repo:1", test_cmd="./run {tests}")
    path.write_text(json.dumps(REAL) + "\n\n" + json.dumps(custom) + "\n")
    real, other = load_instances(path)
    assert real["FAIL_TO_PASS"] == ["astropy/modeling/tests/test_separable.py::test_separable[compound_model6-result6]"]
    assert real["version"] == "4.3"  # extra keys are kept
    assert other["image_name"] == "registry.local/repo:1"
    spec = validate_specs([instance_to_spec(real)])[0]
    assert spec.image == swebench_image("astropy__astropy-12907") == \
        "docker.io/swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
    assert spec.workdir == SWEBENCH_WORKDIR and not spec.files and "pytest -rA" in spec.eval.command
    assert spec.metadata["base_commit"] == REAL["base_commit"]
    spec2 = validate_specs([instance_to_spec(other, fresh_container=True, policy_version="v2")])[0]
    assert spec2.eval.command == "./run {tests}" and spec2.eval.fresh_container and spec2.policy_version == "v2"


def test_bad_instances_name_the_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(REAL) + "\n" + json.dumps({k: v for k, v in REAL.items() if k != "problem_statement"}))
    with pytest.raises(SpecError, match=r"bad.jsonl:2: field 'problem_statement': required"):
        load_instances(path)
    path.write_text(json.dumps(dict(REAL, FAIL_TO_PASS="[]", PASS_TO_PASS="")) + "\n")
    with pytest.raises(SpecError, match="nothing to evaluate"):
        load_instances(path)
    path.write_text("{not json\n")
    with pytest.raises(SpecError, match="bad.jsonl:1: not valid JSON"):
        load_instances(path)
    with pytest.raises(SpecError, match="no such file"):
        load_instances(tmp_path / "missing.jsonl")


def test_agent_config_as_mini_yaml_and_mixed_task_files(tmp_path):
    cfg = tmp_path / "mini.yaml"
    cfg.write_text("agent:\n  instance_template: '{{task}}'\n  step_limit: 5\n"
                   "environment:\n  cwd: /work\nmodel:\n  model_name: m1\n  model_kwargs: {temperature: 0.2}\n")
    spec = validate_specs([instance_to_spec(REAL, agent_config=cfg, model={"backend": "openai"})])[0]
    assert spec.agent.type == "mini" and spec.agent.max_steps == 5 and spec.workdir == "/work"
    assert spec.model.backend == "openai" and spec.model.model_extra == {"model_name": "m1", "temperature": 0.2}
    mixed = to_specs([REAL, demo_specs("noop")[0]], agent_config={"max_steps": 9})
    assert mixed[0]["agent"] == {"max_steps": 9} and mixed[1] == demo_specs("noop")[0]
