"""Elastic fleet figures.

Part 1 (a real sim fleet: control, model and agent workers as processes, env hosts started by the
local provider): time to drain a burst backlog with the autoscaler (MIN..MAX hosts) against a fixed
fleet of MAX hosts and one of MIN hosts, and the host-hours each held while the burst ran.

Part 2 (a real sim fleet again, one fresh fleet per mode, the sim backend's warm-pool model on):
a mixed workload of many images, a few hot, arriving in waves, run all-ephemeral, all-persistent
(static pool of 2) and with the automatic mode choice (pools published per image and applied by the
env workers' heartbeats); batch time, container starts (sandboxes booted, refills included), the
env start-up p50 (admitted -> env ready) and the share of episodes whose env was ready in under 1 s.

Part 3 (an event model with the same latencies, for larger fleets than this machine runs): the same
comparison, plus idle warm container-seconds.

    .venv/bin/python bench/elastic.py                       # burst of 24, hosts 1..4, 2 slots each
    .venv/bin/python bench/elastic.py --burst 40 --max 5 --skip-fleet   # the event model only
    .venv/bin/python bench/elastic.py --skip-fleet --modes-fleet         # part 2 only
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import start_redis  # one loopback redis-server helper for every bench

from megaflow.elastic.config import ElasticConfig
from megaflow.elastic.policy import choose_mode

CMD_S, MODEL_S = 0.5, 0.3


def spec(i: int) -> dict:
    replies = ["step\n```bash\nwork 1\n```", "step\n```bash\nwork 2\n```", "MEGAFLOW_SUBMIT"]
    return {
        "task_id": f"burst-{i}",
        "model": {"backend": "scripted", "replies": replies, "latency_s": MODEL_S},
        "agent": {"max_steps": 4},
        "eval": {"command": "evaluate"},
    }


def fleet_run(settings, label: str, lo: int, hi: int, burst: int, quiet_s: float) -> dict:
    """One burst on a fleet the autoscaler keeps between ``lo`` and ``hi`` hosts (lo == hi: fixed)."""
    import redis

    from megaflow.client import Client
    from megaflow.core.keys import Keys
    from megaflow.elastic import usage
    from megaflow.elastic.autoscaler import Autoscaler
    from megaflow.engine.resources import ResourceManager

    cfg = ElasticConfig.model_validate(
        {
            "min_hosts": lo,
            "max_hosts": hi,
            "cooldown_s": 0,
            "idle_s": 2,
            "boot_s": 3,
            "episode_s": 3,
            "target_wait_s": 6,
            "lag_threshold_s": 5,
            "interval_s": 0.5,
            "prices": {"local": 1.0},
            "provider": {"type": "local", "name_prefix": label},
        }
    )
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    res = ResourceManager(r, settings, Keys(settings.key_prefix))
    scaler = Autoscaler(r, settings, res, cfg=cfg)
    stop = threading.Event()
    loop = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 120
        while len([h for h in res.hosts() if h["alive"] and h["name"].startswith(label)]) < lo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: {lo} hosts did not join in 120 s")
            time.sleep(0.2)
        with Client(settings) as client:
            t0 = time.time()
            sub = client.submit([spec(i) for i in range(burst)], user=label)
            st = client.wait(sub.batch_id, timeout=600, poll_s=0.2)
            t1 = time.time()
        time.sleep(quiet_s)  # a quiet spell after the burst: a fixed fleet keeps holding its hosts
        quiet = usage.fleet_summary(r, settings.key_prefix, cfg, since=t0, until=time.time())
        summary = usage.fleet_summary(r, settings.key_prefix, cfg, since=t0, until=t1)
        peak = max((h for _, h, _, _ in summary["fleet_series"]), default=0)
        return {
            "label": label,
            "drain_s": t1 - t0,
            "host_hours": summary["host_hours"],
            "peak_hosts": peak,
            "ok": st["counts"].get("SUCCEEDED", 0),
            "used_share": summary["used_share"],
            "quiet_host_hours": quiet["host_hours"],
        }
    finally:
        stop.set()
        loop.join(10)
        for rec in scaler.managed().values():  # drained first, so no later run admits to a stopped host
            if rec["state"] != "removed":
                try:
                    res.drain_host(rec["name"], True)
                except Exception:
                    pass
        scaler.close(stop_hosts=True)
        r.close()


def part_fleet(args) -> None:
    from megaflow import fleet
    from megaflow.core.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="mf-elastic-"))
    rproc, url = start_redis(tmp)
    settings = Settings.load(
        redis_url=url,
        state_dir=str(tmp / "state"),
        host_name="bench",
        metrics_port=0,
        host_capacity=args.slots,
        global_limit=256,
        user_limit=256,
        sweep_interval_s=2.0,
        lease_s=15.0,
        host_ttl_s=6.0,
        env_backend={"type": "sim", "rules": [{"match": ".*", "latency_s": CMD_S, "exit_code": 0}]},
    )
    fleet.up(settings, env_hosts=0, wait_s=120, echo=lambda m: None)
    try:
        rows = [
            fleet_run(settings, "auto", args.min, args.max, args.burst, args.quiet),
            fleet_run(settings, "fixmax", args.max, args.max, args.burst, args.quiet),
            fleet_run(settings, "fixmin", args.min, args.min, args.burst, args.quiet),
        ]
    finally:
        fleet.down(settings, echo=lambda m: None)
        rproc.terminate()
        rproc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nburst of {args.burst} episodes, {args.slots} slots per host, hosts {args.min}..{args.max}")
    print(
        f"{'fleet':<22}{'drain s':>9}{'host-s':>9}{'+quiet':>9}{'peak':>6}{'used/held':>11}{'ok':>5}"
        f"   (host-s: during the burst; +quiet: burst and {args.quiet:.0f} s after)"
    )
    names = {"auto": f"autoscaled {args.min}..{args.max}", "fixmax": f"fixed {args.max}", "fixmin": f"fixed {args.min}"}
    for row in rows:
        share = "-" if row["used_share"] is None else f"{100 * row['used_share']:.0f}%"
        print(
            f"{names[row['label']]:<22}{row['drain_s']:>9.1f}{3600 * row['host_hours']:>9.0f}"
            f"{3600 * row['quiet_host_hours']:>9.0f}{row['peak_hosts']:>6}{share:>11}{row['ok']:>5}"
        )


# --- part 3: the mode choice on a mixed workload, as an event model ---------------------------------


def mixed_workload(seed: int, hot: int, cold: int) -> list[tuple[float, str]]:
    """(arrival time, image): ``hot`` images with 30 episodes each, ``cold`` ones with 1-2, over 60 s."""
    rng = random.Random(seed)
    eps = [(rng.uniform(0, 60), f"hot-{i}") for i in range(hot) for _ in range(30)]
    eps += [(rng.uniform(0, 60), f"cold-{i}") for i in range(cold) for _ in range(rng.randint(1, 2))]
    return sorted(eps)


def simulate(
    work: list[tuple[float, str]],
    mode: str,
    *,
    hosts: int,
    slots: int,
    boot_s: float,
    warm_s: float,
    run_s: float,
    pool: int,
    cfg: ElasticConfig,
) -> dict:
    """FIFO admission to the host with a warm container of the image, else any free slot; pools refill."""
    free = [slots] * hosts
    warm: list[Counter] = [Counter() for _ in range(hosts)]
    warm_since: list[dict[str, list[float]]] = [defaultdict(list) for _ in range(hosts)]
    target: list[Counter] = [Counter() for _ in range(hosts)]
    events: list[tuple[float, int, str, int, str]] = []  # (t, seq, kind, host, image)
    seq = 0
    queue: list[tuple[float, str]] = []
    starts = idle = 0.0
    end = 0.0
    arrived: Counter = Counter()
    choices: dict[str, str] = {}
    for t, image in work:
        heapq.heappush(events, (t, seq, "arrive", -1, image))
        seq += 1

    def refill(t: float, h: int, image: str) -> None:
        nonlocal seq, starts
        while warm[h][image] + target[h]["+" + image] < target[h][image]:
            target[h]["+" + image] += 1
            starts += 1
            heapq.heappush(events, (t + boot_s, seq, "warm", h, image))
            seq += 1

    while events:
        t, _, kind, h, image = heapq.heappop(events)
        if kind == "arrive":
            arrived[image] += 1
            waiting = sum(1 for _, im in queue if im == image)
            if mode == "auto":
                c = choose_mode(image, waiting, arrived[image], hosts, cfg)
                choices[image], p = c.mode, c.pool_per_host
            else:
                p = pool if mode == "persistent" else 0
            if p:
                for k in range(hosts):
                    target[k][image] = max(target[k][image], p)
                    refill(t, k, image)
            queue.append((t, image))
        elif kind == "warm":
            target[h]["+" + image] -= 1
            warm[h][image] += 1
            warm_since[h][image].append(t)
        elif kind == "done":
            free[h] += 1
            end = max(end, t)
        while queue and any(free):
            _, im = queue.pop(0)
            hs = [k for k in range(hosts) if free[k] and warm[k][im]] or [k for k in range(hosts) if free[k]]
            k = max(hs, key=lambda x: free[x])
            free[k] -= 1
            if warm[k][im]:
                warm[k][im] -= 1
                idle += t - warm_since[k][im].pop(0)
                latency = warm_s
                refill(t, k, im)
            else:
                starts += 1
                latency = boot_s
            heapq.heappush(events, (t + latency + run_s, seq, "done", k, im))
            seq += 1
    for k in range(hosts):  # warm containers still idle at the end count until then
        idle += sum(end - s for ts in warm_since[k].values() for s in ts)
    persistent = sum(1 for m in choices.values() if m == "persistent")
    return {"batch_s": end, "starts": int(starts), "idle_warm_s": idle, "persistent_images": persistent}


def part_modes(args) -> None:
    cfg = ElasticConfig(persistent_min_demand=4, max_pool=3)
    work = mixed_workload(args.seed, hot=3, cold=40)
    print(
        f"\nmixed workload: {len(work)} episodes, 3 hot images (30 each), 40 cold (1-2 each); "
        f"{args.max} hosts x {args.slots} slots; boot 5 s, warm take 0.2 s, episode 10 s (model)"
    )
    print(f"{'mode':<24}{'batch s':>9}{'starts':>8}{'idle warm s':>13}")
    for mode in ("ephemeral", "persistent", "auto"):
        row = simulate(
            work, mode, hosts=args.max, slots=args.slots, boot_s=5.0, warm_s=0.2, run_s=10.0, pool=2, cfg=cfg
        )
        name = mode if mode != "auto" else f"auto ({row['persistent_images']} persistent)"
        if mode == "persistent":
            name = "persistent (pool 2)"
        print(f"{name:<24}{row['batch_s']:>9.1f}{row['starts']:>8}{row['idle_warm_s']:>13.0f}")


# --- part 2: the mode choice on a real sim fleet -----------------------------------------------------

BOOT_S, WARM_S = 2.0, 0.05


def mode_spec(i: int, image: str, mode: str | None) -> dict:
    return {**spec(i), "task_id": f"mix-{i}", "image": image, **({"mode": mode} if mode else {})}


def mixed_waves(seed: int, hot: int, cold: int, waves: int) -> list[list[str]]:
    """Images per wave: ``hot`` images with 12 episodes each, ``cold`` ones with 1-2, shuffled into waves."""
    rng = random.Random(seed)
    images = [f"hot-{i}" for i in range(hot) for _ in range(12)]
    images += [f"cold-{i}" for i in range(cold) for _ in range(rng.randint(1, 2))]
    rng.shuffle(images)
    return [images[w::waves] for w in range(waves)]


def modes_fleet_run(args, mode: str, waves: list[list[str]]) -> dict:
    """One mode on a fresh sim fleet of ``args.max`` static env hosts; returns its figures."""
    import redis

    from megaflow import fleet
    from megaflow.client import Client
    from megaflow.core.keys import Keys
    from megaflow.core.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="mf-modes-"))
    rproc, url = start_redis(tmp)
    elastic = {"enabled": False, "auto_mode": True, "persistent_min_demand": 4, "max_pool": 3}
    settings = Settings.load(
        redis_url=url,
        state_dir=str(tmp / "state"),
        host_name="bench",
        metrics_port=0,
        host_capacity=args.slots,
        global_limit=256,
        user_limit=256,
        warm_pool_size=2,
        elastic=elastic if mode == "auto" else {},
        env_backend={
            "type": "sim",
            "warm_pool": True,
            "boot_latency_s": BOOT_S,
            "warm_latency_s": WARM_S,
            "rules": [{"match": ".*", "latency_s": CMD_S, "exit_code": 0}],
        },
    )
    fleet.up(settings, env_hosts=args.max, wait_s=120, echo=lambda m: None)
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        keys = Keys(settings.key_prefix)
        fixed = None if mode == "auto" else mode
        with Client(settings) as client:
            t0 = time.time()
            batches, n = [], 0
            for w, images in enumerate(waves):
                if w:
                    time.sleep(args.wave_s)
                batches.append(client.submit([mode_spec(n + i, im, fixed) for i, im in enumerate(images)], user=mode))
                n += len(images)
            rows = []
            for b in batches:
                client.wait(b.batch_id, timeout=600, poll_s=0.2)
                rows += client.results(b.batch_id)
            t1 = time.time()
        deadline = time.monotonic() + 60  # starts as of a heartbeat after the last episode ended
        while True:
            beats = [json.loads(r.get(k) or "{}") for k in r.scan_iter(keys.worker_health("env", "*"))]
            if len(beats) == args.max and all(b.get("ts", 0) > t1 for b in beats):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mode}: env workers did not report after the batch")
            time.sleep(0.2)
        starts = sum(int(b.get("sandbox_starts", 0)) for b in beats)
        env_s = sorted(
            p["env_ready"] - p["admitted"] for p in (x["phases"] for x in rows) if "env_ready" in p and "admitted" in p
        )
        modes = Counter(x["mode"] for x in rows)
        return {
            "mode": mode,
            "batch_s": t1 - t0,
            "starts": starts,
            "env_p50": env_s[len(env_s) // 2] if env_s else None,
            "warm_share": sum(1 for v in env_s if v < BOOT_S / 2) / max(1, len(env_s)),
            "ok": sum(1 for x in rows if x["state"] == "SUCCEEDED"),
            "n": len(rows),
            "persistent_share": modes.get("persistent", 0) / max(1, len(rows)),
        }
    finally:
        r.close()
        fleet.down(settings, echo=lambda m: None)
        rproc.terminate()
        rproc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def part_modes_fleet(args) -> None:
    waves = mixed_waves(args.seed, hot=3, cold=12, waves=4)
    total = sum(len(w) for w in waves)
    print(
        f"\nmixed workload on a sim fleet: {total} episodes (3 hot images x 12, 12 cold x 1-2) in 4 waves "
        f"{args.wave_s:g} s apart; {args.max} hosts x {args.slots} slots; boot {BOOT_S:g} s, warm take "
        f"{WARM_S:g} s, commands {CMD_S:g} s"
    )
    print(f"{'mode':<24}{'batch s':>9}{'starts':>8}{'env p50 s':>11}{'env<1s':>8}{'persistent':>12}{'ok':>6}")
    for mode in ("ephemeral", "persistent", "auto"):
        row = modes_fleet_run(args, mode, waves)
        name = {"persistent": "persistent (pool 2)", "auto": "auto"}.get(mode, mode)
        p50 = "-" if row["env_p50"] is None else f"{row['env_p50']:.2f}"
        print(
            f"{name:<24}{row['batch_s']:>9.1f}{row['starts']:>8}{p50:>11}{100 * row['warm_share']:>7.0f}%"
            f"{100 * row['persistent_share']:>11.0f}%{row['ok']:>4}/{row['n']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=24)
    ap.add_argument("--min", type=int, default=1)
    ap.add_argument("--max", type=int, default=4)
    ap.add_argument("--slots", type=int, default=2, help="slots per env host")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quiet", type=float, default=20.0, help="seconds of no load after each burst")
    ap.add_argument("--skip-fleet", action="store_true", help="no burst on a fleet (part 1)")
    ap.add_argument("--modes-fleet", action="store_true", help="run part 2 even with --skip-fleet")
    ap.add_argument("--wave-s", type=float, default=3.0, help="seconds between the waves of part 2")
    args = ap.parse_args()
    if not args.skip_fleet:
        part_fleet(args)
    if not args.skip_fleet or args.modes_fleet:
        part_modes_fleet(args)
    part_modes(args)


if __name__ == "__main__":
    main()
