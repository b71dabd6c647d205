"""Benchmark: overhead of the per-episode gateway per model call against calling the server directly.

One run, figures printed: the same chat-completion request, sequentially, ``--n`` times
  a. straight to a loopback OpenAI-compatible server (tests/openai_server.py) with the openai client,
  b. through the episode gateway's HTTP front (key -> episode -> the episode's openai backend ->
     the same server; request and reply logged in Redis), with the same client;
p50 / p99 of each and the ratio b / a. A private redis-server; everything on loopback.

    .venv/bin/python bench/episode_gateway.py [--n 300]
"""

from __future__ import annotations

import argparse
import statistics
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
    try:
        with OpenAIServer(name="bench") as server:
            settings = Settings.load(
                redis_url=redis_server.url,
                state_dir=str(tmp / "state"),
                model_backend="openai",
                model_endpoints=[server.base_url],
                metrics_port=0,
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
            gw = EpisodeGateway(root)
            key = gw.issue_key(res["episode_id"])
            front = GatewayHTTPServer(gw).start()
            messages = [{"role": "user", "content": "say something short"}]
            direct = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
            via = openai.OpenAI(base_url=front.url, api_key=key, max_retries=0)
            for c in (direct, via):  # warm up connections and the backend
                for _ in range(10):
                    c.chat.completions.create(model=server.model, messages=messages)
            gw.drain(res["episode_id"])
            a = _timed(lambda: direct.chat.completions.create(model=server.model, messages=messages), args.n)
            b = _timed(lambda: via.chat.completions.create(model=server.model, messages=messages), args.n)
            logged = len(gw.drain(res["episode_id"]))
            direct.close()
            via.close()
            front.stop()
            root.close()
    finally:
        redis_server.stop()
    print(
        f"requests per path: {args.n} (sequential, one client, server answers at once); gateway calls logged: {logged}"
    )
    for name, xs in (("direct to the server", a), ("through the episode gateway", b)):
        print(f"  {name:30s} p50 {_pct(xs, 0.5):7.2f} ms   p99 {_pct(xs, 0.99):7.2f} ms")
    print(
        f"  ratio gateway / direct (p50): {statistics.median(b) / statistics.median(a):.2f}x; "
        f"added per call (p50): {(statistics.median(b) - statistics.median(a)) * 1000:.2f} ms"
    )


if __name__ == "__main__":
    main()
