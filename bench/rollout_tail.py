"""Rollouts against the long tail: plain FIFO vs over-sampling (keep k of n) + trajectory priority.

A real fleet (bench/scale.py's helpers: redis-server, control, model, agent and env worker
processes, the ``sim`` env backend) runs the same rollout twice in one run: G groups of k replicas,
each episode 3 scripted model calls whose latency has a heavy tail (a seeded fraction of
trajectories is ``--slow-factor`` times slower), and a seeded reward per (group, replica) that does
not depend on latency. The model pool is smaller than the slot count, so model calls queue.

  plain  : Client.rollout(replicas=k)                                   (FIFO, wait for all k)
  tail   : Client.rollout(replicas=k, oversample=n, grace=g, priority=True)

Prints the batch completion time of each, the ratio (goal >= 1.5x), and the mean reward per group
both ways, with how many replicas each kept group censored.

    .venv/bin/python bench/rollout_tail.py                      # 16 groups x 4, n=6, one wave: ~1 min
    .venv/bin/python bench/rollout_tail.py --slots 48 --model-pool 24 --ablate   # capacity-bound
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import Fleet, start_redis, wait_workers

from megaflow.core.settings import Settings

CALLS = 3  # model calls per episode: two commands, then a submit; then the evaluation command


def draws(a: argparse.Namespace) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], bool]]:
    """Seeded per-(group, replica) latency factor and reward, the same in both runs."""
    rng = random.Random(a.seed)
    factor, reward = {}, {}
    p_group = [rng.uniform(0.2, 0.8) for _ in range(a.groups)]
    for g in range(a.groups):
        for r in range(a.oversample):
            slow = rng.random() < a.slow_p
            factor[g, r] = (a.slow_factor if slow else 1.0) * rng.lognormvariate(0.0, 0.2)
            reward[g, r] = rng.random() < p_group[g]
    return factor, reward


def task(g: int, r: int, a: argparse.Namespace, factor: dict, reward: dict) -> dict[str, Any]:
    """Group g's task as replica r runs it (the replica's draws baked into its spec)."""
    lat = a.model_s * factor[g, r]
    replies: list[Any] = [{"content": f"step {i}\n```bash\nwork {i}\n```", "latency_s": lat} for i in range(CALLS - 1)]
    replies.append({"content": "MEGAFLOW_SUBMIT", "latency_s": lat})
    verdict = "pass" if reward[g, r] else "fail"
    return {
        "task_id": f"g{g}",
        "model": {"backend": "scripted", "replies": replies},
        "agent": {"max_steps": CALLS + 1},
        "eval": {"command": f"evaluate {verdict}"},
        "metadata": {"bench_replica": r},
    }


def settings_for(url: str, tmp: Path, a: argparse.Namespace) -> Settings:
    return Settings.load(
        redis_url=url,
        state_dir=str(tmp / "state"),
        host_name="tail",
        task_events=False,
        metrics_port=0,
        global_limit=a.slots,
        user_limit=a.slots,
        host_capacity=a.slots,
        boot_concurrency=a.slots,
        model_concurrency=a.model_pool,
        env_concurrency=a.slots,
        lease_s=120.0,
        host_ttl_s=60.0,
        sweep_interval_s=30.0,
        admit_start_timeout_s=3600.0,
        env_backend={
            "type": "sim",
            "rules": [
                {"match": "evaluate fail", "latency_s": a.cmd_s, "exit_code": 1},
                {"match": ".*", "latency_s": a.cmd_s, "exit_code": 0},
            ],
        },
    )


def one_run(
    settings: Settings, a: argparse.Namespace, factor: dict, reward: dict, *, oversample: bool, priority: bool
) -> dict[str, Any]:
    """Run the rollout one way; return its wall time and per-group rewards."""
    from megaflow.client import Client

    n = a.oversample if oversample else a.keep
    with Client(settings) as client:
        t0 = time.monotonic()
        run = _submit(client, a, factor, reward, n, priority)
        groups = []
        for grp in run:
            grp["closed_s"] = time.monotonic() - t0
            groups.append(grp)
        wall = time.monotonic() - t0
        client.cancel(run.batch_id)  # nothing should be left; be sure
    means = [statistics.mean(x or 0.0 for x in grp["rewards"]) for grp in sorted(groups, key=lambda x: x["index"])]
    return {
        "wall_s": wall,
        "means": means,
        "masked": sum(g["masked"] for g in groups),
        "censored": sum(g.get("censored", 0) for g in groups),
        "cancelled": sum(len(g.get("cancelled", [])) for g in groups),
        "kept": [g.get("kept", list(range(a.keep))) for g in sorted(groups, key=lambda x: x["index"])],
        "closed_s": [g["closed_s"] for g in sorted(groups, key=lambda x: x["index"])],
    }


def _submit(client, a: argparse.Namespace, factor: dict, reward: dict, n: int, priority: bool):
    """Start the rollout; replica r of group g runs with its own seeded draws (same in both runs)."""
    from megaflow.core.spec import TaskSpec
    from megaflow.rollout import Rollout

    class Drawn(Rollout):
        def replica_spec(self, spec: TaskSpec, group: int, replica: int) -> TaskSpec:
            own = TaskSpec.model_validate(task(group, replica, a, factor, reward))
            return super().replica_spec(own, group, replica)

    rollout = Drawn(
        client,
        replicas=a.keep,
        oversample=n,
        grace=a.grace,
        priority=priority,
        user="bench",
        timeout=3600,
        trajectories=False,
    )
    return rollout.run([task(g, 0, a, factor, reward) for g in range(a.groups)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--keep", type=int, default=4, help="k: replicas kept per group")
    ap.add_argument("--oversample", type=int, default=6, help="n: replicas run per group in the tail run")
    ap.add_argument("--grace", type=float, default=0.5)
    ap.add_argument("--slots", type=int, default=96, help="global episode slots (one sim env host)")
    ap.add_argument("--model-pool", type=int, default=48, help="model worker threads (calls beyond queue)")
    ap.add_argument("--model-s", type=float, default=0.5, help="median seconds per model call")
    ap.add_argument("--cmd-s", type=float, default=0.2, help="seconds per sim command")
    ap.add_argument("--slow-p", type=float, default=0.05, help="fraction of trajectories in the tail")
    ap.add_argument("--slow-factor", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--ablate", action="store_true", help="also run over-sampling only and priority only")
    a = ap.parse_args()
    if a.oversample < a.keep:
        ap.error("--oversample must be at least --keep")
    factor, reward = draws(a)
    tmp = Path(tempfile.mkdtemp(prefix="mf-tail-"))
    redis_proc, url = start_redis(tmp)
    settings = settings_for(url, tmp, a)
    fleet = Fleet(settings, tmp)
    try:
        fleet.start("control", ["control"])
        fleet.start("model", ["worker", "model"])
        fleet.start("agent", ["worker", "agent"])
        fleet.start("env-1", ["worker", "env", "--host", "env-1"])
        wait_workers(settings, fleet, 3)
        slow = sum(1 for (g, r), f in factor.items() if r < a.keep and f > 3)
        stuck = sum(
            1 for g in range(a.groups) if sum(factor[g, r] > 3 for r in range(a.oversample)) > a.oversample - a.keep
        )
        print(
            f"rollout: {a.groups} groups x {a.keep} kept; tail run over-samples n={a.oversample}, grace "
            f"{a.grace}, trajectory priority; {a.slots} slots, {a.model_pool} model threads; model call "
            f"{a.model_s}s x lognormal(0.2), {a.slow_p:.0%} of trajectories x{a.slow_factor:g} "
            f"({slow} slow among the first k replicas; {stuck} groups with more than n-k slow, which "
            "over-sampling cannot save)"
        )
        plain = one_run(settings, a, factor, reward, oversample=False, priority=False)
        print(f"plain FIFO    : {plain['wall_s']:7.1f}s  masked {plain['masked']}")
        if a.ablate:
            for name, over, pri in (("oversample only", True, False), ("priority only", False, True)):
                part = one_run(settings, a, factor, reward, oversample=over, priority=pri)
                print(f"{name:<14}: {part['wall_s']:7.1f}s  ratio {plain['wall_s'] / part['wall_s']:.2f}x")
        tail = one_run(settings, a, factor, reward, oversample=True, priority=True)
        print(
            f"oversample+pri: {tail['wall_s']:7.1f}s  masked {tail['masked']}  cancelled {tail['cancelled']}  "
            f"censored {tail['censored']}"
        )
        print(f"batch completion time ratio plain/tail: {plain['wall_s'] / tail['wall_s']:.2f}x (goal >= 1.5x)")
        truth = [statistics.mean(float(reward[g, r]) for r in range(a.oversample)) for g in range(a.groups)]
        print("mean reward per group (plain | over-sampled | all n drawn):")
        for g in range(a.groups):
            pm, tm = plain["means"][g], tail["means"][g]
            print(
                f"  g{g:02d}: {pm:.2f} | {tm:.2f} | {truth[g]:.2f}  kept {tail['kept'][g]}  "
                f"closed at {plain['closed_s'][g]:.1f}s | {tail['closed_s'][g]:.1f}s"
            )
        print(
            f"overall mean reward: plain {statistics.mean(plain['means']):.3f}, over-sampled "
            f"{statistics.mean(tail['means']):.3f}, all drawn {statistics.mean(truth):.3f}"
        )
    finally:
        fleet.close()
        redis_proc.terminate()
        redis_proc.wait(10)
        print(f"logs in {tmp}")


if __name__ == "__main__":
    main()
