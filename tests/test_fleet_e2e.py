"""End to end on a real local fleet: Celery workers in their own processes, real containers."""

from __future__ import annotations

import json
import subprocess
import time

from megaflow import Client
from megaflow.core import states
from megaflow.demo_tasks import demo_specs
from megaflow.stores import open_metadata_store
from megaflow.workers.celery_app import create_app
from tests.helpers import run_cli, wait_until


def cli(settings, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(settings, *args, check=check)


def wait_records(settings, batch_id: str, n: int, timeout: float = 30.0) -> list[dict]:
    store = open_metadata_store(settings.metadata_url, settings)
    try:
        deadline = time.monotonic() + timeout
        while True:
            docs = store.find_tasks(batch_id=batch_id)
            if len(docs) == n and all(d["state"] in states.TERMINAL for d in docs) or time.monotonic() > deadline:
                return docs
            time.sleep(0.5)
    finally:
        store.close()


def test_reference_fix_succeeds_and_noop_fails(fleet):
    with Client(fleet) as client:
        fix = client.submit(demo_specs("fix"), user="e2e-fix")
        noop = client.submit(demo_specs("noop"), user="e2e-noop")
        client.wait(fix.batch_id, timeout=240)
        client.wait(noop.batch_id, timeout=120)
        res_fix, res_noop = client.results(fix.batch_id), client.results(noop.batch_id)
        assert [r["state"] for r in res_fix] == [states.SUCCEEDED] * len(res_fix), res_fix
        assert all(r["reward"] == 1.0 and r["steps"] == 3 for r in res_fix)
        assert [r["state"] for r in res_noop] == [states.FAILED] * len(res_noop)
        assert all(r["reward"] == 0.0 and r["cause"] == states.CAUSE_TESTS for r in res_noop)
        assert {r["host"] for r in res_fix + res_noop} == {"env-1", "env-2"}  # both env hosts took work
        for r in res_fix:
            ph = r["phases"]
            assert (
                ph["submitted"]
                <= ph["admitted"]
                <= ph["env_ready"]
                <= ph["step_1"]
                <= ph["evaluating"]
                <= ph["finished"]
            )
        traj = client.trajectory(res_fix[0]["episode_id"])
        roles = [m["role"] for m in traj["messages"]]
        assert roles[:3] == ["system", "user", "assistant"] and roles[-1] == "evaluation"
        assert "git apply" in traj["messages"][2]["content"]
        assert traj["state"] == states.SUCCEEDED and traj["prompt_tokens"] > 0
    docs = wait_records(fleet, fix.batch_id, len(res_fix))
    assert sorted(d["state"] for d in docs) == [states.SUCCEEDED] * len(res_fix)
    assert all(
        {"queued", "admitted", "env_ready", "step_1", "evaluating", "finished"} <= set(d["phases"]) for d in docs
    )
    out = json.loads(cli(fleet, "status", fix.batch_id, "--json").stdout)
    assert out["counts"] == {states.SUCCEEDED: len(res_fix)} and out["mean_reward"] == 1.0
    overview = cli(fleet, "status").stdout
    assert fix.batch_id in overview and "e2e-noop" in overview


def test_stale_and_duplicate_callbacks_are_dropped(fleet):
    with Client(fleet) as client:
        sub = client.submit(demo_specs("fix")[:1], user="e2e-dup")
        client.wait(sub.batch_id, timeout=120)
        eid = sub.episode_ids[0]
        before = client.rt.engine.load(eid)
        app = create_app(fleet)
        # replay every step's callback as if redelivered: none may fork or change the episode
        for step in range(before.step + 1):
            app.send_task("megaflow.agent.step", args=[eid, step], queue="agent")
            app.send_task("megaflow.model.complete", args=[eid, step], queue="model")
        time.sleep(3)
        after = client.rt.engine.load(eid)
        assert after.step == before.step and len(after.history) == len(before.history)
        assert after.state == states.SUCCEEDED
        app.close()


def test_cli_submit_rejects_bad_line_and_runs_good_file(fleet, tmp_path):
    good = [demo_specs("fix")[1], demo_specs("noop")[1]]
    bad = tmp_path / "bad.jsonl"
    broken = dict(good[0])
    broken["eval"] = {"command": ""}
    bad.write_text("\n".join(json.dumps(s) for s in [good[0], broken]) + "\n")
    with Client(fleet) as client:
        batches_before = client.rt.redis.zcard(client.rt.keys.batches)
        proc = cli(fleet, "submit", str(bad), "--user", "e2e-cli", check=False)
        assert proc.returncode == 2
        assert f"{bad}:2" in proc.stderr and "eval.command" in proc.stderr
        assert client.rt.redis.zcard(client.rt.keys.batches) == batches_before
        notjson = tmp_path / "notjson.jsonl"
        notjson.write_text(json.dumps(good[0]) + "\n{oops\n")
        proc = cli(fleet, "submit", str(notjson), "--user", "e2e-cli", check=False)
        assert proc.returncode == 2 and f"{notjson}:2" in proc.stderr and "not valid JSON" in proc.stderr
        ok = tmp_path / "ok.jsonl"
        ok.write_text("\n".join(json.dumps(s) for s in good) + "\n")
        proc = cli(fleet, "submit", str(ok), "--user", "e2e-cli", "--wait", "--timeout", "150", check=False)
        assert proc.returncode == 3, proc.stderr  # one episode FAILED: exit status 3
        out = proc.stdout
        assert "SUCCEEDED" in out and "FAILED" in out and "tests_failed" in out


def test_capacity_shows_fleet(fleet):
    out = json.loads(cli(fleet, "capacity", "--json").stdout)
    text = json.dumps(out)
    assert "env-1" in text and "env-2" in text


def test_persistent_mode_takes_warm_containers(fleet):
    """Persistent mode: once a host's pool for the image is warm, an episode takes a started container."""
    from megaflow.services.root import Root

    root = Root(fleet)
    image = fleet.default_image
    with Client(fleet) as client:
        first = client.submit(demo_specs("fix", mode="persistent")[:2], user="e2e-warm")  # asks the pools to fill
        client.wait(first.batch_id, timeout=180)
        assert [r["state"] for r in client.results(first.batch_id)] == [states.SUCCEEDED] * 2
        wait_until(
            lambda: all(h.get("warm", {}).get(image, 0) >= 1 for h in root.resources.hosts()),
            90,
            lambda: f"the warm pools to fill: {root.resources.hosts()}",
            0.5,
        )
        sub = client.submit(demo_specs("fix", mode="persistent")[:2], user="e2e-warm")
        client.wait(sub.batch_id, timeout=180)
        res = client.results(sub.batch_id)
    assert [r["state"] for r in res] == [states.SUCCEEDED] * 2 and {r["mode"] for r in res} == {"persistent"}
    handles = [root.engine.load(r["episode_id"], history=False).container for r in res]
    assert all(h and h["data"]["warm"] for h in handles), handles  # taken from the pool, not booted
    root.close()


def test_images_prefetch_runs_on_the_named_env_host(fleet):
    """The prefetch task runs on env-2 (the worker marks the image used in env-2's image record).

    Workers no longer log each task (MEGAFLOW_TASK_LOG off), so the record in Redis is the evidence.
    """
    from megaflow.core.keys import Keys

    key = Keys(fleet.key_prefix).env("env-2", "images")
    with Client(fleet) as client:
        before = float(client.rt.redis.hget(key, fleet.default_image) or 0)
        out = cli(fleet, "images", "prefetch", fleet.default_image, "--hosts", "env-2").stdout
        assert "env-2" in out and "queued" in out and "env-1" not in out, out
        wait_until(
            lambda: float(client.rt.redis.hget(key, fleet.default_image) or 0) > before,
            60,
            "env-2 to prefetch (mark used) the image",
            0.5,
        )


def test_cli_submit_accepts_swebench_instances(fleet, tmp_path):
    from megaflow.demo_tasks import fix_replies, instances

    inst = instances()[2]
    f = tmp_path / "instances.jsonl"
    f.write_text(json.dumps(inst) + "\n")
    model = json.dumps({"backend": "scripted", "replies": fix_replies(inst["patch"])})
    out = cli(fleet, "submit", str(f), "--user", "e2e-swe", "--model", model, "--wait", "--timeout", "150").stdout
    batch_id = out.split()[1].rstrip(":")
    with Client(fleet) as client:
        res = client.results(batch_id)
    assert [(r["task_id"], r["state"]) for r in res] == [(inst["instance_id"], states.SUCCEEDED)]


def test_thread_workers_run_megaflows_pool_and_answer_inspection(fleet):
    """The model, agent and env workers run megaflow.workers.pool (Celery's threads pool without a
    Future per task); Celery's remote inspection sees it with each worker's limit."""
    from megaflow.workers.pool import POOL
    from megaflow.workers.process import plan

    app = create_app(fleet)
    seen: dict = {}

    def all_roles() -> dict | None:
        seen.update(app.control.inspect(timeout=3).stats() or {})
        return seen if {"model", "agent", "env"} <= {name.split("@")[0] for name in seen} else None

    try:
        stats = wait_until(all_roles, 60, lambda: f"workers answering: {sorted(seen)}")
    finally:
        app.close()
    roles = {name.split("@")[0]: s for name, s in stats.items()}
    for name, s in stats.items():
        assert s["pool"]["implementation"] == POOL, (name, s["pool"])
    assert roles["model"]["pool"]["max-concurrency"] == plan("model", fleet).concurrency
