"""Datasets of SWE-bench style instances, and their conversion to task specs.

Rows are read from JSONL, a JSON list or Parquet (Hugging Face exports, lists as JSON text) and
normalised by megaflow.swebench.rows: harness 5.x rows keep their ``eval_script`` / ``log_parser``
/ ``image``; older SWE-bench, Lite, Verified, Multimodal, SWE-rebench and MegaFlow-native rows get
an eval script of the harness's shape; Multi-SWE-bench and bare SWE-smith rows are rejected with a
message naming the field. MegaFlow-native rows may carry ``repo_files`` (path -> text, committed as
the base in /repo), ``setup``, ``workdir``, ``test_cmd`` and ``log_parser`` (a harness parser name,
or ``pytest`` / ``unittest``).

``instance_to_spec`` makes a TaskSpec dict graded by megaflow.services.evaluation: in a fresh
container unless ``grading="in_place"`` (RL reward speed, trusts the agent's container).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megaflow.core.errors import SpecError
from megaflow.core.spec import SUBMIT_WORD

DEMO_WORKDIR = "/repo"
SWEBENCH_WORKDIR = "/testbed"
BASE_SETUP = "git init -q && git add -A && git -c user.email=base@megaflow -c user.name=base commit -qm base"
# Row keys never copied into the spec's metadata: the gold patch must not reach the agent's record.
_PRIVATE = ("patch", "problem_statement", "hints_text")
GRADINGS = ("fresh", "in_place", "prediction")


def swebench_image(instance_id: str, namespace: str | None = "swebench") -> str:
    """The harness's instance image name (``sweb.eval.x86_64.<id>:latest``; ``__`` -> ``_1776_`` under a namespace)."""
    from megaflow.swebench.rows import instance_image

    return instance_image(instance_id, namespace)


def read_records(path: str | Path, split: str = "test", *, max_bytes: int | None = None) -> list[tuple[str, Any]]:
    """(where, record) pairs of a JSONL, JSON-list or Parquet file, or of a Hugging Face dataset name.

    Text files are read with bounds (megaflow.core.taskfile): a directory, /dev/zero, UTF-16, invalid UTF-8 or
    deep JSON raises SpecError naming the file and line; ``max_bytes`` defaults to MEGAFLOW_MAX_TASK_FILE_BYTES'.
    """
    name = str(path)
    path = Path(path)
    if not path.exists():
        if name.count("/") == 1 and not path.suffix:  # e.g. SWE-bench/SWE-bench_Verified: the harness's loader
            from megaflow.swebench.harness import load_hub_dataset

            return [(f"{name}[{i}]", r) for i, r in enumerate(load_hub_dataset(name, split))]
        raise SpecError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SpecError(f"{path}: reading Parquet needs pyarrow: pip install 'megaflow[swebench]'") from None
        return [(f"{path}[{i}]", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    from megaflow.core import taskfile

    return taskfile.read_records(path, max_bytes=max_bytes or taskfile.DEFAULT_MAX_BYTES)


def parse_instance(raw: Any, where: str = "instance", **kwargs: Any) -> dict[str, Any]:
    """One row normalised to the harness's shape (megaflow.swebench.rows); SpecError names the field."""
    from megaflow.swebench.rows import normalize

    return normalize(raw, where, **kwargs)


def load_instances(
    path: str | Path, instance_ids: Iterable[str] | None = None, *, split: str = "test", **kwargs: Any
) -> list[dict[str, Any]]:
    """Every row of a file (or hub dataset), normalised; ``instance_ids`` keeps those (an unknown id is an error)."""
    rows = [parse_instance(raw, where, **kwargs) for where, raw in read_records(path, split)]
    if instance_ids:
        wanted = list(dict.fromkeys(instance_ids))
        by_id = {r["instance_id"]: r for r in rows}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise SpecError(f"{path}: instance ids not in the dataset: {' '.join(missing)}", field="instance_ids")
        rows = [by_id[i] for i in wanted]
    return rows


def _agent_section(agent_config: Any) -> tuple[dict[str, Any] | None, dict[str, Any], str | None]:
    """(agent spec dict, model suggestions, workdir) from an AgentSpec dict or a mini-swe-agent config."""
    if agent_config is None:
        return None, {}, None
    from megaflow.agents.mini import MiniConfig, load_mini_config

    if isinstance(agent_config, MiniConfig):
        return agent_config.agent, agent_config.model, agent_config.workdir
    if isinstance(agent_config, (str, Path)) or (
        isinstance(agent_config, dict) and isinstance(agent_config.get("agent"), dict)
    ):
        mini = load_mini_config(agent_config)
        return mini.agent, mini.model, mini.workdir
    if isinstance(agent_config, dict):
        return dict(agent_config), {}, None
    raise SpecError(
        "agent_config must be an AgentSpec mapping, a mini-swe-agent config or a path to one", field="agent"
    )


def instance_to_spec(
    instance: dict[str, Any],
    *,
    agent_config: Any = None,
    model: dict[str, Any] | None = None,
    image: str | None = None,
    mode: str | None = None,
    policy_version: str | None = None,
    fresh_container: bool | None = None,
    test_cmd: str | None = None,
    grading: str | None = None,
    run_id: str | None = None,
    prediction: dict[str, Any] | None = None,
    timeout_s: float | None = None,
    namespace: str | None = "swebench",
    model_name: str | None = None,
) -> dict[str, Any]:
    """A TaskSpec dict that runs one instance and grades it like the SWE-bench harness.

    ``agent_config``: AgentSpec fields, or a mini-swe-agent YAML config (path or parsed); its model
    section is used unless ``model`` overrides it. ``prediction`` (instance_id, model_name_or_path,
    model_patch) makes an evaluation-only episode: no agent acts, the prediction's patch is graded.
    """
    where = f"instance {instance.get('instance_id')}" if isinstance(instance, dict) else "instance"
    raw = dict(instance) if isinstance(instance, dict) else instance
    if isinstance(raw, dict) and test_cmd:
        raw["test_cmd"] = test_cmd
    row = parse_instance(raw, where, namespace=namespace)
    if grading is None:
        grading = "prediction" if prediction is not None else "in_place" if fresh_container is False else "fresh"
    if grading not in GRADINGS:
        raise SpecError(f"grading must be one of {', '.join(GRADINGS)}, not {grading!r}", field="grading")
    agent, model_hint, workdir_hint = _agent_section(agent_config)
    native = row["family"] == "megaflow"
    workdir = instance.get("workdir") or workdir_hint or row["workdir"]
    row["workdir"] = workdir
    meta: dict[str, Any] = {"row": {k: v for k, v in row.items() if k not in _PRIVATE}, "grading": grading}
    if run_id:
        meta["run_id"] = run_id
    if model_name:
        meta["model_name_or_path"] = model_name
    if prediction is not None:
        meta["model_patch"] = prediction.get("model_patch")
        meta["model_name_or_path"] = prediction.get("model_name_or_path")
    ev: dict[str, Any] = {
        "command": f"bash /eval.sh  # {row['instance_id']}: the harness's eval script ({row['eval_script_source']})",
        "test_patch": row["test_patch"] or None,
        "fail_to_pass": list(row["FAIL_TO_PASS"]),
        "pass_to_pass": list(row["PASS_TO_PASS"]),
    }
    if fresh_container is not None:
        ev["fresh_container"] = fresh_container
    if timeout_s:
        ev["timeout_s"] = timeout_s
    spec: dict[str, Any] = {
        "task_id": row["instance_id"],
        "workdir": workdir,
        "problem_statement": row["problem_statement"],
        "setup": list(row.get("setup") or []),
        "eval": ev,
        "metadata": {
            "instance_id": row["instance_id"],
            "repo": row["repo"],
            "base_commit": row["base_commit"],
            "swebench": meta,
        },
    }
    if native:
        spec["files"] = {f"{workdir.rstrip('/')}/{p}": c for p, c in row["repo_files"].items()}
        spec["setup"] = [BASE_SETUP, *spec["setup"]]
    if not native:  # harness images: the repository (/testbed) is root's, and the harness runs as root
        spec["user"] = "root"
    chosen_image = image or row.get("image")
    if chosen_image:
        spec["image"] = chosen_image
    if mode:
        spec["mode"] = mode
    if prediction is not None:
        spec["model"] = {"backend": "scripted", "replies": [SUBMIT_WORD]}
        spec["problem_statement"] = spec["problem_statement"] or f"Evaluate a prediction for {row['instance_id']}."
        return spec
    if agent:
        spec["agent"] = agent
    merged_model = {**model_hint, **(model or {})}
    if merged_model:
        spec["model"] = merged_model
    if policy_version:
        spec["policy_version"] = policy_version
    return spec


def to_specs(records: Iterable[Any], **kwargs: Any) -> list[dict[str, Any]]:
    """Task specs from a mix of TaskSpec dicts (``task_id``) and SWE-bench instances (``instance_id``)."""
    from megaflow.agents.base import with_agent_section

    section = _agent_section(kwargs["agent_config"])[0] if kwargs.get("agent_config") is not None else None
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and "instance_id" in rec and "task_id" not in rec:
            out.append(instance_to_spec(rec, **kwargs))
        elif isinstance(rec, dict) and section is not None:  # --agent-config applies to task-spec lines too
            out.append(with_agent_section(rec, section, f"record {i}"))
        else:
            out.append(rec)
    return out
