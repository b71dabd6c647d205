"""`megaflow swebench eval` and `run` on a real local fleet: predictions graded on env hosts, resumable runs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("swebench")

from typer.testing import CliRunner

from megaflow.cli.swebench import app
from megaflow.core.spec import SUBMIT_WORD
from tests.test_swebench_e2e import IID, instance  # noqa: F401  (the module-scoped image fixture)

pytestmark = pytest.mark.swebench


def cli(fleet, *args: str):
    result = CliRunner().invoke(app, list(args), env={**fleet.to_env(), "COLUMNS": "200"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_eval_grades_predictions_on_the_fleet_and_resumes(fleet, instance, tmp_path):  # noqa: F811
    data = tmp_path / "dataset.jsonl"
    data.write_text(json.dumps(instance["row"]) + "\n")
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(
        json.dumps({"instance_id": IID, "model_name_or_path": "org/m", "model_patch": instance["gold"]}) + "\n"
    )
    args = (
        "eval",
        "--dataset",
        str(data),
        "--predictions",
        str(preds),
        "--run-id",
        "fleet-1",
        "--max-workers",
        "2",
        "--timeout",
        "120",
        "--output-dir",
        str(tmp_path),
        "--user",
        "swe-fleet",
        "--wait-s",
        "300",
    )
    out = cli(fleet, *args)
    summary = json.loads((tmp_path / "org__m.fleet-1.json").read_text())
    assert summary["resolved_ids"] == [IID] and summary["error_ids"] == [], out
    local = tmp_path / "logs" / "run_evaluation" / "fleet-1" / "org__m" / IID
    assert json.loads((local / "report.json").read_text())[IID]["resolved"] is True
    assert {"test_output.txt", "patch.diff", "eval.sh", "run_instance.log"} <= {p.name for p in local.iterdir()}
    again = cli(fleet, *args)
    assert "1 already graded in run fleet-1, 0 to grade" in again


def test_agent_run_writes_predictions_and_the_summary(fleet, instance, tmp_path):  # noqa: F811
    data = tmp_path / "dataset.jsonl"
    data.write_text(json.dumps(instance["row"]) + "\n")
    fix = f"Fixing it.\n```bash\ngit apply <<'MEGAFLOW_PATCH'\n{instance['gold']}MEGAFLOW_PATCH\n```"
    model = json.dumps({"backend": "scripted", "replies": [fix, SUBMIT_WORD]})
    cli(
        fleet,
        "run",
        "--dataset",
        str(data),
        "--run-id",
        "agent-1",
        "--model-name",
        "scripted/fix",
        "--model",
        model,
        "--timeout",
        "120",
        "--output-dir",
        str(tmp_path),
        "--user",
        "swe-agent",
        "--wait-s",
        "300",
    )
    pred = json.loads((tmp_path / "agent-1" / "predictions.jsonl").read_text())
    assert pred["model_patch"] == instance["gold"] and pred["model_name_or_path"] == "scripted/fix"
    summary = json.loads((tmp_path / "scripted__fix.agent-1.json").read_text())
    assert summary["resolved_ids"] == [IID]
