"""Engine, resources and services driven in-process (no Celery) over a real Redis and real sandboxes.

Covers the never-strand guarantee (an exception in any step kind ends the episode with a cause,
frees its slots and removes its container) and cancel in every state.
"""

from __future__ import annotations

import pytest

from megaflow.core import states
from megaflow.core.spec import validate_specs
from megaflow.demo_tasks import demo_specs
from megaflow.services.local import LocalRunner
from megaflow.services.root import Root

HOSTS = ("lh-1", "lh-2")


@pytest.fixture(params=["sim", "docker"])
def fleet_local(request, settings):
    update = {"host_capacity": 2, "global_limit": 4}
    if request.param == "sim":
        update["env_backend"] = {"type": "sim", "preset": "demo"}
    else:
        update["default_image"] = request.getfixturevalue("sandbox_image")
    s = settings.model_copy(update=update)
    root = Root(s, role="client")
    env_roots = {h: Root(s, role="env", host=h) for h in HOSTS}
    runner = LocalRunner(root, env_roots)
    runner.register_hosts()
    yield runner
    for r in env_roots.values():
        r.env_host.shutdown()


def submit(runner: LocalRunner, specs: list[dict]) -> tuple[str, list[str]]:
    root = runner.root
    valid = validate_specs(specs)
    batch, ids = root.engine.create_batch(valid, "alice")
    root.resources.enqueue([{"episode_id": e, "user": "alice", "image": root.settings.default_image} for e in ids])
    root.lifecycle.admit()
    return batch, ids


def assert_nothing_held(runner: LocalRunner, ids: list[str]) -> None:
    cap = runner.root.resources.capacity()
    assert cap["global"]["used"] == 0, cap
    for r in runner.env_roots.values():
        if r.settings.env_backend.get("type") == "sim":
            assert r.env_host.report()["sandboxes"] == 0, "sandboxes left on " + r.host
        else:
            import docker

            client = docker.from_env()
            left = [
                c.name
                for eid in ids
                for c in client.containers.list(
                    all=True,
                    filters={"label": [f"megaflow.episode={eid}", f"megaflow.host={r.host}"]},
                    ignore_removed=True,  # one removed between docker's list and inspect is gone, not an error
                )
            ]
            client.close()
            assert not left, f"containers left on {r.host}: {left}"


def test_demo_batch_in_process(fleet_local):
    grading = "exit_code" if fleet_local.root.settings.env_backend["type"] == "sim" else "swebench"
    specs = demo_specs("fix", grading=grading)[:2] + demo_specs("noop", grading=grading)[:1]
    batch, ids = submit(fleet_local, specs)
    results = fleet_local.run_until_done(batch)
    assert [r["state"] for r in results] == [states.SUCCEEDED, states.SUCCEEDED, states.FAILED]
    assert results[2]["cause"] == states.CAUSE_TESTS
    assert {r["host"] for r in results} <= set(HOSTS)
    assert_nothing_held(fleet_local, ids)


STEP_KINDS = ["provision", "agent", "model", "exec", "evaluate"]


def _break(runner: LocalRunner, kind: str, monkeypatch) -> None:
    boom = RuntimeError(f"injected failure in {kind}")

    def raise_(*a, **k):
        raise boom

    if kind == "agent":
        monkeypatch.setattr(type(runner.root.agent_service), "step", raise_)
    elif kind == "model":
        monkeypatch.setattr(type(runner.root.model_service), "step", raise_)
    else:
        for r in runner.env_roots.values():
            host = r.env_host
            if kind == "provision":
                monkeypatch.setattr(host, "create", raise_)
            elif kind == "exec":
                original = host.execute

                def execute(handle, command, *a, _orig=original, **k):
                    if "git apply" in command:  # the agent's first command, not the set-up
                        raise boom
                    return _orig(handle, command, *a, **k)

                monkeypatch.setattr(host, "execute", execute)
            elif kind == "evaluate":
                monkeypatch.setattr(type(r.env_service), "evaluate", raise_)


@pytest.mark.parametrize("kind", STEP_KINDS)
def test_an_exception_in_any_step_ends_the_episode(fleet_local, kind, monkeypatch):
    _break(fleet_local, kind, monkeypatch)
    batch, ids = submit(fleet_local, demo_specs("fix")[:1])
    [result] = fleet_local.run_until_done(batch, timeout_s=90)
    assert result["state"] == states.FAILED
    assert result["cause"] == states.CAUSE_INTERNAL
    assert f"injected failure in {kind}" in result["error"]
    assert_nothing_held(fleet_local, ids)


def _cancel_in(runner: LocalRunner, state: str, monkeypatch) -> str:
    """Submit one episode, stop it in ``state``, cancel it there; return its id."""
    root = runner.root
    if state == states.QUEUED:
        root.resources.set_quota("alice", 0)
        _, [eid] = submit(runner, demo_specs("fix")[:1])
        assert root.engine.load(eid).state == states.QUEUED
        assert root.lifecycle.cancel(eid)
        root.resources.set_quota("alice", None)
        return eid
    _, [eid] = submit(runner, demo_specs("fix")[:1])
    if state == states.ADMITTED:
        assert root.engine.load(eid).state == states.ADMITTED
        assert root.lifecycle.cancel(eid)
        return eid
    hook = {states.ENV_STARTING: "create", states.EVALUATING: "evaluate"}.get(state)
    if hook:  # cancel from inside the step, while it runs (what a user's cancel meets in flight)
        for r in runner.env_roots.values():
            target = r.env_host if hook == "create" else type(r.env_service)
            original = getattr(target, hook)

            def cancel_then_run(*a, _orig=original, **k):
                assert root.engine.load(eid).state == state
                assert root.lifecycle.cancel(eid)
                return _orig(*a, **k)

            monkeypatch.setattr(target, hook, cancel_then_run)
        runner.run_until_done(root.engine.load(eid).batch_id, timeout_s=90)
        return eid
    # RUNNING: provision done, the agent's first step still queued
    while root.engine.load(eid).state != states.RUNNING:
        assert runner.run_one(timeout_s=5)
    assert root.lifecycle.cancel(eid)
    return eid


@pytest.mark.parametrize(
    "state", [states.QUEUED, states.ADMITTED, states.ENV_STARTING, states.RUNNING, states.EVALUATING]
)
def test_cancel_ends_an_episode_in_every_state(fleet_local, state, monkeypatch):
    eid = _cancel_in(fleet_local, state, monkeypatch)
    root = fleet_local.root
    ep = root.engine.load(eid)
    assert (ep.state, ep.fields.get("cause")) == (states.CANCELLED, states.CAUSE_CANCELLED)
    assert not root.lifecycle.cancel(eid)  # already final
    while fleet_local.run_one(timeout_s=0.2):  # what was in flight drops its result; the close runs
        pass
    assert root.engine.load(eid).state == states.CANCELLED
    assert_nothing_held(fleet_local, [eid])


def test_a_process_redis_pool_follows_its_threads_up_to_the_cap(settings):
    """Thousands of model threads share at most redis_max_connections; a thread waits rather than fails."""
    import threading

    s = settings.model_copy(update={"model_concurrency": 5000, "redis_max_connections": 16})
    root = Root(s, role="model")
    try:
        assert root.redis.connection_pool.max_connections == 16
        agent = Root(s.model_copy(update={"redis_max_connections": 512}), role="agent")
        assert agent.redis.connection_pool.max_connections == s.agent_concurrency + 16  # under the cap
        agent.close()
        errors: list[BaseException] = []

        def ping_many() -> None:
            try:
                for _ in range(20):
                    root.redis.ping()
            except BaseException as exc:  # any failure is the finding
                errors.append(exc)

        threads = [threading.Thread(target=ping_many) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == [] and len(root.redis.connection_pool._connections) <= 16
    finally:
        root.close()


def test_demo_batch_on_a_read_only_root(settings, sandbox_image):
    """The demo (files uploaded, commands, swebench-style grading) on read-only roots (MEGAFLOW_CONTAINER_READ_ONLY)."""
    s = settings.model_copy(
        update={"host_capacity": 2, "global_limit": 4, "default_image": sandbox_image, "container_read_only": True}
    )
    runner = LocalRunner(Root(s, role="client"), {h: Root(s, role="env", host=h) for h in HOSTS})
    runner.register_hosts()
    try:
        specs = demo_specs("fix", grading="exit_code")[:2] + demo_specs("noop", grading="exit_code")[:1]
        batch, ids = submit(runner, specs)
        results = runner.run_until_done(batch)
        assert [r["state"] for r in results] == [states.SUCCEEDED, states.SUCCEEDED, states.FAILED], [
            (r["cause"], r.get("error")) for r in results
        ]
        assert results[2]["cause"] == states.CAUSE_TESTS
        assert_nothing_held(runner, ids)
    finally:
        for r in runner.env_roots.values():
            r.env_host.shutdown()
