"""The harness's run layout: predictions.jsonl in and out, per-instance logs, the run summary.

Per instance, under ``swebench/<run_id>/<model>/<instance_id>/`` in the artifact store (and
``logs/run_evaluation/<run_id>/<model>/<instance_id>/`` locally, as the harness writes it):
``report.json`` (only when graded), ``test_output.txt``, ``patch.diff``, ``eval.sh``,
``run_instance.log``. The run summary is the harness's own ``make_run_report`` over that tree.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
from pathlib import Path
from typing import Any

from megaflow.core.errors import SpecError

PREFIX = "swebench"
RUN_DIR = Path("logs/run_evaluation")  # swebench.harness.constants.RUN_EVALUATION_LOG_DIR
REPORT, TEST_OUTPUT, PATCH, EVAL_SH, INSTANCE_LOG = (
    "report.json",
    "test_output.txt",
    "patch.diff",
    "eval.sh",
    "run_instance.log",
)
FILES = (REPORT, TEST_OUTPUT, PATCH, EVAL_SH, INSTANCE_LOG)
_CWD_LOCK = threading.Lock()


def model_dir(model_name_or_path: str | None) -> str:
    return (model_name_or_path or "None").replace("/", "__")


def instance_key(run_id: str, model: str | None, instance_id: str, name: str = "") -> str:
    key = f"{PREFIX}/{run_id}/{model_dir(model)}/{instance_id}"
    return f"{key}/{name}" if name else key


def write_instance(
    artifacts, run_id: str, model: str | None, instance_id: str, files: dict[str, str]
) -> dict[str, str]:
    """Store one instance's files; returns name -> URI."""
    out = {}
    for name, text in files.items():
        out[name] = artifacts.put_bytes(
            instance_key(run_id, model, instance_id, name),
            text.encode(),
            content_type="application/json" if name.endswith(".json") else "text/plain",
        )
    return out


def read_report(artifacts, run_id: str, model: str | None, instance_id: str) -> dict[str, Any] | None:
    """The instance's report.json of this run, or None when it was not graded (yet)."""
    key = instance_key(run_id, model, instance_id, REPORT)
    if not artifacts.exists(key):
        return None
    try:
        return json.loads(artifacts.get_bytes(key))
    except (ValueError, OSError):
        return None


def mirror_run(artifacts, run_id: str, predictions: dict[str, dict], out_dir: str | Path) -> Path:
    """Copy the run's per-instance files from the store to ``out_dir/logs/run_evaluation/<run_id>``."""
    root = Path(out_dir) / RUN_DIR / run_id
    for iid, pred in predictions.items():
        model = pred.get("model_name_or_path")
        for name in FILES:
            key = instance_key(run_id, model, iid, name)
            if artifacts.exists(key):
                dest = root / model_dir(model) / iid / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(artifacts.get_bytes(key))
    return root


def run_summary(predictions: dict[str, dict], dataset: list[dict], run_id: str, out_dir: str | Path) -> dict:
    """The harness's ``make_run_report`` over ``out_dir``'s log tree; writes ``<model>.<run_id>.json`` there."""
    from megaflow.swebench.harness import swebench

    swebench()
    from swebench.harness.reporting import make_run_report

    out_dir = Path(out_dir).absolute()
    with _CWD_LOCK:
        old = os.getcwd()
        os.chdir(out_dir)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                path = make_run_report(predictions, dataset, run_id, None, str(out_dir))
        finally:
            os.chdir(old)
    return json.loads(Path(path).read_text())


# --- predictions ---------------------------------------------------------------------------------
def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """predictions.jsonl (or .json: a list, or a mapping id -> prediction); each needs instance_id."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: no such file", field="predictions")
    text = path.read_text()
    try:
        if path.suffix == ".json" or text.lstrip().startswith("["):
            data = json.loads(text)
            preds = list(data.values()) if isinstance(data, dict) else data
        else:
            preds = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})", field="predictions") from None
    for i, p in enumerate(preds):
        if not isinstance(p, dict) or not isinstance(p.get("instance_id"), str):
            raise SpecError(f"{path}: prediction {i}: field 'instance_id' is missing", field="instance_id")
        if "model_patch" not in p:
            raise SpecError(
                f"{path}: prediction {p['instance_id']}: field 'model_patch' is missing", field="model_patch"
            )
        p.setdefault("model_name_or_path", "None")
    return preds


def write_predictions(path: str | Path, preds: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps(
                {
                    "instance_id": p["instance_id"],
                    "model_name_or_path": p.get("model_name_or_path"),
                    "model_patch": p.get("model_patch"),
                }
            )
            + "\n"
            for p in preds
        )
    )
    return path
