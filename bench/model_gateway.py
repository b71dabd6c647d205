"""Benchmark of the model service, one run, figures printed.

1. Latency (server answers at once): the same chat-completion request sent
   a. straight to the loopback OpenAI-compatible server (httpx),
   b. through the gateway's openai backend in this process (pool + semaphore + retries, no queue),
      plain JSON and streamed (SSE, reassembled: the default, ``MEGAFLOW_MODEL_STREAM``),
   c. through the model queue: Celery task ``megaflow.model.complete`` on a real model worker
      (``python -m megaflow worker model``), from send until the worker's follow-up task lands on
      the agent queue; p50/p99 of each and the ratio to (a).
2. Throughput with 1,000 requests in flight against a server that answers after a fixed delay
   and processes ``--server-slots`` requests at once (its own limit: slots / delay per second):
   straight to the server, through the backend, and through the model queue.

Everything runs on loopback: a private redis-server, the server from tests/openai_server.py in its
own process, and the worker in its own process.

    .venv/bin/python bench/model_gateway.py [--latency-n 300] [--inflight 1000] [--delay 0.2]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx
import redis

from megaflow.core.settings import Settings
from megaflow.model_gateway import ModelRequest, load_backend

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write one short sentence about queues."},
]
MODEL = {"model_name": "test-model", "max_tokens": 32, "temperature": 0.0, "stream": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) used so far by a process (Linux /proc)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def fmt(values: list[float]) -> str:
    return f"p50 {pct(values, 0.5) * 1000:7.2f} ms   p99 {pct(values, 0.99) * 1000:7.2f} ms"


class Fleet:
    """redis-server, the loopback model server and (on demand) a model worker, all child processes."""

    def __init__(self, tmp: Path, server_slots: int, worker_concurrency: int):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        rport = free_port()
        self.procs.append(
            subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server",
                    "--port",
                    str(rport),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp),
                    "--loglevel",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.redis_url = f"redis://127.0.0.1:{rport}/0"
        # no socket time-out: the driver blocks in BRPOP (redis-py's default time-out is 5 s)
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=None)
        for _ in range(200):
            try:
                self.redis.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        self.server = server = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "openai_server.py"),
                "--name",
                "bench",
                "--max-concurrency",
                str(server_slots),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(server)
        self.server_url = f"http://127.0.0.1:{int(server.stdout.readline().split()[1])}/v1"
        self.settings = Settings.load(
            redis_url=self.redis_url,
            key_prefix="mfbench",
            state_dir=str(tmp / "state"),
            model_backend="openai",
            model_name="test-model",
            model_endpoints=[self.server_url],
            endpoint_concurrency=server_slots,
            model_concurrency=worker_concurrency,
            model_timeout_s=60.0,
            host_name="bench",
        )
        self.worker: subprocess.Popen | None = None

    def control(self, **body) -> dict:
        return httpx.post(self.server_url.removesuffix("/v1") + "/control", json=body, timeout=10).json()

    def start_worker(self) -> None:
        env = {**os.environ, **self.settings.to_env(), "PYTHONPATH": str(ROOT)}
        log = open(self.tmp / "model-worker.log", "w")  # noqa: SIM115 - the worker writes it until close()
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "megaflow", "worker", "model", "--loglevel", "WARNING"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(self.worker)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


class QueueDriver:
    """Sends ``megaflow.model.complete`` for fresh episodes and sees each finish on the agent queue."""

    def __init__(self, fleet: Fleet):
        from megaflow.core.keys import Keys
        from megaflow.core.spec import validate_specs
        from megaflow.core.wire import AGENT_QUEUE, MODEL_QUEUE
        from megaflow.engine.episodes import EpisodeEngine
        from megaflow.services.lifecycle import MODEL_COMPLETE
        from megaflow.services.root import Root

        self.fleet = fleet
        self.rt = Root(fleet.settings)
        self.keys = Keys(fleet.settings.key_prefix)
        self.engine: EpisodeEngine = self.rt.engine
        self.validate = validate_specs
        self.task, self.queue = MODEL_COMPLETE, MODEL_QUEUE
        self.agent_list = f"{fleet.settings.key_prefix}:celery:{AGENT_QUEUE}"

    def episodes(self, n: int) -> list[str]:
        spec = {"task_id": "bench", "eval": {"command": "true"}, "model": {"backend": "openai", **MODEL}}
        _, ids = self.engine.create_batch(self.validate([spec] * n), user="bench")
        pipe = self.rt.redis.pipeline(transaction=False)
        for eid in ids:
            for m in MESSAGES:
                pipe.rpush(self.keys.history(eid), json.dumps(m))
        pipe.execute()
        return ids

    def send(self, eid: str) -> None:
        self.rt.dispatcher.send(self.task, [eid, 0], self.queue)

    def send_many(self, ids: list[str]) -> None:
        """Publish on one producer (one connection), as a busy agent worker would."""
        app = self.rt.app
        with app.producer_or_acquire() as producer:
            for eid in ids:
                app.send_task(self.task, args=[eid, 0], queue=self.queue, producer=producer)

    def done(self, timeout: float) -> str | None:
        """The episode id of the next model step that finished (its agent task arrived)."""
        item = self.fleet.redis.brpop(self.agent_list, timeout=timeout)
        if item is None:
            return None
        body = json.loads(base64.b64decode(json.loads(item[1])["body"]))
        return body[0][0]


def latency(fleet: Fleet, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"direct": [], "backend": [], "streamed": [], "queue": []}
    body = {"model": "test-model", "messages": MESSAGES, "max_tokens": 32, "temperature": 0.0}
    with httpx.Client() as client:
        for _ in range(20):
            client.post(f"{fleet.server_url}/chat/completions", json=body).raise_for_status()
        for _ in range(n):
            t = time.perf_counter()
            client.post(f"{fleet.server_url}/chat/completions", json=body).raise_for_status()
            out["direct"].append(time.perf_counter() - t)
    backend = load_backend("openai", fleet.settings, redis.Redis.from_url(fleet.redis_url, decode_responses=True))
    for i in range(n + 20):
        t = time.perf_counter()
        backend.complete(ModelRequest(messages=MESSAGES, model=dict(MODEL), session_id=f"lat-{i}", step=0))
        if i >= 20:
            out["backend"].append(time.perf_counter() - t)
    for i in range(n + 20):
        t = time.perf_counter()
        backend.complete(ModelRequest(messages=MESSAGES, model={**MODEL, "stream": True}, session_id=f"s-{i}", step=0))
        if i >= 20:
            out["streamed"].append(time.perf_counter() - t)
    backend.close()
    if fleet.worker is not None:
        q = QueueDriver(fleet)
        ids = q.episodes(n + 20)
        for i, eid in enumerate(ids):
            t = time.perf_counter()
            q.send(eid)
            got = q.done(timeout=60)
            if got != eid:
                raise RuntimeError(f"model step of {eid} did not finish (got {got}); see model-worker.log")
            if i >= 20:
                out["queue"].append(time.perf_counter() - t)
    return out


def throughput_direct(fleet: Fleet, n: int, threads: int) -> float:
    body = {"model": "test-model", "messages": MESSAGES, "max_tokens": 32}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=n)
    with httpx.Client(limits=limits, timeout=120) as client, ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        list(
            pool.map(
                lambda _: client.post(f"{fleet.server_url}/chat/completions", json=body).raise_for_status(), range(n)
            )
        )
        return n / (time.perf_counter() - t)


def throughput_backend(fleet: Fleet, n: int, threads: int) -> float:
    backend = load_backend("openai", fleet.settings, redis.Redis.from_url(fleet.redis_url, decode_responses=True))
    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        list(
            pool.map(
                lambda i: backend.complete(ModelRequest(messages=MESSAGES, model=dict(MODEL), session_id=f"tp-{i}")),
                range(n),
            )
        )
        rate = n / (time.perf_counter() - t)
    backend.close()
    return rate


def throughput_queue(fleet: Fleet, n: int) -> tuple[float, float]:
    q = QueueDriver(fleet)
    ids = q.episodes(n)
    t = time.perf_counter()
    q.send_many(ids)
    sent = time.perf_counter() - t
    pending = set(ids)
    while pending:
        got = q.done(timeout=120)
        if got is None:
            raise RuntimeError(f"{len(pending)} model steps never finished; see model-worker.log")
        pending.discard(got)
    return n / (time.perf_counter() - t), sent


def main() -> None:
    ap = argparse.ArgumentParser(description="model gateway benchmark")
    ap.add_argument("--latency-n", type=int, default=300, help="sequential requests per latency path")
    ap.add_argument("--inflight", type=int, default=1000, help="requests in flight for the throughput part")
    ap.add_argument("--delay", type=float, default=0.2, help="server's fixed answer delay (throughput part)")
    ap.add_argument("--server-slots", type=int, default=64, help="requests the server processes at once")
    ap.add_argument("--worker-concurrency", type=int, default=96, help="threads of the model worker")
    ap.add_argument("--no-queue", action="store_true", help="skip the parts through the model queue")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mf-bench-model-"))
    fleet = Fleet(tmp, args.server_slots, args.worker_concurrency)
    try:
        if not args.no_queue:
            fleet.start_worker()
            q = QueueDriver(fleet)  # wait for the worker: one step end to end
            (eid,) = q.episodes(1)
            q.send(eid)
            if q.done(timeout=60) != eid:
                raise RuntimeError(f"model worker did not answer; see {tmp / 'model-worker.log'}")
        print(
            f"# model gateway benchmark  (cpus={os.cpu_count()}, server {fleet.server_url}, "
            f"endpoint_concurrency={args.server_slots}, worker threads={args.worker_concurrency})"
        )
        fleet.control(delay_s=0.0, reset=True)
        lat = latency(fleet, args.latency_n)
        base = pct(lat["direct"], 0.5)
        print(f"\n## latency, {args.latency_n} sequential requests, server answers at once")
        for name, label in (
            ("direct", "straight to the server"),
            ("backend", "gateway backend (no queue)"),
            ("streamed", "gateway backend, streamed"),
            ("queue", "through the model queue"),
        ):
            if lat[name]:
                ratio = pct(lat[name], 0.5) / base
                ratio99 = pct(lat[name], 0.99) / pct(lat["direct"], 0.99)
                print(f"{label:30s} {fmt(lat[name])}   ratio p50 x{ratio:.1f}  p99 x{ratio99:.1f}")

        fleet.control(delay_s=args.delay, reset=True)
        limit = args.server_slots / args.delay
        print(
            f"\n## throughput, {args.inflight} requests in flight, server delay {args.delay * 1000:.0f} ms x "
            f"{args.server_slots} slots = limit {limit:.0f} req/s"
        )
        rate = throughput_direct(fleet, args.inflight, min(args.inflight, args.worker_concurrency))
        print(
            f"{'straight to the server':30s} {rate:7.1f} req/s  ({rate / limit:5.1%} of the limit; "
            f"{args.worker_concurrency} client threads)"
        )
        rate = throughput_backend(fleet, args.inflight, min(args.inflight, args.worker_concurrency))
        print(
            f"{'gateway backend (no queue)':30s} {rate:7.1f} req/s  ({rate / limit:5.1%} of the limit; "
            f"{args.worker_concurrency} threads)"
        )
        if not args.no_queue:
            stats = fleet.control(reset=True)
            pids = {"model worker": fleet.worker.pid, "server": fleet.server.pid, "sender+collector": None}
            before = {k: cpu_s(pid) for k, pid in pids.items()}
            rate, sent = throughput_queue(fleet, args.inflight)
            used = {k: (cpu_s(pid) - before[k]) / args.inflight * 1000 for k, pid in pids.items()}
            peak = fleet.control()["peak"]
            print(
                f"{'through the model queue':30s} {rate:7.1f} req/s  ({rate / limit:5.1%} of the limit; "
                f"{args.inflight} sent in {sent:.2f}s; server peak concurrency {peak}/{stats['max_concurrency']})"
            )
            print("CPU per request: " + ", ".join(f"{k} {v:.1f} ms" for k, v in used.items()))
        print(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    finally:
        fleet.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
