"""Property-based tests of the CLI's parsers and output, and the examples/ folder the README shows."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megaflow.cli import base
from megaflow.cli.base import EXIT_STATUSES, outcome_status
from megaflow.cli.batch import parse_json_option
from megaflow.cli.errors import classify, run
from megaflow.cli.main import app
from megaflow.cli.progress import Progress, format_counts
from megaflow.core import states
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
    max_leaves=8,
)


@settings(deadline=None)  # a shared, loaded machine: no per-example time limit
@given(st.dictionaries(st.text(), json_values, max_size=4))
def test_json_option_round_trips_any_object(obj):
    assert parse_json_option(json.dumps(obj), "--model") == obj


@settings(deadline=None)
@given(st.text())
def test_json_option_rejects_anything_else_as_a_usage_error(text):
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        assert parse_json_option(text, "--model") == parsed
        return
    with pytest.raises(typer.BadParameter) as err:
        parse_json_option(text, "--model")
    code, message = classify(err.value)
    assert code == base.EXIT_USAGE and "\n" not in message


@settings(deadline=None)
@given(st.dictionaries(st.sampled_from([*states.ORDER, "written", "masked"]), st.integers(0, 10_000)))
def test_format_counts_reads_back(counts):
    text = format_counts(counts)
    back = dict(item.split("=") for item in text.split()) if text else {}
    assert {k: int(v) for k, v in back.items()} == {k: v for k, v in counts.items() if v}
    known = [k for k in back if k in states.ORDER]
    assert known == sorted(known, key=states.ORDER.index)


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(sorted(states.TERMINAL)),
            st.sampled_from([None, states.CAUSE_INFRA, states.CAUSE_TESTS, states.CAUSE_TIMEOUT]),
        )
    )
)
def test_outcome_status_ranks_infra_over_failures_over_success(rows):
    results = [{"state": s, "cause": c} for s, c in rows]
    code = outcome_status(results)
    if any(c == states.CAUSE_INFRA for _, c in rows):
        assert code == base.EXIT_INFRA
    elif any(s != states.SUCCEEDED for s, _ in rows):
        assert code == base.EXIT_EPISODES_FAILED
    else:
        assert code == base.EXIT_OK


def test_piped_progress_prints_one_line_per_change():
    out = io.StringIO()
    with Progress("batch b-1", 3, stream=out) as bar:
        bar.update(0, {"QUEUED": 3})
        bar.update(0, {"QUEUED": 3})  # no change: no line
        bar.update(1, {"RUNNING": 2, "SUCCEEDED": 1})
        bar.update(3, {"SUCCEEDED": 2, "FAILED": 1})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("batch b-1: 0/3 done | QUEUED=3 | elapsed")
    assert lines[1].startswith("batch b-1: 1/3 done | RUNNING=2 SUCCEEDED=1 |") and "eta" in lines[1]
    assert lines[2].startswith("batch b-1: 3/3 done | SUCCEEDED=2 FAILED=1 |")


def test_terminal_progress_draws_a_bar_with_counts():
    out = io.StringIO()
    with Progress("batch b-2", 4, stream=out, live=True) as bar:
        bar.update(2, {"RUNNING": 2, "SUCCEEDED": 2})
    text = out.getvalue()
    assert "batch b-2" in text and "2/4" in text and "SUCCEEDED=2" in text


def test_every_exit_status_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Exit statuses") :]
    for code in EXIT_STATUSES:
        assert f"| {code} |" in section, f"exit status {code} is not documented in the README"


# --- any argv: never a traceback, always a documented status ------------------------------------------------
VERBS = {
    "submit": ["--user", "-u", "--wait", "--timeout", "--agent-config", "--model", "--json", "--jsonl"],
    "status": ["--user", "--json", "--jsonl"],
    "cancel": ["--json"],
    "rollout": ["--replicas", "-k", "--out", "--user", "--model", "--max-retries", "--timeout", "--agent-config"],
    "resume": ["--wait", "--timeout", "--json", "--jsonl"],
    "report": ["--out"],
    "trajectory": ["--out"],
    "capacity": ["--json"],
    "quota set": ["--default"],
    "host drain": ["--undo"],
    "images prefetch": ["--hosts", "--json"],
    "model endpoints": ["--json"],
}
tokens = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    st.sampled_from(
        [
            "0",
            "-1",
            "1e9",
            "{}",
            "[]",
            '{"backend": 1}',
            "nope.yaml",
            "/nonexistent/x",
            str(EXAMPLES / "tasks.jsonl"),
            str(EXAMPLES / "mini-swe-agent.yaml"),
            "--",
            "-",
        ]
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(verb=st.sampled_from(sorted(VERBS)), data=st.data())
def test_any_arguments_end_in_a_documented_status_and_at_most_one_error_line(verb, data, tmp_path, monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith("MEGAFLOW_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MEGAFLOW_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("MEGAFLOW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port()}")
    monkeypatch.chdir(tmp_path)
    args = data.draw(st.lists(st.one_of(st.sampled_from(VERBS[verb]), tokens), max_size=6))
    base.State.settings, base.State.debug = None, False
    capsys.readouterr()
    code = run(app, [*verb.split(), *args])
    err = capsys.readouterr().err
    assert code in EXIT_STATUSES
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    if code != 0:
        assert lines and lines[-1].startswith("error: ")
        assert len([line for line in lines if line.startswith("error: ")]) == 1


# --- examples/: what the README shows keeps working ------------------------------------------------------------
def test_example_task_file_is_valid():
    from megaflow.client import check_models
    from megaflow.core.settings import Settings
    from megaflow.core.spec import validate_specs
    from megaflow.datasets import read_records

    specs = validate_specs([r for _, r in read_records(EXAMPLES / "tasks.jsonl")])
    check_models(specs, Settings.load(redis_url="redis://127.0.0.1:1/0"))
    assert len(specs) >= 2 and len({s.task_id for s in specs}) == len(specs)


def test_example_rollout_file_and_mini_config_make_valid_specs():
    from megaflow.agents import validate_agent_section
    from megaflow.agents.mini import load_mini_config
    from megaflow.core.spec import validate_specs
    from megaflow.datasets import load_instances, to_specs

    mini = load_mini_config(EXAMPLES / "mini-swe-agent.yaml")
    validate_agent_section(mini.agent)  # every key honoured or rejected naming it: the example has none rejected
    instances = load_instances(EXAMPLES / "rollout.jsonl")
    specs = validate_specs(to_specs(instances, agent_config=mini, model={"backend": "scripted", "replies": ["x"]}))
    assert specs and all(s.agent.type == "mini_swe_agent" for s in specs)


def test_example_predictions_match_the_rollout_instances():
    from megaflow.datasets import load_instances

    instances = {i["instance_id"]: i for i in load_instances(EXAMPLES / "rollout.jsonl")}
    preds = [json.loads(line) for line in (EXAMPLES / "predictions.jsonl").read_text().splitlines()]
    assert preds and {p["instance_id"] for p in preds} <= set(instances)
    for p in preds:
        assert set(p) == {"instance_id", "model_name_or_path", "model_patch"}
        assert p["model_patch"].startswith("diff --git") and p["model_patch"] == instances[p["instance_id"]]["patch"]


def test_example_inventory_parses_with_every_group():
    exe = shutil.which("ansible-inventory") or str(Path(os.sys.executable).parent / "ansible-inventory")
    if not Path(exe).exists():
        pytest.skip("ansible-core is not installed (requirements-dev.txt)")
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "deploy/ansible/ansible.cfg"),
        ANSIBLE_LOCAL_TEMP="/tmp",
        ANSIBLE_HOME=str(Path("/tmp") / "ansible-home"),
    )
    proc = subprocess.run(
        [exe, "-i", str(EXAMPLES / "inventory.ini"), "--list"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    inv = json.loads(proc.stdout)
    for group in ("redis", "mongodb", "flower", "model_hosts", "agent_hosts", "env_hosts"):
        assert inv.get(group, {}).get("hosts"), group


@pytest.mark.parametrize("width", [60, 80, 1000])
def test_ids_are_never_folded(width):
    from rich.console import Console

    from megaflow.cli.tables import print_results
    from megaflow.cli.tables import render_status as render

    eid = "b-20261204-140943-2be9c9-resume2-00017"
    row = {
        "episode_id": eid,
        "task_id": "django__django-11099-a-long-instance-name",
        "state": "FAILED",
        "reward": 0.0,
        "cause": "tests_failed",
        "host": "env-host-with-a-long-name",
        "steps": 12,
    }
    data = {
        "batch_id": "b-1",
        "total": 1,
        "finished": 1,
        "counts": {"FAILED": 1},
        "throughput_per_min": None,
        "mean_reward": 0.0,
        "failures_by_cause": {"tests_failed": 1},
        "episodes": [row],
    }
    for draw in (lambda c: print_results(c, [row]), lambda c: render(c, data)):
        out = io.StringIO()
        draw(Console(file=out, width=width, force_terminal=False))
        text = out.getvalue()
        assert eid in text and row["task_id"] in text, text
        assert "tests_failed" in text and "env-host-with-a-long-name" in text, text  # nothing else dropped


# --- task files: a bad line is named by its line number in the file, blank lines included --------------------
line_kinds = st.one_of(
    st.builds(lambda t: json.dumps({"task_id": t}), st.text(max_size=8)),  # JSON, but not a complete spec
    st.builds(json.dumps, st.integers() | st.text(max_size=4)),  # JSON, not an object (a file opening with '['
    # is read as one JSON list instead, see datasets.read_records)
    st.sampled_from(["", "   "]),  # blank: skipped, still counted
    st.sampled_from(["{oops", '{"task_id": }', "nan]", "{'single': 'quotes'}"]),  # not JSON
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line_kinds, min_size=1, max_size=6))
def test_submit_names_the_first_bad_line_of_a_task_file(lines, tmp_path, monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith("MEGAFLOW_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MEGAFLOW_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("MEGAFLOW_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")

    def is_json(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True

    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    broken = [n for n, line in numbered if not is_json(line)]
    capsys.readouterr()
    code = run(app, ["submit", str(path), "-u", "alice"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == base.EXIT_USAGE and len(err) == 1 and "Traceback" not in err[0]
    if not numbered:
        assert "no specs" in err[0]
    elif broken:
        assert f"{path}:{broken[0]}: not valid JSON" in err[0]
    else:
        assert f"{path}:{numbered[0][0]}:" in err[0]
