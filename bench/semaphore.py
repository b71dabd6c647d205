"""Benchmark of the resource manager against a real Redis; prints figures, one run.

1. Three-tier acquire+release (one Lua script each way) ops/s against a plain redis-py ``Lock``
   acquire+release on the same Redis, sequential from one client (round-trip bound); ratio printed.
2. Admission latency with 1,000 versus 100,000 queued episodes (goal: ratio at most 2):
   - heavy user: one user at its limit holds 1k / 100k queued episodes; time to admit a light
     user's episode submitted behind them;
   - FIFO head: 1k / 100k episodes queued over 100 users, all under their limits; time to admit
     the oldest one.

    .venv/bin/python bench/semaphore.py                       # starts a private redis-server
    .venv/bin/python bench/semaphore.py --redis-url redis://127.0.0.1:6379/15   # flushes nothing, uses its own prefix
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from megaflow.keys import Keys  # noqa: E402
from megaflow.resources import LeaseSemaphore, ResourceManager  # noqa: E402
from megaflow.settings import Settings  # noqa: E402


def private_redis() -> tuple[str, subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("redis-server")
    if not exe:
        sys.exit("redis-server not found; give --redis-url")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", tempfile.gettempdir()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", proc


def wipe(client: redis.Redis, prefix: str) -> None:
    batch = []
    for key in client.scan_iter(f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.delete(*batch)
            batch = []
    if batch:
        client.delete(*batch)


def manager(client: redis.Redis, url: str, prefix: str, **overrides) -> ResourceManager:
    settings = Settings.load(redis_url=url, key_prefix=prefix, state_dir=tempfile.gettempdir(), **overrides)
    return ResourceManager(client, settings, Keys(prefix))


def bench_ops(client: redis.Redis, url: str, n: int) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    m = manager(client, url, prefix, global_limit=1000, user_limit=1000)
    m.register_host("h", capacity=1000, images=[], warm={}, disk_free_gb=1)
    for i in range(200):  # warm-up, and scripts loaded
        m.acquire(f"w{i}", "u", "h")
        m.release(f"w{i}")
    t = time.perf_counter()
    for i in range(n):
        assert m.acquire(f"e{i}", "u", "h") == "ok"
        m.release(f"e{i}")
    tiers = n / (time.perf_counter() - t)

    sem = LeaseSemaphore(client, f"{prefix}:sem", limit=1000, lease_s=60)
    t = time.perf_counter()
    for i in range(n):
        assert sem.acquire(f"e{i}")
        sem.release(f"e{i}")
    single = n / (time.perf_counter() - t)

    lock = client.lock(f"{prefix}:lock", timeout=60)
    t = time.perf_counter()
    for _ in range(n):
        assert lock.acquire(blocking=False)
        lock.release()
    plain = n / (time.perf_counter() - t)
    wipe(client, prefix)
    print(f"acquire+release, {n} each, one client, sequential:")
    print(f"  three-tier (ResourceManager.acquire/release): {tiers:9.0f} ops/s")
    print(f"  one tier (LeaseSemaphore)                   : {single:9.0f} ops/s")
    print(f"  redis-py Lock                               : {plain:9.0f} ops/s")
    print(f"  ratio three-tier / Lock                     : {tiers / plain:9.2f}")


def fill(m: ResourceManager, n: int, users: list[str]) -> None:
    batch = []
    for i in range(n):
        batch.append({"episode_id": f"q{i}", "user": users[i % len(users)], "image": f"img{i % 50}"})
        if len(batch) == 2000:
            m.enqueue(batch)
            batch = []
    if batch:
        m.enqueue(batch)


def latency_heavy_user(client: redis.Redis, url: str, queued: int, samples: int) -> list[float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    m = manager(client, url, prefix, global_limit=10_000, user_limit=10_000)
    for h in range(20):
        m.register_host(f"h{h}", capacity=100, images=[f"img{h}"], warm={}, disk_free_gb=100)
    m.set_quota("heavy", 1)
    fill(m, queued, ["heavy"])
    assert len(m.admit(10)) == 1  # heavy takes its one slot, then is parked
    out = []
    for i in range(samples):
        m.enqueue([{"episode_id": f"light{i}", "user": f"light{i % 10}", "image": "img3"}])
        t = time.perf_counter()
        got = m.admit(1)
        out.append(time.perf_counter() - t)
        assert [a.episode_id for a in got] == [f"light{i}"], got
        m.release(f"light{i}")
    assert m.queue_length() == queued - 1
    wipe(client, prefix)
    return out


def latency_fifo_head(client: redis.Redis, url: str, queued: int, samples: int) -> list[float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    m = manager(client, url, prefix, global_limit=10_000, user_limit=10_000)
    for h in range(20):
        m.register_host(f"h{h}", capacity=100, images=[f"img{h}"], warm={}, disk_free_gb=100)
    fill(m, queued, [f"user{u}" for u in range(100)])
    out = []
    for i in range(samples):
        t = time.perf_counter()
        got = m.admit(1)
        out.append(time.perf_counter() - t)
        assert [a.episode_id for a in got] == [f"q{i}"], got
        m.release(f"q{i}")
    wipe(client, prefix)
    return out


def fmt(xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return f"median {statistics.median(xs) * 1e6:7.0f} us   p99 {p99 * 1e6:7.0f} us"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", help="Redis to use (default: a private redis-server on a free port)")
    ap.add_argument("--ops", type=int, default=3000, help="acquire+release pairs per contender")
    ap.add_argument("--samples", type=int, default=300, help="admissions timed per queue length")
    args = ap.parse_args()
    proc = None
    url = args.redis_url
    if not url:
        url, proc = private_redis()
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        info = client.info("server")
        print(f"Redis {info['redis_version']} at {url}; python {sys.version.split()[0]}")
        bench_ops(client, url, args.ops)
        for name, fn in (("heavy user at its limit holds the queue", latency_heavy_user),
                         ("FIFO head, 100 users under their limits", latency_fifo_head)):
            print(f"admission latency, {name} (admit(1) call, {args.samples} samples):")
            res = {}
            for queued in (1_000, 100_000):
                t = time.perf_counter()
                res[queued] = fn(client, url, queued, args.samples)
                print(f"  {queued:>7,} queued: {fmt(res[queued])}   (setup+run {time.perf_counter() - t:.1f}s)")
            ratio = statistics.median(res[100_000]) / statistics.median(res[1_000])
            print(f"  ratio 100k / 1k (medians): {ratio:.2f}  (goal <= 2: {'met' if ratio <= 2 else 'NOT met'})")
    finally:
        client.close()
        if proc:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
