"""``megaflow flower`` on the shared fleet: Flower's HTTP API and its tasks page in headless Chromium
show the fleet's workers and the megaflow.* tasks of a real batch, with short readable arguments;
basic auth is enforced; the state survives a restart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from conftest import IN_CI, free_port
from pydantic import SecretStr

from megaflow import Client
from megaflow.core.errors import ConfigError
from megaflow.core.settings import Settings
from megaflow.core.wire import task_argsrepr
from megaflow.demo_tasks import demo_specs
from megaflow.monitoring.flower import flower_options
from tests.helpers import wait_until

USER, PASSWORD = "flower-admin", "pa:ss,word with spaces"


def test_argsrepr_is_short_and_names_episode_step_and_host():
    assert task_argsrepr("megaflow.agent.step", ["ep-1", 3], "agent") == "ep=ep-1 step=3"
    assert task_argsrepr("megaflow.env.exec", ["ep-1", 4], "env.h7") == "ep=ep-1 step=4 host=h7"
    handle = {"container_id": "0123456789abcdef0123", "host": "h8", "image": "x", "labels": {"a": "b" * 500}}
    assert task_argsrepr("megaflow.env.close", ["ep-1", handle], "env.h7") == "ep=ep-1 env=0123456789ab host=h8"
    assert len(task_argsrepr("other", [["img"] * 200], "env.h1")) <= 160


def test_flower_options_need_credentials(tmp_path):
    base = Settings.load(state_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="MEGAFLOW_FLOWER_USER and MEGAFLOW_FLOWER_PASSWORD"):
        flower_options(base)
    with pytest.raises(ConfigError, match="':'"):
        flower_options(base.model_copy(update={"flower_user": "a:b", "flower_password": SecretStr("x")}))
    opts = flower_options(base.model_copy(update={"flower_user": "u", "flower_password": SecretStr("p,w")}), port=1234)
    assert opts["basic_auth"] == ["u:p,w"] and opts["persistent"] is True
    assert opts["db"] == str(tmp_path / "flower.db") and opts["address"] == "127.0.0.1" and opts["port"] == 1234
    assert "args" in opts["tasks_columns"].split(",")


def test_flower_command_refuses_to_start_without_credentials(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from megaflow.cli import app

    monkeypatch.delenv("MEGAFLOW_FLOWER_USER", raising=False)
    monkeypatch.delenv("MEGAFLOW_FLOWER_PASSWORD", raising=False)
    monkeypatch.setenv("MEGAFLOW_STATE_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["flower", "--port", str(free_port())])
    assert isinstance(result.exception, ConfigError) and "MEGAFLOW_FLOWER_PASSWORD" in str(result.exception)


class FlowerProc:
    """``megaflow flower`` as a child process on a free loopback port."""

    def __init__(self, settings: Settings, log: Path):
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, **self.settings.to_env())
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "megaflow", "flower", "--port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def answers() -> bool:
            try:
                if httpx.get(f"{self.url}/healthcheck", timeout=2).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, f"flower exited:\n{self.log.read_text()}"
            return False

        wait_until(answers, 60, lambda: f"flower to answer:\n{self.log.read_text()}", 0.3)

    def get(self, path: str, auth=(USER, PASSWORD)) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", auth=auth, timeout=15)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def poll(what: str, fn, timeout: float = 60.0):
    """Call ``fn`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    last = None

    def attempt():
        nonlocal last
        last = fn()
        return last

    return wait_until(attempt, timeout, lambda: f"{what} (last: {last!r})", 0.5)


def chromium_dom(url: str, profile: Path) -> str:
    """The tasks page after its scripts ran, as headless Chromium (Debian's package) renders it."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        if IN_CI:
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    proc = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=8000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_flower_shows_fleet_workers_and_tasks(fleet, tmp_path):
    settings = fleet.model_copy(
        update={
            "flower_user": USER,
            "flower_password": SecretStr(PASSWORD),
            "state_dir": str(tmp_path / "flower-state"),
        }
    )
    flower = FlowerProc(settings, tmp_path / "flower.log")
    flower.start()
    try:
        # auth: none, wrong, right
        assert flower.get("/api/workers", auth=None).status_code == 401
        assert flower.get("/api/tasks", auth=(USER, "wrong")).status_code == 401
        assert flower.get("/tasks", auth=None).status_code == 401

        with Client(fleet) as client:
            sub = client.submit(demo_specs("fix")[:2], user="flower-test")
            client.wait(sub.batch_id, timeout=180)
        eids = set(sub.episode_ids)

        nodes = {"model@test-host", "agent@test-host", "env@env-1", "env@env-2"}
        workers = poll(
            "the fleet's workers in /api/workers",
            lambda: (w := flower.get("/api/workers?refresh=1").json()) and nodes <= set(w) and w,
        )
        assert "megaflow.agent.step" in workers["agent@test-host"]["registered"]
        queues = flower.get("/api/queues/length").json()["active_queues"]  # read with the broker's key prefix
        assert {"model", "agent", "env", "env.env-1", "env.env-2"} <= {q["name"] for q in queues}, queues

        def my_tasks():
            tasks = flower.get("/api/tasks").json()
            mine = [t for t in tasks.values() if any(f"ep={e} " in f"{t['args']} " for e in eids)]
            names = {t["name"] for t in mine}
            want = {
                "megaflow.env.provision",
                "megaflow.agent.step",
                "megaflow.model.complete",
                "megaflow.env.exec",
                "megaflow.env.evaluate",
            }
            return mine if want <= names and all(t["state"] == "SUCCESS" for t in mine) else None

        mine = poll("the batch's megaflow.* tasks in /api/tasks", my_tasks)
        assert {t["worker"] for t in mine} <= nodes
        for t in mine:
            assert len(t["args"]) <= 160 and ("step=" in t["args"] or "container=" in t["args"]), t
            if t["name"] in ("megaflow.env.exec", "megaflow.env.evaluate"):  # sent to env.<host>, run there
                assert t["args"].endswith(f"host={t['worker'].split('@', 1)[1]}"), t
        step1 = [t for t in mine if t["name"] == "megaflow.agent.step" and "step=1" in t["args"].split()]
        assert len(step1) == 2
        # Flower's own Prometheus metrics (Celery's view), beside `megaflow metrics` (MegaFlow's state)
        from prometheus_client.parser import text_string_to_metric_families

        succeeded = sum(
            s.value
            for f in text_string_to_metric_families(flower.get("/metrics", auth=None).text)
            for s in f.samples
            if s.name == "flower_events_total"
            and s.labels.get("task") == "megaflow.agent.step"
            and s.labels.get("type") == "task-succeeded"
        )
        assert succeeded >= len([t for t in mine if t["name"] == "megaflow.agent.step"])

        # the tasks page, filled by its scripts from the API, as a browser shows it
        first = sorted(eids)[0]
        dom = chromium_dom(
            f"http://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:{flower.port}"
            "/tasks?name=megaflow.agent.step",
            tmp_path / "chrome",
        )
        assert "<tbody" in dom, dom[:2000]
        body = dom.split("<tbody", 1)[1]
        assert "megaflow.agent.step" in body and f"ep={first} step=" in body, body[:3000]
        assert "agent@test-host" in body

        assert flower.stop() == 0
        saved = list(Path(settings.state_dir).glob("flower.db*"))
        assert saved, "no persistent state written"

        # the state survives a restart: the batch's tasks are there before any new event arrives
        flower = FlowerProc(settings, tmp_path / "flower.log")
        flower.start()
        tasks = flower.get("/api/tasks").json()
        assert sum(1 for t in tasks.values() if any(f"ep={e} " in f"{t['args']} " for e in eids)) == len(mine)
    finally:
        flower.stop()
