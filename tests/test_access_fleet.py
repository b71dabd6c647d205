"""A real local fleet with Redis ACL users and fake secrets (issue 17, Access).

Every process runs as its role's Redis user and holds only its role's secrets; a batch finishes;
no secret appears in a process command line, a log, a record, an artifact or Redis (Flower's task
arguments live in the broker messages there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from conftest import RedisServer, free_port

from megaflow import fleet
from megaflow.client import Client
from megaflow.core.settings import Settings
from megaflow.demo_tasks import demo_specs
from megaflow.security import acl
from megaflow.security.roles import role_env

pytestmark = pytest.mark.fleet

ADMIN = "admin-pw-5f1e"
SECRETS = {
    "model": "sk-model-key-8c2d",
    "registry": "registry-pw-77aa",
    "flower": "flower-pw-3b9c",
    "aws": "aws-secret-d41d",
    "other": "hf-token-e3b0",
}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _tree(pid: int) -> list[int]:
    """The process and its descendants (Celery pool children)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(out[0::2], out[1::2], strict=True):
        children.setdefault(int(parent), []).append(int(child))
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children.get(p, [])
    return seen


@pytest.fixture
def acl_fleet(tmp_path, monkeypatch):
    server = RedisServer(tmp_path)
    server.start()
    redis.Redis.from_url(server.url).config_set("requirepass", ADMIN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS["aws"])
    monkeypatch.setenv("HF_TOKEN", SECRETS["other"])
    settings = Settings.load(
        redis_url=server.url.replace("redis://", f"redis://:{ADMIN}@"),
        state_dir=str(tmp_path / "state"),
        host_name="acl-host",
        env_backend={"type": "sim", "preset": "demo"},
        metrics_port=0,
        model_api_key=SECRETS["model"],
        registry_username="fleet",
        registry_password=SECRETS["registry"],
        flower_user="ops",
        flower_password=SECRETS["flower"],
    )
    passwords = acl.ensure_passwords(settings.state_dir)
    admin = redis.Redis.from_url(settings.redis_url)
    acl.apply(admin, settings.key_prefix, passwords)
    try:
        fleet.up(settings, env_hosts=1, wait_s=120, echo=lambda m: None)
        yield settings, passwords, admin
    finally:
        fleet.down(settings, echo=lambda m: None)
        admin.close()
        server.stop()


def start_flower(settings, passwords, log: Path) -> tuple[subprocess.Popen, str]:
    """``megaflow flower`` as the flower role (its env filtered, its own Redis user); waits for its API."""
    port = free_port()
    env = role_env("flower", dict(os.environ, **settings.to_env()), passwords=passwords)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "megaflow", "flower", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/workers", auth=("ops", SECRETS["flower"]), timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def test_fleet_runs_as_role_users_and_leaks_no_secret(acl_fleet):
    settings, passwords, admin = acl_fleet
    flower, flower_url = start_flower(settings, passwords, Path(settings.state_dir) / "logs" / "flower.log")
    try:
        _run_batch_and_check(settings, passwords, admin, flower, flower_url)
    finally:
        flower.terminate()
        flower.wait(30)


def _run_batch_and_check(settings, passwords, admin, flower, flower_url):
    submitter = acl.role_url(settings.redis_url, acl.user_name("mf", "submitter"), passwords["submitter"])
    with Client(settings.model_copy(update={"redis_url": submitter})) as client:
        sub = client.submit(demo_specs("fix", grading="exit_code")[:3], user="alice")
        status = client.wait(sub.batch_id, timeout=120)
        assert status["done"] == 3, status
        states = {r["state"] for r in client.results(sub.batch_id)}
        assert states == {"SUCCEEDED"}, client.results(sub.batch_id)

    procs = fleet.running(settings)
    assert set(procs) == {"control", "model", "agent", "env-1"}
    wanted = {"model": {"model"}, "env-1": {"registry"}, "agent": set(), "control": set()}
    for name, pid in procs.items():
        role = name.split("-")[0]
        for p in _tree(pid):
            env = _environ(p)
            held = {k for k, v in SECRETS.items() if any(v in x for x in env.values())}
            assert held == wanted[name], f"{name} (pid {p}) holds {held}"
            assert env["MEGAFLOW_REDIS_URL"].startswith(f"redis://mf-{role}:"), name
            assert ADMIN not in " ".join(env.values()), f"{name} holds the admin Redis password"
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            assert not [s for s in (*SECRETS.values(), ADMIN, *passwords.values()) if s in cmdline], name

    deadline = time.monotonic() + 30
    while True:  # Flower's API as the flower role: the batch's tasks, their short arguments, no secret
        tasks = httpx.get(f"{flower_url}/api/tasks", auth=("ops", SECRETS["flower"]), timeout=10)
        if sum(t.get("state") == "SUCCESS" for t in tasks.json().values()) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(str(t.get("args", "")).startswith("ep=") for t in tasks.json().values()), tasks.text[:2000]
    assert not [k for k, v in SECRETS.items() if v in tasks.text]
    flower_env = _environ(flower.pid)
    assert {k for k, v in SECRETS.items() if any(v in x for x in flower_env.values())} == {"flower"}
    assert flower_env["MEGAFLOW_REDIS_URL"].startswith("redis://mf-flower:")
    assert httpx.get(f"{flower_url}/api/tasks", timeout=10).status_code == 401

    from megaflow.core.keys import Keys
    from megaflow.monitoring.metrics import collect

    metrics_url = acl.role_url(settings.redis_url, acl.user_name("mf", "metrics"), passwords["metrics"])
    reader = redis.Redis.from_url(metrics_url, decode_responses=True)
    assert "megaflow_queue_length" in collect(reader, settings, Keys("mf"))  # the read-only metrics user
    reader.close()

    leaks = []
    for f in Path(settings.state_dir).rglob("*"):
        if f.is_file() and f.name != "passwords.json":
            data = f.read_bytes()
            leaks += [f"{f}: {k}" for k, v in SECRETS.items() if v.encode() in data]
    assert not leaks, leaks  # logs, the sqlite records, artifacts
    logs = "".join(f.read_text(errors="replace") for f in (Path(settings.state_dir) / "logs").glob("*.log"))
    assert "NOPERM" not in logs and "no permissions" not in logs, "a role lacks a permission it needs"
    for key in admin.scan_iter(count=1000):
        dump = admin.dump(key) or b""
        assert not [k for k, v in SECRETS.items() if v.encode() in dump], key


def test_people_run_their_batches_through_the_fleets_control_service(acl_fleet):
    """Per-person users on a real fleet: `megaflow control` (started by `megaflow up`) serves their requests."""
    from megaflow.core.errors import NotFoundError
    from megaflow.security.identity import add_person

    settings, _passwords, admin = acl_fleet
    urls = {p: acl.role_url(settings.redis_url, p, add_person(admin, "mf", p)) for p in ("alice", "bob")}
    alice = Client(settings.model_copy(update={"redis_url": urls["alice"]}))
    bob = Client(settings.model_copy(update={"redis_url": urls["bob"]}))
    try:
        sub = alice.submit(demo_specs("fix", grading="exit_code")[:2], user="alice")
        assert alice.wait(sub.batch_id, timeout=120)["done"] == 2
        assert {r["state"] for r in alice.results(sub.batch_id)} == {"SUCCEEDED"}
        traj = alice.trajectory(sub.episode_ids[0])
        assert traj and isinstance(traj, dict)
        for attempt in (bob.status, bob.results, bob.cancel):
            with pytest.raises(NotFoundError, match="none of bob's batches"):
                attempt(sub.batch_id)
        with pytest.raises(NotFoundError, match="none of bob's episodes"):
            bob.trajectory(sub.episode_ids[0])
        with pytest.raises(redis.exceptions.NoPermissionError):
            bob.rt.redis.hgetall(f"mf:batch:{sub.batch_id}")
    finally:
        alice.close()
        bob.close()
