"""MegaFlow's threads pool (``megaflow worker``'s ``--pool``): Celery's threads pool without a Future per task.

Driven here the way Celery's worker drives a pool (``apply_async`` with the request's callbacks), in
real threads: every task runs once and reports through its callbacks, threads start only when none
is idle and never past the limit, and a warm stop waits for the running tasks and drops the queued
ones without running them (their messages stay unacknowledged: Celery redelivers them).
"""

from __future__ import annotations

import threading
import time

from megaflow.workers.pool import POOL, TaskPool


def run_pool(limit: int) -> TaskPool:
    pool = TaskPool(limit=limit)
    pool.start()
    return pool


def test_every_task_runs_once_and_reports_through_its_callbacks():
    pool = run_pool(4)
    done: list[int] = []
    accepted: list[int] = []
    finished = threading.Event()

    def on_done(result: int) -> None:
        done.append(result)
        if len(done) == 200:
            finished.set()

    for i in range(200):
        pool.apply_async(lambda i=i: i * 2, callback=on_done, accept_callback=lambda pid, t: accepted.append(pid))
    assert finished.wait(10)
    assert sorted(done) == [i * 2 for i in range(200)]
    assert len(accepted) == 200
    assert pool.info["max-concurrency"] == 4 and 1 <= pool.info["threads"] <= 4
    pool.stop()


def test_threads_start_only_when_none_is_idle_and_never_past_the_limit():
    pool = run_pool(3)
    gate = threading.Event()
    running = threading.Semaphore(0)
    results: list[str] = []

    def blocked() -> str:
        running.release()
        gate.wait(10)
        return "ok"

    for _ in range(5):  # 3 run at once, 2 wait in the queue for a free thread
        pool.apply_async(blocked, callback=results.append)
    for _ in range(3):
        assert running.acquire(timeout=5)
    assert not running.acquire(timeout=0.3)  # no fourth thread
    assert pool.info["threads"] == 3
    gate.set()
    deadline = time.monotonic() + 10
    while len(results) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert results == ["ok"] * 5
    # sequential work reuses the idle threads
    for _ in range(20):
        ev = threading.Event()
        pool.apply_async(lambda: None, callback=lambda _r, ev=ev: ev.set())
        assert ev.wait(5)
    assert pool.info["threads"] == 3
    pool.stop()


def test_a_warm_stop_waits_for_running_tasks_and_drops_queued_ones():
    pool = run_pool(1)
    started = threading.Event()
    results: list[str] = []

    def slow() -> str:
        started.set()
        time.sleep(0.5)
        return "slow"

    pool.apply_async(slow, callback=results.append)
    assert started.wait(5)
    pool.apply_async(lambda: "queued", callback=results.append)  # no thread free: it waits in the queue
    t0 = time.monotonic()
    pool.stop()
    assert time.monotonic() - t0 >= 0.3  # it waited for the running task
    assert results == ["slow"]  # the queued one never ran (its message would be redelivered)


def test_an_error_is_reported_by_celerys_tracer_not_the_pool():
    pool = run_pool(2)
    outcome: list[object] = []
    ev = threading.Event()

    def failing() -> None:
        raise KeyError("boom")

    def traced() -> str:  # Celery's tracer catches a task's exception and reports it as the result
        try:
            failing()
        except KeyError as exc:
            return f"failed: {exc}"
        return "ok"

    pool.apply_async(traced, callback=lambda r: (outcome.append(r), ev.set()))
    assert ev.wait(5)
    assert outcome == ["failed: 'boom'"]
    # a bug that escapes the tracer is logged and the thread keeps serving
    pool.apply_async(failing, callback=outcome.append)
    ev2 = threading.Event()
    pool.apply_async(lambda: "after", callback=lambda r: (outcome.append(r), ev2.set()))
    assert ev2.wait(5)
    assert outcome[-1] == "after"
    pool.stop()


def test_celery_finds_the_pool_by_its_path():
    from celery.concurrency import get_implementation

    assert get_implementation(POOL) is TaskPool
