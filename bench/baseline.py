"""Baseline: the same simulated episodes done the way a user would without MegaFlow (one asyncio loop,
one process, a semaphore), against MegaFlow's fleet at N = 100 and 1,000, with the ratio of wall times.

    .venv/bin/python bench/baseline.py                 # 12 s episodes
    .venv/bin/python bench/baseline.py --profile 75

What MegaFlow gives for the difference: episodes survive a crash of any worker (a step is
redelivered, never lost or forked), three-tier limits (fleet, user, host), per-episode records and
trajectories, many machines instead of one loop.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import PROFILES, Fleet, fleet_settings, run_batch, start_redis, wait_workers  # noqa: E402


async def _episode(sem: asyncio.Semaphore, model_s: float, cmd_s: float, calls: int) -> None:
    async with sem:
        for _ in range(calls):
            await asyncio.sleep(model_s)  # the model call
            await asyncio.sleep(cmd_s)  # the command (the last one: the evaluation)


def asyncio_baseline(n: int, profile: str, limit: int) -> tuple[float, float]:
    """(wall seconds, CPU ms per episode) of ``n`` episodes in one event loop."""
    model_s, cmd_s, calls = PROFILES[profile]

    async def run() -> None:
        sem = asyncio.Semaphore(limit)
        await asyncio.gather(*(_episode(sem, model_s, cmd_s, calls) for _ in range(n)))

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    asyncio.run(run())
    wall = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return wall, cpu * 1000 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="12")
    ap.add_argument("--ns", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--env-hosts", type=int, default=2)
    ap.add_argument("--agent-inline", choices=["on", "off"], default="on", help="MEGAFLOW_AGENT_INLINE for the fleet")
    ap.add_argument(
        "--model-workers", type=int, default=2, help="model worker processes (one per core here: a process is one GIL)"
    )
    a = ap.parse_args()
    goal = {"75": 1.05, "12": 1.25}[a.profile]
    tmp = Path(tempfile.mkdtemp(prefix="mf-baseline-"))
    redis_proc, url = start_redis(tmp)
    settings = fleet_settings(
        url, tmp, max(a.ns), a.profile, a.env_hosts, events=False, agent_inline=a.agent_inline == "on"
    )
    print(
        f"agent decisions: {'inline in the model/env steps' if settings.agent_inline else 'agent-service tasks'}; "
        f"{a.model_workers} model worker process(es), {a.env_hosts} env hosts"
    )
    fleet = Fleet(settings, tmp)
    try:
        fleet.start("control", ["control"])
        for m in range(1, a.model_workers + 1):
            fleet.start(f"model-{m}", ["worker", "model", "--host", f"base-m{m}"])
        fleet.start("agent", ["worker", "agent"])
        for h in range(1, a.env_hosts + 1):
            fleet.start(f"env-{h}", ["worker", "env", "--host", f"env-{h}"])
        wait_workers(settings, fleet, 1 + a.model_workers + a.env_hosts)
        for n in a.ns:
            base_wall, base_cpu = asyncio_baseline(n, a.profile, limit=n)
            row = run_batch(settings, fleet, redis_proc.pid, n, a.profile)
            ratio = row["wall_s"] / base_wall
            print(
                f"N={n:>5} ({a.profile} s episodes): asyncio {base_wall:7.2f}s ({base_cpu:.2f} CPU-ms/episode) | "
                f"MegaFlow {row['wall_s']:7.2f}s ({row['cpu_ms_per_episode_total']:.1f} CPU-ms/episode, "
                f"{row['states']}) | ratio {ratio:.2f}x (goal <= {goal}x: {'met' if ratio <= goal else 'NOT met'})"
            )
    finally:
        fleet.close()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        "MegaFlow's price buys: crash recovery (a killed worker loses one step, never an episode), fleet / user /"
        " host limits with leases, records and trajectories per episode, and a fleet of many machines."
    )


if __name__ == "__main__":
    main()
