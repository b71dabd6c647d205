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

from megaflow.core.keys import Keys  # noqa: E402
from megaflow.core.settings import Settings  # noqa: E402
from megaflow.engine.resources import LeaseSemaphore, ResourceManager  # noqa: E402


def private_redis() -> tuple[str, subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("redis-server")
    if not exe:
        sys.exit("redis-server not found; give --redis-url")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tempfile.gettempdir(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


def bench_ops(client: redis.Redis, url: str, n: int, rounds: int = 10) -> None:
    """The three contenders run in alternating rounds, so a load change on the machine hits all alike."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    m = manager(client, url, prefix, global_limit=1000, user_limit=1000)
    m.register_host("h", capacity=1000, images=[], warm={}, disk_free_gb=1)
    sem = LeaseSemaphore(client, f"{prefix}:sem", limit=1000, lease_s=60)
    lock = client.lock(f"{prefix}:lock", timeout=60)

    def tiers(i: int) -> None:
        assert m.acquire(f"e{i}", "u", "h") == "ok"
        m.release(f"e{i}")

    def single(i: int) -> None:
        assert sem.acquire(f"e{i}")
        sem.release(f"e{i}")

    def plain(i: int) -> None:
        assert lock.acquire(blocking=False)
        lock.release()

    contenders = {
        "three-tier (ResourceManager.acquire/release)": tiers,
        "one tier (LeaseSemaphore)": single,
        "redis-py Lock": plain,
    }
    spent = dict.fromkeys(contenders, 0.0)
    for fn in contenders.values():  # warm-up, scripts loaded
        for i in range(100):
            fn(i)
    per_round = max(1, n // rounds)
    for r in range(rounds):
        for name, fn in contenders.items():
            t = time.perf_counter()
            for i in range(r * per_round, (r + 1) * per_round):
                fn(i)
            spent[name] += time.perf_counter() - t
    wipe(client, prefix)
    total = per_round * rounds
    ops = {name: total / t for name, t in spent.items()}
    print(f"acquire+release, {total} each, one client, sequential, {rounds} alternating rounds:")
    for name, v in ops.items():
        print(f"  {name:<45}: {v:9.0f} ops/s")
    tiers_ops, lock_ops = ops["three-tier (ResourceManager.acquire/release)"], ops["redis-py Lock"]
    print(f"  {'ratio three-tier / Lock':<45}: {tiers_ops / lock_ops:9.2f}")


def fill(m: ResourceManager, n: int, users: list[str]) -> None:
    batch = []
    for i in range(n):
        batch.append({"episode_id": f"q{i}", "user": users[i % len(users)], "image": f"img{i % 50}"})
        if len(batch) == 2000:
            m.enqueue(batch)
            batch = []
    if batch:
        m.enqueue(batch)


def fleet(client: redis.Redis, url: str) -> ResourceManager:
    m = manager(client, url, f"bench-{uuid.uuid4().hex[:8]}", global_limit=10_000, user_limit=10_000)
    for h in range(20):
        m.register_host(f"h{h}", capacity=100, images=[f"img{h}"], warm={}, disk_free_gb=100)
    return m


class HeavyUser:
    """One user at its limit holds ``queued`` episodes; time admitting a light user's episode."""

    def __init__(self, client: redis.Redis, url: str, queued: int):
        self.m = fleet(client, url)
        self.m.set_quota("heavy", 1)
        fill(self.m, queued, ["heavy"])
        assert len(self.m.admit(10)) == 1  # heavy takes its one slot, then is parked

    def sample(self, i: int) -> float:
        self.m.enqueue([{"episode_id": f"light{i}", "user": f"light{i % 10}", "image": "img3"}])
        t = time.perf_counter()
        got = self.m.admit(1)
        dt = time.perf_counter() - t
        assert [a.episode_id for a in got] == [f"light{i}"], got
        self.m.release(f"light{i}")
        return dt


class FifoHead:
    """``queued`` episodes over 100 users, all under their limits; time admitting the oldest."""

    def __init__(self, client: redis.Redis, url: str, queued: int):
        self.m = fleet(client, url)
        fill(self.m, queued, [f"user{u}" for u in range(100)])

    def sample(self, i: int) -> float:
        t = time.perf_counter()
        got = self.m.admit(1)
        dt = time.perf_counter() - t
        assert [a.episode_id for a in got] == [f"q{i}"], got
        self.m.release(f"q{i}")
        return dt


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
        for title, scenario in (
            ("heavy user at its limit holds the queue", HeavyUser),
            ("FIFO head, 100 users under their limits", FifoHead),
        ):
            t = time.perf_counter()
            small, big = scenario(client, url, 1_000), scenario(client, url, 100_000)
            setup = time.perf_counter() - t
            res: dict[int, list[float]] = {1_000: [], 100_000: []}
            for i in range(args.samples):  # alternate, so load changes hit both alike
                res[1_000].append(small.sample(i))
                res[100_000].append(big.sample(i))
            print(
                f"admission latency, {title} (admit(1) call, {args.samples} samples each, alternating; "
                f"setup {setup:.1f}s):"
            )
            for queued, xs in res.items():
                print(f"  {queued:>7,} queued: {fmt(xs)}")
            ratio = statistics.median(res[100_000]) / statistics.median(res[1_000])
            print(f"  ratio 100k / 1k (medians): {ratio:.2f}  (goal <= 2: {'met' if ratio <= 2 else 'NOT met'})")
            wipe(client, small.m.keys.prefix)
            wipe(client, big.m.keys.prefix)
    finally:
        client.close()
        if proc:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
