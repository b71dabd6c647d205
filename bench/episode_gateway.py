"""Benchmark: overhead of the per-episode gateway per model call against calling the server directly.

One run, figures printed: the same chat-completion request, sequentially, ``--n`` times
  a. straight to a loopback OpenAI-compatible server (tests/openai_server.py) with the openai client,
  b. through the episode gateway's HTTP front as it runs on the fleet: key -> episode -> a
     ``megaflow.model.gateway_call`` task on the model queue -> a real model worker (its own process,
     ``python -m megaflow worker model``) -> the episode's openai backend -> the same server -> the
     answer back on a Redis list; request and reply logged in Redis,
  c. the same front with the gateway calling the backend in its own process (``in_process=True``),
p50 / p99 of each and the ratios b / a and c / a. A private redis-server; everything on loopback.

    .venv/bin/python bench/episode_gateway.py [--n 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="requests per path")
    args = ap.parse_args()
    import openai

    from megaflow import Client
    from megaflow.core.settings import Settings
    from megaflow.sandbox.gateway_http import GatewayHTTPServer
    from megaflow.services.episode_gateway import EpisodeGateway
    from megaflow.services.root import Root
    from tests.conftest import RedisServer
    from tests.openai_server import OpenAIServer

    tmp = Path(tempfile.mkdtemp(prefix="mf-gw-bench-"))
    redis_server = RedisServer(tmp)
    redis_server.start()
    worker = None
    try:
        with OpenAIServer(name="bench") as server:
            settings = Settings.load(
                redis_url=redis_server.url,
                state_dir=str(tmp / "state"),
                model_backend="openai",
                model_endpoints=[server.base_url],
                metrics_port=0,
                host_name="bench",
            )
            env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
            with open(tmp / "model-worker.log", "w") as log:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "megaflow", "worker", "model", "--loglevel", "WARNING"],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            root = Root(settings, role="client")
            with Client(settings) as client:
                spec = {
                    "task_id": "bench",
                    "workdir": "/w",
                    "eval": {"command": "true"},
                    "model": {"backend": "openai", "model_name": server.model},
                }
                sub = client.submit([spec], user="bench")
                (res,) = client.results(sub.batch_id)
            eid = res["episode_id"]
            gw, local = EpisodeGateway(root), EpisodeGateway(root, in_process=True)
            key = gw.issue_key(eid)
            front, front_local = GatewayHTTPServer(gw).start(), GatewayHTTPServer(local).start()
            messages = [{"role": "user", "content": "say something short"}]
            direct = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
            via = openai.OpenAI(base_url=front.url, api_key=key, max_retries=0, timeout=120)
            via_local = openai.OpenAI(base_url=front_local.url, api_key=key, max_retries=0)
            for c in (direct, via, via_local):  # warm up connections, the backend and the worker
                for _ in range(10):
                    c.chat.completions.create(model=server.model, messages=messages)
            gw.drain(eid)

            def call(c):
                return lambda: c.chat.completions.create(model=server.model, messages=messages)

            def streamed(c):  # stream=true: the same one model call, the reply re-sent as events
                return lambda: list(c.chat.completions.create(model=server.model, messages=messages, stream=True))

            a = _timed(call(direct), args.n)
            b = _timed(call(via), args.n)
            c = _timed(call(via_local), args.n)
            d = _timed(streamed(via), args.n)
            logged = len(gw.drain(eid))
            for x in (direct, via, via_local):
                x.close()
            front.stop()
            front_local.stop()
            root.close()
            _stop(worker)  # before the server: its keep-alive connections close cleanly
    finally:
        _stop(worker)
        redis_server.stop()
    print(
        f"requests per path: {args.n} (sequential, one client, server answers at once); gateway calls logged: {logged}"
    )
    for name, xs in (
        ("direct to the server", a),
        ("gateway via the model queue", b),
        ("gateway, backend in-process", c),
        ("gateway via the model queue, stream", d),
    ):
        print(f"  {name:36s} p50 {_pct(xs, 0.5):7.2f} ms   p99 {_pct(xs, 0.99):7.2f} ms")
    for name, xs in (("model queue", b), ("in-process", c), ("model queue, stream", d)):
        print(
            f"  ratio gateway ({name}) / direct (p50): {statistics.median(xs) / statistics.median(a):.2f}x; "
            f"added per call (p50): {(statistics.median(xs) - statistics.median(a)) * 1000:.2f} ms"
        )


if __name__ == "__main__":
    main()
