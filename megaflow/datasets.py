"""Datasets in the SWE-bench instance format, and their conversion to task specs.

An instance has ``instance_id``, ``repo``, ``base_commit``, ``problem_statement``, ``patch`` (the
reference fix), ``test_patch``, ``FAIL_TO_PASS``, ``PASS_TO_PASS`` (lists, or JSON-encoded lists
as on the Hugging Face hub) and an image name (``image_name``, ``image`` or ``docker_image``;
default: the SWE-bench eval image named after the instance). Optional: ``test_cmd`` (the test
runner; tests are appended or fill ``{tests}``), ``log_parser`` (unittest | pytest | auto),
``workdir``, ``setup`` (shell commands), and ``repo_files`` (relative path -> text, for small
self-contained repositories such as the built-in demo tasks, committed as the base in /repo).

``load_instances(path)`` reads JSONL (or a JSON list); ``instance_to_spec`` makes a TaskSpec dict
that evaluates SWE-bench style (megaflow.services.evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megaflow.core.errors import SpecError

DEMO_WORKDIR = "/repo"
SWEBENCH_WORKDIR = "/testbed"
UNITTEST_CMD = "python3 -m unittest -v"
# SWE-bench eval images keep the repo's environment in conda env "testbed"; repos whose tests
# do not run under pytest (django, sympy, ...) need an instance-level test_cmd.
SWEBENCH_TEST_CMD = ("if [ -f /opt/miniconda3/bin/activate ]; then . /opt/miniconda3/bin/activate testbed; fi; "
                     "pytest -rA")
BASE_SETUP = "git init -q && git add -A && git -c user.email=base@megaflow -c user.name=base commit -qm base"


def swebench_image(instance_id: str) -> str:
    """The SWE-bench eval image of an instance (its ``__`` becomes ``_1776_``, lower case)."""
    return f"docker.io/swebench/sweb.eval.x86_64.{instance_id.replace('__', '_1776_')}:latest".lower()


class Instance(BaseModel):
    """One SWE-bench instance (extra keys such as ``version`` or ``hints_text`` are kept)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    instance_id: str = Field(..., min_length=1, max_length=200)
    repo: str = ""
    base_commit: str = ""
    problem_statement: str = Field(..., min_length=1)
    patch: str = ""
    test_patch: str = ""
    FAIL_TO_PASS: list[str] = Field(default_factory=list)
    PASS_TO_PASS: list[str] = Field(default_factory=list)
    image_name: str | None = None
    test_cmd: str | None = None
    log_parser: str = "auto"
    workdir: str | None = None
    setup: list[str] = Field(default_factory=list)
    repo_files: dict[str, str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _image_aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("image_name"):
            for alias in ("image", "docker_image"):
                if data.get(alias):
                    data = {**data, "image_name": data[alias]}
                    break
        return data

    @field_validator("FAIL_TO_PASS", "PASS_TO_PASS", mode="before")
    @classmethod
    def _json_list(cls, v: Any) -> Any:
        if isinstance(v, str):  # the Hugging Face dataset stores them as JSON text
            try:
                v = json.loads(v) if v.strip() else []
            except json.JSONDecodeError:
                raise ValueError("must be a list of test names (or a JSON-encoded list)") from None
        return v

    @field_validator("log_parser")
    @classmethod
    def _parser(cls, v: str) -> str:
        if v not in ("auto", "unittest", "pytest"):
            raise ValueError("must be auto, unittest or pytest")
        return v

    @model_validator(mode="after")
    def _has_tests(self) -> "Instance":
        if not (self.FAIL_TO_PASS or self.PASS_TO_PASS):
            raise ValueError("FAIL_TO_PASS and PASS_TO_PASS are both empty: nothing to evaluate")
        return self


def parse_instance(raw: Any, where: str = "instance") -> Instance:
    """Validate one instance; SpecError names ``where`` and the field."""
    if isinstance(raw, Instance):
        return raw
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    try:
        return Instance.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(instance)"
        msg = "required field is missing; add it" if err["type"] == "missing" else err["msg"]
        raise SpecError(f"{where}: field '{field}': {msg}", field=field) from None


def read_records(path: str | Path, *, max_bytes: int | None = None) -> list[tuple[str, Any]]:
    """(where, record) pairs of a JSONL file (or a file holding one JSON list), read with bounds.

    Any unreadable input (a directory, /dev/zero, UTF-16, invalid UTF-8, deep JSON) raises SpecError
    naming the file and line; ``max_bytes`` defaults to MEGAFLOW_MAX_TASK_FILE_BYTES' default.
    """
    from megaflow import taskfile

    return taskfile.read_records(path, max_bytes=max_bytes or taskfile.DEFAULT_MAX_BYTES)


def load_instances(path: str | Path) -> list[dict[str, Any]]:
    """Every instance of a JSONL file, validated and normalised (lists decoded, image name set)."""
    out = []
    for where, raw in read_records(path):
        inst = parse_instance(raw, where)
        out.append(inst.model_dump())
    return out


def _agent_section(agent_config: Any) -> tuple[dict[str, Any] | None, dict[str, Any], str | None]:
    """(agent spec dict, model suggestions, workdir) from an AgentSpec dict or a mini-swe-agent config."""
    if agent_config is None:
        return None, {}, None
    from megaflow.agents.mini import MiniConfig, load_mini_config

    if isinstance(agent_config, MiniConfig):
        return agent_config.agent, agent_config.model, agent_config.workdir
    if isinstance(agent_config, (str, Path)) or (isinstance(agent_config, dict) and isinstance(
            agent_config.get("agent"), dict)):
        mini = load_mini_config(agent_config)
        return mini.agent, mini.model, mini.workdir
    if isinstance(agent_config, dict):
        return dict(agent_config), {}, None
    raise SpecError("agent_config must be an AgentSpec mapping, a mini-swe-agent config or a path to one",
                    field="agent")


def instance_to_spec(instance: dict[str, Any] | Instance, *, agent_config: Any = None,
                     model: dict[str, Any] | None = None, image: str | None = None, mode: str | None = None,
                     policy_version: str | None = None, fresh_container: bool = False,
                     test_cmd: str | None = None) -> dict[str, Any]:
    """A TaskSpec dict that runs one instance and evaluates it SWE-bench style.

    ``agent_config``: AgentSpec fields, or a mini-swe-agent YAML config (path or parsed); its
    model section (model_name, model_kwargs) is used unless ``model`` overrides it.
    """
    where = f"instance {instance.get('instance_id')}" if isinstance(instance, dict) else "instance"
    inst = parse_instance(instance, where)
    agent, model_hint, workdir_hint = _agent_section(agent_config)
    self_contained = inst.repo_files is not None
    workdir = inst.workdir or workdir_hint or (DEMO_WORKDIR if self_contained else SWEBENCH_WORKDIR)
    spec: dict[str, Any] = {
        "task_id": inst.instance_id,
        "workdir": workdir,
        "problem_statement": inst.problem_statement,
        "setup": list(inst.setup),
        "eval": {
            "command": test_cmd or inst.test_cmd or (UNITTEST_CMD if inst.log_parser == "unittest"
                                                     else SWEBENCH_TEST_CMD),
            "test_patch": inst.test_patch or None,
            "fail_to_pass": list(inst.FAIL_TO_PASS),
            "pass_to_pass": list(inst.PASS_TO_PASS),
            "log_parser": inst.log_parser,
            "fresh_container": fresh_container,
        },
        "metadata": {"instance_id": inst.instance_id, "repo": inst.repo, "base_commit": inst.base_commit},
    }
    if self_contained:
        spec["files"] = {f"{workdir.rstrip('/')}/{p}": c for p, c in inst.repo_files.items()}
        spec["setup"] = [BASE_SETUP, *spec["setup"]]
    chosen_image = image or inst.image_name or (None if self_contained else swebench_image(inst.instance_id))
    if chosen_image:
        spec["image"] = chosen_image
    if mode:
        spec["mode"] = mode
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
    out = []
    for rec in records:
        if isinstance(rec, dict) and "instance_id" in rec and "task_id" not in rec:
            out.append(instance_to_spec(rec, **kwargs))
        else:
            out.append(rec)
    return out
