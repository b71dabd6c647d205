"""Every mistake a user can make at the command line ends in one line on stderr and a documented exit status.

The cases are classes, not a list: every verb of the app (found by walking it) gets an unknown
option, its missing required arguments and malformed numbers; every verb that needs Redis is
run against a closed loopback port; unknown ids, bad files and bad settings get their own rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from megaflow.cli import base
from megaflow.cli.base import EXIT_INFRA, EXIT_INTERNAL, EXIT_UNREACHABLE, EXIT_USAGE
from megaflow.cli.errors import run
from megaflow.cli.main import app
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


class Result:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def one_error_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert "Traceback" not in self.err, self.err
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.err}"
        assert lines[0].startswith("error: "), lines[0]
        return lines[0]


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run the CLI in this process (as `megaflow ARGS` would), with a clean environment of MEGAFLOW_* settings."""
    for key in list(os.environ):
        if key.startswith("MEGAFLOW_") or key == "DOCKER_HOST":
            monkeypatch.delenv(key)
    monkeypatch.setenv("MEGAFLOW_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MEGAFLOW_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # closed unless a test sets one
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        base.State.settings = None
        base.State.debug = os.environ.get("MEGAFLOW_DEBUG") == "1"
        capsys.readouterr()
        code = run(app, list(args))
        out, err = capsys.readouterr()
        base.State.settings = None
        return Result(code, out, err)

    return invoke


# --- usage errors of every verb, found by walking the app -------------------------------------------------
def _commands() -> list[tuple[str, Any]]:
    """(verb, command) for every leaf command of the app, found through typer.main.get_command."""
    out: list[tuple[str, Any]] = []

    def walk(prefix: list[str], group: Any) -> None:
        for name, cmd in sorted(group.commands.items()):
            if hasattr(cmd, "commands"):
                walk([*prefix, name], cmd)
            else:
                out.append((" ".join([*prefix, name]), cmd))

    walk([], typer.main.get_command(app))
    return out


def _is_argument(p: Any) -> bool:
    return p.param_type_name == "argument"


def _numeric(p: Any) -> bool:
    return p.param_type_name == "option" and getattr(p.type_descriptor, "annotation", None) in (int, float)


COMMANDS = _commands()


def _fill(cmd: Any, skip: str | None = None) -> list[str]:
    """Plausible values for every required parameter of ``cmd`` except ``skip``."""
    args: list[str] = []
    for p in cmd.params:
        if not p.required or p.name == skip:
            continue
        args += ["x.jsonl"] if _is_argument(p) else [p.opts[0], "v"]
    return args


def test_every_verb_is_covered():
    names = {n for n, _ in COMMANDS}
    assert {
        "submit",
        "status",
        "cancel",
        "rollout",
        "resume",
        "report",
        "capacity",
        "quota set",
        "host drain",
        "images prefetch",
        "images build",
        "model endpoints",
        "worker",
        "metrics",
    } <= names


@pytest.mark.parametrize("verb", [n for n, _ in COMMANDS])
def test_unknown_option_is_a_usage_error(cli, verb):
    cmd = dict(COMMANDS)[verb]
    if cmd.context_settings.get("ignore_unknown_options"):
        pytest.skip(f"{verb} passes unknown options on (to vLLM)")
    res = cli(*verb.split(), *_fill(cmd), "--no-such-flag")
    assert res.code == EXIT_USAGE
    line = res.one_error_line()
    assert "--no-such-flag" in line and f"megaflow {verb} --help" in line


REQUIRED = [(verb, p.name) for verb, cmd in COMMANDS for p in cmd.params if p.required]


@pytest.mark.parametrize(("verb", "param"), REQUIRED, ids=[f"{v}-{p}" for v, p in REQUIRED])
def test_missing_required_parameter_is_a_usage_error(cli, verb, param):
    cmd = dict(COMMANDS)[verb]
    res = cli(*verb.split(), *_fill(cmd, skip=param))
    assert res.code == EXIT_USAGE
    assert "Missing" in res.one_error_line()


NUMERIC = [(verb, p.opts[0]) for verb, cmd in COMMANDS for p in cmd.params if _numeric(p)]


@pytest.mark.parametrize(("verb", "option"), NUMERIC, ids=[f"{v}{o}" for v, o in NUMERIC])
def test_malformed_number_is_a_usage_error(cli, verb, option):
    cmd = dict(COMMANDS)[verb]
    res = cli(*verb.split(), *_fill(cmd), option, "abc")
    assert res.code == EXIT_USAGE
    assert option in res.one_error_line()


def test_numeric_options_were_found():
    assert {("rollout", "--replicas"), ("submit", "--timeout"), ("worker", "--concurrency")} <= set(NUMERIC)


@pytest.mark.parametrize("args", [[], ["images"], ["quota"], ["host"], ["model"], ["no-such-verb"]])
def test_missing_or_unknown_command(cli, args):
    res = cli(*args)
    assert res.code == EXIT_USAGE
    line = res.one_error_line()
    assert "command" in line


# --- unreachable services ----------------------------------------------------------------------------------
REDIS_VERBS = [
    ["capacity"],
    ["capacity", "--json"],
    ["cancel", "b-1"],
    ["quota", "set", "alice", "3"],
    ["quota", "set", "alice", "--default"],
    ["host", "drain", "env-1"],
    ["metrics", "--once"],
    ["model", "endpoints"],
    ["model", "endpoints", "--json"],
    ["resume", "b-1"],
    ["trajectory", "e-1"],
    ["submit", str(EXAMPLES / "tasks.jsonl"), "--user", "alice"],
    ["images", "prefetch", "img:1", "--hosts", "far"],
    ["rollout", str(EXAMPLES / "tasks.jsonl"), "--out", "groups.jsonl"],
    ["submit", str(EXAMPLES / "tasks.jsonl"), "--user", "alice", "--wait", "--jsonl"],
    ["up"],
    ["demo"],
    ["worker", "agent"],
]


@pytest.mark.parametrize("args", REDIS_VERBS, ids=[" ".join(a[:2]) for a in REDIS_VERBS])
def test_redis_down_is_one_line_and_exit_5(cli, args):
    res = cli(*args)
    assert res.code == EXIT_UNREACHABLE, res.err
    assert "Redis" in res.one_error_line()


@pytest.mark.parametrize(
    "args", [["worker", "env"], ["images", "build"], ["images", "prefetch", "img:1"], ["up"], ["demo"]]
)
def test_no_docker_engine_is_one_line_and_exit_5(cli, redis_server, args):
    res = cli(*args, env={"MEGAFLOW_REDIS_URL": redis_server.url, "DOCKER_HOST": f"tcp://127.0.0.1:{free_port()}"})
    assert res.code == EXIT_UNREACHABLE, res.err
    assert "Docker" in res.one_error_line()


def test_metadata_store_down_is_exit_5(cli):
    url = f"mongodb://127.0.0.1:{free_port()}/mf?serverSelectionTimeoutMS=300&connectTimeoutMS=300"
    res = cli("status", env={"MEGAFLOW_METADATA_URL": url})
    assert res.code == EXIT_UNREACHABLE, res.err
    assert "metadata store" in res.one_error_line()


# --- unknown ids (the services answer) ---------------------------------------------------------------------
UNKNOWN_IDS = [
    (["status", "b-nope"], "b-nope"),
    (["cancel", "b-nope"], "b-nope"),
    (["resume", "b-nope"], "b-nope"),
    (["report", "b-nope"], "b-nope"),
    (["trajectory", "e-nope"], "e-nope"),
    (["host", "drain", "nope"], "nope"),
    (["images", "prefetch", "img:1", "--hosts", "env-77"], "env-77"),
]


@pytest.mark.parametrize(("args", "named"), UNKNOWN_IDS, ids=[" ".join(a[:2]) for a, _ in UNKNOWN_IDS])
def test_unknown_ids_are_errors(cli, settings, args, named):
    res = cli(*args, env={"MEGAFLOW_REDIS_URL": settings.redis_url})
    assert res.code == EXIT_USAGE, res.err + res.out
    assert named in res.one_error_line()


# --- bad files and bad values ------------------------------------------------------------------------------
def _seed_report_batch(state_dir: Path) -> None:
    from megaflow.core.settings import Settings
    from megaflow.stores import open_metadata_store

    settings = Settings.load(state_dir=str(state_dir))
    store = open_metadata_store(settings.metadata_url, settings)
    store.upsert_task(
        {
            "episode_id": "e-1",
            "batch_id": "b-1",
            "user": "u",
            "state": "SUCCEEDED",
            "phases": {"submitted": 1.0, "finished": 2.0},
        }
    )
    store.close()


def bad_input_cases(tmp: Path) -> list[tuple[list[str], str]]:
    tasks = str(EXAMPLES / "tasks.jsonl")
    (tmp / "notjson.jsonl").write_text('{"task_id": "a"}\n{oops\n')
    (tmp / "badspec.jsonl").write_text('{"task_id": "a"}\n')
    (tmp / "afile").write_text("x")
    (tmp / "bad.yaml").write_text("agent: [unclosed\n")
    (tmp / "binary.jsonl").write_bytes(b"\xff\xfe\x00 not text")
    return [
        (["submit", "nope.jsonl", "-u", "a"], "nope.jsonl"),
        (["submit", str(tmp / "notjson.jsonl"), "-u", "a"], "notjson.jsonl:2"),
        (["submit", str(tmp / "badspec.jsonl"), "-u", "a"], "badspec.jsonl:1"),
        (["submit", str(tmp), "-u", "a"], str(tmp)),
        (["submit", tasks, "-u", "a", "--model", "{backend: openai}"], "--model"),
        (["submit", tasks, "-u", "a", "--model", "[1, 2]"], "--model"),
        (["submit", tasks, "-u", "a", "--agent-config", "nope.yaml"], "nope.yaml"),
        (["submit", tasks, "-u", "a", "--agent-config", str(tmp / "bad.yaml")], "bad.yaml"),
        (["submit", tasks, "-u", "a", "--agent-config", str(EXAMPLES / "mini-swe-agent.yaml")], "--agent-config"),
        (["rollout", tasks, "-o", "o.jsonl", "--model", '{"backend": "openai"}'], "--model"),
        (["submit", tasks, "-u", "bad user!"], "user"),
        (["submit", tasks, "-u", "a", "--json", "--jsonl"], "--json"),
        (["submit", str(tmp / "binary.jsonl"), "-u", "a"], "UTF-8"),
        (["submit", tasks, "-u", "a", "--timeout", "5"], "--wait"),
        (["resume", "b-1", "--timeout", "5"], "--wait"),
        (["status", ""], "not found"),
        (["images", "prefetch", ""], "IMAGE"),
        (["quota", "set", "bad user!", "3"], "USER"),
        (["rollout", tasks, "--out", "/nonexistent/o.jsonl"], "/nonexistent/o.jsonl"),
        (["rollout", tasks, "--out", str(tmp)], str(tmp)),
        (["rollout", tasks, "--out", "o.jsonl", "--model", "nope"], "--model"),
        (["report", "b-1", "--out", str(tmp / "afile")], "afile"),
        (["report", "b-1", "--out", str(tmp / "afile" / "sub")], "afile"),
        (["quota", "set", "alice", "-1"], "N"),
        (["quota", "set", "alice"], "--default"),
        (["worker", "nope"], "ROLE"),
        (["metrics", "--loglevel", "LOUD"], "--loglevel"),
    ]


def test_bad_input_is_one_line_and_exit_2(cli, tmp_path):
    _seed_report_batch(tmp_path / "state")
    for args, named in bad_input_cases(tmp_path):
        res = cli(*args)
        assert res.code == EXIT_USAGE, (args, res.err)
        line = res.one_error_line()
        assert named in line, (args, line)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MEGAFLOW_GLOBAL_LIMIT": "abc"}, "MEGAFLOW_GLOBAL_LIMIT"),
        ({"MEGAFLOW_LEASE_S": "-"}, "MEGAFLOW_LEASE_S"),
        ({"MEGAFLOW_CONFIG": "CONFIG"}, "no_such_setting"),  # named as the YAML file spells it
    ],
)
@pytest.mark.parametrize(
    "verb",
    [
        ["capacity"],
        ["status"],
        ["submit", str(EXAMPLES / "tasks.jsonl"), "-u", "a"],
        ["images", "build"],
        ["worker", "env"],
        ["model", "endpoints"],
    ],
)
def test_bad_settings_are_one_line_and_exit_2(cli, tmp_path, env, named, verb):
    if env.get("MEGAFLOW_CONFIG") == "CONFIG":
        config = tmp_path / "megaflow.yaml"
        config.write_text("no_such_setting: 1\n")
        env = {"MEGAFLOW_CONFIG": str(config)}
    if env.get("MEGAFLOW_CONFIG") == "BADYAML":
        config = tmp_path / "megaflow.yaml"
        config.write_text("redis_url: [unclosed\n")
        env = {"MEGAFLOW_CONFIG": str(config)}
    res = cli(*verb, env=env)
    assert res.code == EXIT_USAGE, res.err
    line = res.one_error_line()
    assert named in line and "; " in line  # what is wrong; what to do


# --- --debug, internal errors, and the real entry point ----------------------------------------------------
def test_debug_shows_the_traceback_then_the_line(cli):
    res = cli("--debug", "capacity")
    assert res.code == EXIT_UNREACHABLE
    assert "Traceback" in res.err and res.err.strip().splitlines()[-1].startswith("error: cannot reach Redis")
    res = cli("capacity", env={"MEGAFLOW_DEBUG": "1"})
    assert "Traceback" in res.err


def test_a_bug_is_exit_1_with_a_hint(cli, monkeypatch):
    from megaflow.cli import resources

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(resources, "_manager", broken)
    res = cli("capacity")
    assert res.code == EXIT_INTERNAL
    line = res.one_error_line()
    assert "RuntimeError: boom" in line and "--debug" in line


def test_infra_error_is_exit_4(cli, monkeypatch):
    from megaflow.cli import resources
    from megaflow.core.errors import InfraError

    def broken() -> None:
        raise InfraError("host env-1 lost its disk")

    monkeypatch.setattr(resources, "_manager", broken)
    res = cli("capacity")
    assert res.code == EXIT_INFRA and "env-1" in res.one_error_line()


@pytest.mark.parametrize(
    ("args", "env", "code"),
    [
        (["capacity"], {}, EXIT_UNREACHABLE),
        (["capacity"], {"MEGAFLOW_GLOBAL_LIMIT": "abc"}, EXIT_USAGE),
        (["submit", "--model", "{x", str(EXAMPLES / "tasks.jsonl"), "-u", "a"], {}, EXIT_USAGE),
    ],
)
def test_python_dash_m_megaflow_exits_the_same_way(tmp_path, args, env, code):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MEGAFLOW_")}
    full.update(
        PYTHONPATH=str(ROOT),
        MEGAFLOW_STATE_DIR=str(tmp_path),
        MEGAFLOW_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        **env,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "megaflow", *args],
        check=False,
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == code, proc.stderr
    assert Result(proc.returncode, proc.stdout, proc.stderr).one_error_line()


def test_json_output_of_cancel_and_capacity(cli, settings):
    res = cli("capacity", "--json", env={"MEGAFLOW_REDIS_URL": settings.redis_url})
    assert res.code == 0 and "global" in json.loads(res.out)


def test_every_verb_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    for verb, _ in COMMANDS:
        assert f"`megaflow {verb}" in readme, f"`megaflow {verb}` is missing from the README's command table"


def test_a_closed_stdout_ends_quietly_with_141(cli, monkeypatch):
    from megaflow.cli import resources
    from megaflow.cli.base import EXIT_BROKEN_PIPE

    def closed() -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(resources, "_manager", closed)
    monkeypatch.setattr("megaflow.cli.errors._silence_stdout", lambda: None)  # capsys's stdout stays usable
    res = cli("capacity")
    assert res.code == EXIT_BROKEN_PIPE and res.err == ""


def test_artifact_store_down_is_exit_5(cli, redis_server, tmp_path, monkeypatch):
    from megaflow.core.settings import Settings
    from megaflow.stores import open_metadata_store

    seeded = Settings.load(state_dir=str(tmp_path / "state"))
    store = open_metadata_store(seeded.metadata_url, seeded)
    store.upsert_task(
        {
            "episode_id": "e-s3",
            "batch_id": "b-s3",
            "user": "u",
            "state": "SUCCEEDED",
            "artifact_uri": "s3://bucket/e-s3.json",
        }
    )
    store.close()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_RETRY_MODE": "standard",
    }.items():
        monkeypatch.setenv(key, value)
    res = cli(
        "trajectory",
        "e-s3",
        env={
            "MEGAFLOW_REDIS_URL": redis_server.url,
            "MEGAFLOW_ARTIFACTS_URL": "s3://bucket",
            "MEGAFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "MEGAFLOW_S3_REGION": "us-east-1",
        },
    )
    assert res.code == EXIT_UNREACHABLE, res.err
    assert "artifact store" in res.one_error_line()
