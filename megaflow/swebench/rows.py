"""Dataset rows of every supported family, normalised to the harness's row shape.

Read: SWE-bench harness 5.x rows (``eval_script``, ``image``, ``log_parser``, ``eval_type``), older
SWE-bench / Lite / Verified / Multimodal rows from the Hugging Face hub (lists as JSON text),
SWE-rebench rows (``install_config``), MegaFlow-native rows (``repo_files``, ``test_cmd``).
Rejected with a message naming the field: Multi-SWE-bench rows and SWE-smith rows without an
``eval_script`` (their test commands live in their own harnesses).
"""

from __future__ import annotations

import json
import re
from typing import Any

from megaflow.core.errors import ConfigError, SpecError

SWEBENCH_WORKDIR = "/testbed"
NATIVE_WORKDIR = "/repo"
ARCH = "x86_64"
DEFAULT_NAMESPACE = "swebench"
_SHA = re.compile(r"[0-9a-f]{40}")


def instance_image(instance_id: str, namespace: str | None = DEFAULT_NAMESPACE, tag: str = "latest") -> str:
    """The harness's image name: ``sweb.eval.x86_64.<id>:latest``, ``__`` -> ``_1776_`` under a namespace."""
    key = f"sweb.eval.{ARCH}.{instance_id}:{tag}"
    if namespace:
        key = f"{namespace}/{key}".replace("__", "_1776_")
    return key.lower()


def _fail(where: str, field: str, msg: str) -> SpecError:
    return SpecError(f"{where}: field '{field}': {msg}", field=field)


def _tests(raw: dict[str, Any], key: str, where: str) -> list[str]:
    value = raw.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, str):  # the Hugging Face datasets store them as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _fail(where, key, "must be a list of test names (or a JSON-encoded list)") from None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise _fail(where, key, "must be a list of test names (strings)")
    return value


def family(raw: dict[str, Any]) -> str:
    """Which dataset family a row comes from."""
    if "org" in raw and "number" in raw and ("fix_patch" in raw or "resolved_issues" in raw):
        return "multi-swe-bench"
    if "install_config" in raw:
        return "swe-rebench"
    if "swesmith" in str(raw.get("image_name") or "") or str(raw.get("repo") or "").startswith("swesmith/"):
        return "swe-smith"
    if raw.get("repo_files") is not None:
        return "megaflow"
    if raw.get("eval_script"):
        return "swebench-5"
    return "swebench"


def _rebench(raw: dict[str, Any], where: str) -> dict[str, Any]:
    cfg = raw.get("install_config")
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError:
            raise _fail(where, "install_config", "must be a mapping (or JSON text)") from None
    if not isinstance(cfg, dict):
        raise _fail(where, "install_config", "must be a mapping with test_cmd and log_parser")
    cmd = cfg.get("test_cmd")
    if isinstance(cmd, list):
        cmd = " ; ".join(cmd)
    if not cmd:
        raise _fail(where, "install_config.test_cmd", "missing: SWE-rebench rows name their test command there")
    out = {"test_cmd": raw.get("test_cmd") or cmd, "log_parser": raw.get("log_parser") or cfg.get("log_parser")}
    if cfg.get("eval_commands"):
        out["eval_setup"] = list(cfg["eval_commands"])
    return out


def normalize(raw: Any, where: str = "instance", *, namespace: str | None = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """A harness-shaped row (with its eval script) from any supported row; SpecError names the field."""
    from megaflow.swebench import harness
    from megaflow.swebench.evalscript import make_eval_script

    harness.swebench()  # ConfigError naming the install command when the package is missing
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    kind = family(raw)
    if kind == "multi-swe-bench":
        raise _fail(
            where,
            "fix_patch",
            "a Multi-SWE-bench row: it is graded by the multi-swe-bench harness "
            "(per-language run scripts the swebench package has not); export it as a SWE-bench 5.x row "
            "(eval_script, image, log_parser, patch) to run it here",
        )
    if kind == "swe-smith" and not raw.get("eval_script"):
        raise _fail(
            where,
            "eval_script",
            "a SWE-smith row without one: its test command and bug branch live in "
            "swesmith's repository profiles; export rows with an eval_script (harness 5.x shape)",
        )
    for key in ("instance_id",):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise _fail(where, key, "required field is missing; add it")
    row: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("FAIL_TO_PASS", "PASS_TO_PASS")}
    row["FAIL_TO_PASS"] = _tests(raw, "FAIL_TO_PASS", where)
    row["PASS_TO_PASS"] = _tests(raw, "PASS_TO_PASS", where)
    if not (row["FAIL_TO_PASS"] or row["PASS_TO_PASS"]):
        raise _fail(where, "FAIL_TO_PASS", "FAIL_TO_PASS and PASS_TO_PASS are both empty: nothing to evaluate")
    if kind == "swe-rebench":
        row.update(_rebench(raw, where))
    row["family"] = kind
    row["repo"] = str(raw.get("repo") or "")
    row["version"] = str(raw.get("version") or "")
    row["problem_statement"] = str(raw.get("problem_statement") or "")
    row["patch"] = raw.get("patch") or ""
    row["test_patch"] = raw.get("test_patch") or ""
    row["base_commit"] = str(raw.get("base_commit") or "")
    image = raw.get("image") or raw.get("image_name") or raw.get("docker_image")
    if image is None and kind != "megaflow":
        image = instance_image(row["instance_id"], namespace)
    row["image"] = image
    try:
        row["log_parser"] = harness.parser_name(row.get("log_parser"), row["repo"])
        row["eval_type"] = harness.eval_type_for(row["repo"], raw.get("eval_type"))
    except (ConfigError, ValueError) as exc:  # an unknown parser / eval_type
        field = "eval_type" if isinstance(exc, ValueError) else "log_parser"
        raise _fail(where, field, str(exc)) from None
    row["workdir"] = raw.get("workdir") or (NATIVE_WORKDIR if kind == "megaflow" else SWEBENCH_WORKDIR)
    if raw.get("eval_script"):
        row["eval_script_source"] = "row"
    else:
        base = row["base_commit"] if _SHA.fullmatch(row["base_commit"]) else "HEAD"
        row["eval_script"] = make_eval_script(row, workdir=row["workdir"], base=base)
        row["eval_script_source"] = "generated"
    return row


def harness_row(row: dict[str, Any]) -> dict[str, Any]:
    """The keys ``swebench.harness.utils.make_test_spec`` reads."""
    keys = (
        "instance_id",
        "image",
        "eval_script",
        "repo",
        "version",
        "FAIL_TO_PASS",
        "PASS_TO_PASS",
        "log_parser",
        "eval_type",
        "image_assets",
    )
    return {k: row.get(k) for k in keys if k in row} | {"image": row.get("image") or ""}
