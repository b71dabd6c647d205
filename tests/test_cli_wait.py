"""``submit --wait`` piped (progress lines, exit statuses) and ``cancel`` from the CLI, on a real fleet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megaflow.cli.base import EXIT_EPISODES_FAILED, EXIT_INFRA, EXIT_OK
from megaflow.client import Client
from megaflow.core import states
from megaflow.demo_tasks import demo_specs
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(
    r"^batch (?P<batch>b-\S+): (?P<done>\d+)/(?P<total>\d+) done(?: \| (?P<counts>[A-Z_=0-9 ]+))?"
    r" \| elapsed \S+(?:, eta \S+)?$"
)


def start(settings, *args: str) -> subprocess.Popen:
    """``python -m megaflow ARGS`` with stdout and stderr piped (not a terminal), as a CI step runs it."""
    env = dict(os.environ, **settings.to_env(), PYTHONPATH=str(ROOT))
    env.pop("MEGAFLOW_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "megaflow", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def progress_lines(stderr: str) -> list[re.Match]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    matches = [PROGRESS.match(line) for line in lines]
    assert all(matches), f"stderr holds lines that are not progress lines:\n{stderr}"
    return matches


def check_progress(stderr: str, total: int, final: dict[str, int]) -> str:
    """One line per change, done never going back, the last line the final counts; returns the batch id."""
    lines = progress_lines(stderr)
    done = [int(m["done"]) for m in lines]
    assert done == sorted(done) and done[-1] == total and {int(m["total"]) for m in lines} == {total}
    assert len({(m["done"], m["counts"]) for m in lines}) == len(lines), "a line repeats an unchanged state"
    last = dict(kv.split("=") for kv in (lines[-1]["counts"] or "").split())
    assert {k: int(v) for k, v in last.items()} == final
    return lines[0]["batch"]


def test_piped_submit_wait_reports_progress_and_exits_by_outcome(fleet, tmp_path):
    fix, noop = demo_specs("fix"), demo_specs("noop")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(fix[2]) + "\n" + json.dumps(noop[3]) + "\n")
    infra = tmp_path / "infra.jsonl"  # an image no registry serves here: the pull fails, an infrastructure failure
    infra.write_text(json.dumps(dict(fix[4], image="127.0.0.1:9/megaflow-test/absent:nope")) + "\n")
    runs = {
        "ok": start(
            fleet,
            "submit",
            str(ROOT / "examples" / "tasks.jsonl"),
            "-u",
            "wait-ok",
            "--wait",
            "--jsonl",
            "--timeout",
            "280",
        ),
        "mixed": start(fleet, "submit", str(mixed), "-u", "wait-mixed", "--wait", "--timeout", "280"),
        "infra": start(fleet, "submit", str(infra), "-u", "wait-infra", "--wait", "--json", "--timeout", "280"),
    }
    out = {name: proc.communicate(timeout=320) for name, proc in runs.items()}
    codes = {name: proc.returncode for name, proc in runs.items()}
    assert codes == {"ok": EXIT_OK, "mixed": EXIT_EPISODES_FAILED, "infra": EXIT_INFRA}, out

    # all succeeded, --jsonl: the submit line goes to stderr, stdout is one JSON object per episode
    stdout, stderr = out["ok"]
    submitted, *rest = stderr.splitlines()
    assert re.match(r"^batch b-\S+: 2 episodes submitted for wait-ok$", submitted)
    check_progress("\n".join(rest), 2, {states.SUCCEEDED: 2})
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["state"] for r in rows] == [states.SUCCEEDED] * 2

    # some failed, table: ids are whole on their line however narrow the pipe (COLUMNS is not set here)
    stdout, stderr = out["mixed"]
    batch = check_progress(stderr, 2, {states.SUCCEEDED: 1, states.FAILED: 1})
    assert stdout.startswith(f"batch {batch}: 2 episodes submitted for wait-mixed\n")
    with Client(fleet) as client:
        results = client.results(batch)
    for r in results:
        row = next(line for line in stdout.splitlines() if r["episode_id"] in line)
        assert r["state"] in row and r["task_id"] in row
    assert "tests_failed" in stdout

    # infrastructure failure, --json: one document with the cause
    stdout, stderr = out["infra"]
    check_progress("\n".join(stderr.splitlines()[1:]), 1, {states.FAILED: 1})
    doc = json.loads(stdout)
    assert [r["cause"] for r in doc["results"]] == [states.CAUSE_INFRA]


def test_wait_timeout_exits_6_and_the_batch_keeps_running(fleet, tmp_path):
    slow = tmp_path / "slow.jsonl"
    slow.write_text(json.dumps(demo_specs("fix")[5]) + "\n")
    proc = start(fleet, "submit", str(slow), "-u", "wait-timeout", "--wait", "--timeout", "0")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 6, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: batch ")
    batch = stdout.split()[1].rstrip(":")
    with Client(fleet) as client:
        client.wait(batch, timeout=200)  # it kept running


def test_cancel_right_after_submit_ends_every_unfinished_episode(fleet, tmp_path):
    """Needs the lead's cancel-in-every-state mechanism (issue 19 item 5): fails while EVALUATING ignores cancel."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(s) + "\n" for s in demo_specs("fix")))
    sub = start(fleet, "submit", str(tasks), "-u", "cancel-cli", "--json")
    stdout, stderr = sub.communicate(timeout=120)
    assert sub.returncode == 0, stderr
    batch = json.loads(stdout)["batch_id"]
    cancel = start(fleet, "cancel", batch, "--json")
    stdout, stderr = cancel.communicate(timeout=120)
    assert cancel.returncode == 0, stderr
    asked = json.loads(stdout)["cancelling"]
    with Client(fleet) as client:
        # "within seconds"; generous for this shared machine
        wait_until(
            lambda: (st := client.status(batch))["done"] == st["total"],
            60,
            lambda: f"every episode to finish after cancel: {client.status(batch)}",
            0.5,
        )
        results = client.results(batch)
    cancelled = [r for r in results if r["state"] == states.CANCELLED]
    assert len(cancelled) == asked, [(r["task_id"], r["state"], r["cause"]) for r in results]
    assert all(r["cause"] == states.CAUSE_CANCELLED for r in cancelled)


def _slow(where: str) -> dict:
    """A demo spec that sits ~50 s in one state: a long agent command (RUNNING) or a long evaluation."""
    spec = demo_specs("fix")[6]
    if where == states.RUNNING:
        spec["model"]["replies"] = ["Wait.\n```bash\nsleep 50\n```", *spec["model"]["replies"]]
    else:
        spec["eval"]["command"] = "sleep 50; " + spec["eval"]["command"]
    return spec


@pytest.mark.parametrize("where", [states.RUNNING, states.EVALUATING])
def test_cancel_stops_an_episode_busy_in_a_long_step(fleet, tmp_path, docker_client, where):
    """Needs the lead's cancel-in-every-state mechanism: the step in progress is stopped, the container removed."""
    from megaflow.env_hosts import labels

    task = tmp_path / "slow.jsonl"
    task.write_text(json.dumps(_slow(where)) + "\n")
    sub = start(fleet, "submit", str(task), "-u", f"cancel-{where.lower()}", "--json")
    stdout, stderr = sub.communicate(timeout=120)
    assert sub.returncode == 0, stderr
    batch, (eid,) = json.loads(stdout)["batch_id"], json.loads(stdout)["episode_ids"]
    with Client(fleet) as client:
        wait_until(
            lambda: client.results(batch)[0]["state"] == where,
            120,
            lambda: f"{where}: {client.results(batch)[0]}",
            0.2,
        )
        cancel = start(fleet, "cancel", batch)
        _, stderr = cancel.communicate(timeout=60)
        assert cancel.returncode == 0, stderr
        final = wait_until(  # well before the 50 s step would end by itself
            lambda: (r := client.results(batch)[0])["state"] in states.TERMINAL and r,
            25,
            lambda: f"a cancel during {where} to end the episode: {client.results(batch)[0]}",
            0.2,
        )
    assert final["state"] == states.CANCELLED, f"a cancel during {where} did not end the episode: {final}"

    def containers_left() -> list:
        return docker_client.containers.list(
            all=True, filters={"label": f"{labels.EPISODE}={eid}"}, ignore_removed=True
        )

    wait_until(  # the close runs on the episode's env host right after the cancel
        lambda: not containers_left(),
        20,
        lambda: f"the cancelled episode's containers to go: {[c.name for c in containers_left()]}",
        0.2,
    )
