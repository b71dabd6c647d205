"""Dispatch overhead: a raw Celery no-op round trip versus one MegaFlow step hop, on one Redis.

Anchor: a plain Celery app (JSON, Redis broker and result backend) whose worker runs a no-op task;
the client times ``noop.delay().get()``.
MegaFlow: episodes (one after another, 40 hops each) whose scripted model never gives a command,
so each loops agent.step -> model.complete -> agent.step ... through real model and agent
workers; a hop is the time from one step's advance to the next step's advance (callback to
callback), including the task's own Redis reads and writes.

Run: .venv/bin/python bench/dispatch.py [--samples 300]
Prints p50/p99 of both and the ratio of the p50s (goal: MegaFlow hop p50 <= 1.5x raw).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPISODE_HOPS = 40  # each episode: 20 model calls, each followed by the agent's format-error reply
WARMUP_EPISODES = 1
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def noop():
    return None


def raw_app(url: str):
    from celery import Celery

    app = Celery("raw", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name="raw.noop")(noop)
    return app


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
    )


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def bench_raw(url: str, samples: int, tmp: Path, events: bool) -> list[float]:
    env = dict(os.environ, RAW_TASK_EVENTS="1" if events else "0")
    worker = start([sys.executable, __file__, "--raw-worker", url], env, tmp / "raw-worker.log")
    app = raw_app(url)
    try:
        wait_for(lambda: bool(app.control.ping(timeout=0.5)), 60, "raw worker")
        noop = app.tasks["raw.noop"]
        for _ in range(20):  # warm-up
            noop.delay().get(timeout=10)
        out = []
        for _ in range(samples):
            t0 = time.perf_counter()
            noop.delay().get(timeout=10)
            out.append(time.perf_counter() - t0)
        return out
    finally:
        worker.terminate()
        worker.wait(20)
        app.close()


def bench_megaflow(url: str, samples: int, tmp: Path, events: bool) -> list[float]:
    import redis

    from megaflow.core import states
    from megaflow.core.keys import Keys
    from megaflow.core.settings import Settings
    from megaflow.core.spec import validate_specs
    from megaflow.engine.episodes import EpisodeEngine
    from megaflow.services.root import Root

    settings = Settings.load(redis_url=url, state_dir=str(tmp / "state"), host_name="bench", task_events=events)
    env = dict(os.environ, **settings.to_env())
    workers = [
        start([sys.executable, "-m", "megaflow", "worker", role, "-c", conc], env, tmp / f"{role}.log")
        for role, conc in (("model", "4"), ("agent", "1"))
    ]
    rt = Root(settings)
    from megaflow.workers.celery_app import create_app

    capp = create_app(settings)
    try:
        wait_for(lambda: len(capp.control.ping(timeout=0.5) or []) >= 2, 90, "megaflow workers")
        engine: EpisodeEngine = rt.engine
        r = redis.Redis.from_url(url, decode_responses=True)
        calls = EPISODE_HOPS // 2
        spec = {
            "task_id": "bench-hops",
            "model": {"backend": "scripted", "replies": ["no command"] * (calls + 2)},
            "agent": {"max_steps": calls, "max_format_errors": EPISODE_HOPS},
            "eval": {"command": "true"},
        }
        pairs = []
        for _ in range(WARMUP_EPISODES + -(-samples // (EPISODE_HOPS - 4))):  # episodes one after another
            _, ids = engine.create_batch(validate_specs([spec]), "bench")
            ep = engine.load(ids[0])
            engine.advance(ep, keep_step=True, state=states.RUNNING, phase="env_ready")
            rt.dispatcher.send("megaflow.agent.step", [ids[0], 0], "agent")
            key = Keys(settings.key_prefix).episode(ids[0])
            wait_for(lambda key=key: r.hget(key, "terminal") == "1", 120, "episode end")
            recs = [rec for rec in engine.load(ids[0]).history if rec["role"] in ("assistant", "user")][1:]
            pairs += list(zip(recs, recs[1:]))[3:]
        pairs = pairs[WARMUP_EPISODES * (EPISODE_HOPS - 4) :][:samples]
        # a hop into the agent worker ends with its format-error record; into the model worker, with a reply
        by_pool = {
            "agent (prefork)": [b["t"] - a["t"] for a, b in pairs if b["role"] == "user"],
            "model (threads)": [b["t"] - a["t"] for a, b in pairs if b["role"] == "assistant"],
        }
        for pool, xs in by_pool.items():
            print(f"  hops into {pool:<16}: p50 {statistics.median(xs) * 1e3:6.2f} ms  ({len(xs)} hops)")
        return [b["t"] - a["t"] for a, b in pairs]
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--raw-worker", metavar="URL", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.raw_worker:
        events = ["--task-events"] if os.environ.get("RAW_TASK_EVENTS") == "1" else []
        raw_app(a.raw_worker).worker_main(
            ["worker", "--pool", "solo", "--loglevel", "WARNING", *events, "--without-gossip", "--without-mingle"]
        )
        return
    tmp = Path(tempfile.mkdtemp(prefix="mf-bench-"))
    port = free_port()
    redis_proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    results = {}
    try:
        time.sleep(0.5)
        for events in (True, False):  # Flower needs task events (the fleet's default); both sides alike
            print(f"task events {'on' if events else 'off'}:")
            raw = bench_raw(url, a.samples, tmp, events)
            hop = bench_megaflow(url, a.samples, tmp, events)
            results[events] = (raw, hop)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
    print(f"samples per run: {a.samples} (one Redis on loopback; logs in {tmp})")
    for events, (raw, hop) in results.items():
        ratio = statistics.median(hop) / statistics.median(raw)
        print(
            f"task events {'on ' if events else 'off'}: raw Celery no-op round trip p50 "
            f"{statistics.median(raw) * 1e3:6.2f} ms p99 {pct(raw, 0.99) * 1e3:6.2f} ms | MegaFlow step hop p50 "
            f"{statistics.median(hop) * 1e3:6.2f} ms p99 {pct(hop, 0.99) * 1e3:6.2f} ms | ratio (p50) {ratio:.2f}x "
            f"(goal <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
