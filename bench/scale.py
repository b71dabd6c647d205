"""Scale: a real fleet (one process per service, the sim env backend, the scripted model with latency)
running N simulated episodes at once, for N = 1 ... 10,000, against this box's dispatch limit.

Per N it prints T(N), T(N)/T(1), admission lag p50/p99, overhead per episode (its time minus the
ideal episode time), CPU seconds per episode per service and for Redis, Redis bytes per episode
(peak in flight and after), total RSS; and, measured in the same run, the dispatch limit: raw
Celery no-op throughput on the same Redis times the tasks an episode needs, and the CPU each no-op
task costs (publish, worker, Redis), so each row also prints Celery's own CPU floor per episode
(its task count times that) and the fleet's CPU per episode against it. JSON and an SVG plot go to
--out.

    .venv/bin/python bench/scale.py                       # 12 s episodes, N = 1 10 100 1000 3000 10000
    .venv/bin/python bench/scale.py --profile 75 --ns 1 100 1000
    .venv/bin/python bench/scale.py --in-flight 30000     # admitted and waiting on long model calls
    .venv/bin/python bench/scale.py --in-flight 30000 --arrival-batch 1000   # arriving 1,000 at a time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaflow.core.settings import Settings  # noqa: E402

# model seconds, command seconds, model calls per episode; the evaluation is one more command.
PROFILES = {"75": (20.0, 5.0, 3), "12": (2.0, 1.0, 4)}
TICK = os.sysconf("SC_CLK_TCK")
HASH_MAX_LISTPACK_VALUE = 1024  # deploy/ansible/roles/redis: redis_hash_max_listpack_value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ideal_s(profile: str) -> float:
    model_s, cmd_s, calls = PROFILES[profile]
    return calls * (model_s + cmd_s)


def episode_spec(i: int, profile: str, model_s: float | None = None) -> dict[str, Any]:
    """One simulated episode: calls-1 commands, then a submit, then the evaluation command."""
    m, _cmd, calls = PROFILES[profile]
    replies = [f"step {k}\n```bash\nwork {k}\n```" for k in range(calls - 1)] + ["MEGAFLOW_SUBMIT"]
    return {
        "task_id": f"sim-{i}",
        "model": {"backend": "scripted", "replies": replies, "latency_s": m if model_s is None else model_s},
        "agent": {"max_steps": calls + 1},
        "eval": {"command": "evaluate"},
    }


# --- processes -------------------------------------------------------------------------------------
def cpu_s(pid: int) -> float:
    """CPU seconds of a process and its live descendants (prefork children included)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            parts = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) / TICK
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_bytes(pid: int) -> int:
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


@dataclass
class Fleet:
    """A redis-server and one process per service, all on loopback, stopped by ``close``."""

    settings: Settings
    tmp: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> None:
        env = dict(os.environ, **self.settings.to_env(), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "megaflow", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def close(self, cold: bool = False) -> None:
        """Stop every process: a warm shutdown (tasks finish), or ``cold`` (SIGQUIT: Celery's cold
        shutdown, for in-flight runs whose model calls would hold a warm shutdown for 600 s)."""
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGQUIT if cold else signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
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
            "--dir",
            str(tmp),
            # as deploy/ansible's redis.conf: an episode's hash (~30 fields, a spec and a sandbox handle of a
            # few hundred bytes) stays a compact listpack instead of a hashtable (3.6 -> ~2 KB per episode)
            "--hash-max-listpack-value",
            str(HASH_MAX_LISTPACK_VALUE),
        ],
        stdout=subprocess.DEVNULL,
    )
    import redis

    r = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            r.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def fleet_settings(
    url: str,
    tmp: Path,
    n_max: int,
    profile: str,
    env_hosts: int,
    *,
    events: bool,
    env_threads: int = 4096,
    agent_inline: bool = True,
) -> Settings:
    _m, cmd_s, _c = PROFILES[profile]
    per_host = math.ceil(n_max / env_hosts)
    return Settings.load(
        redis_url=url,
        state_dir=str(tmp / "state"),
        host_name="scale",
        task_events=events,
        agent_inline=agent_inline,  # the bash agent decides in the model/env step (MEGAFLOW_AGENT_INLINE)
        metrics_port=0,
        global_limit=n_max,
        user_limit=n_max,
        host_capacity=per_host,
        boot_concurrency=min(per_host, 1000),
        max_batch_episodes=max(n_max, 10_000),  # --in-flight 30000 is one batch
        model_concurrency=min(n_max, 8000),  # sizes each model worker's Redis pool (its threads: --concurrency)
        # threads start on demand; a cap keeps a burst of provisions from taking the PIDs that 30,000 model
        # threads need (kernel.pid_max is 32768 on this box: every thread takes one)
        env_concurrency=min(per_host, env_threads),
        lease_s=120.0,
        host_ttl_s=60.0,
        sweep_interval_s=30.0,
        admit_start_timeout_s=3600.0,
        env_backend={"type": "sim", "rules": [{"match": ".*", "latency_s": cmd_s, "exit_code": 0}]},
    )


def wait_workers(settings: Settings, fleet: Fleet, n_nodes: int, timeout_s: float = 120) -> None:
    from megaflow.workers.celery_app import create_app

    app = create_app(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while len(app.control.ping(timeout=0.5) or []) < n_nodes:
            dead = [n for n, p in fleet.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"fleet did not come up (exited: {dead}); logs in {fleet.tmp}")
    finally:
        app.close()


# INFO memory fields printed mid-run (per episode): what the keys hold, what Redis spends beside them
MEMORY_FIELDS = ("used_memory", "used_memory_dataset", "used_memory_overhead", "mem_clients_normal")


# --- where Redis bytes and commands go ----------------------------------------------------------------
_ID = re.compile(r"b-\d{8}-\d{6}-[0-9a-f]{6,8}(-\d{5})?|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def key_pattern(key: str) -> str:
    """A key with its batch / episode / message ids replaced by placeholders."""
    return _ID.sub(lambda m: "{ep}" if m.group(1) else ("{batch}" if m.group(0).startswith("b-") else "{uuid}"), key)


def key_breakdown(r: Any, batch_id: str) -> dict[str, list[float]]:
    """pattern -> [keys, bytes] (MEMORY USAGE of every key, exact), largest first; the keys of earlier
    batches (finished episodes kept for their TTL) are left out."""
    out: dict[str, list[float]] = {}
    pipe = r.pipeline(transaction=False)
    keys = [k for k in r.scan_iter(count=2000) if "b-" not in k or batch_id in k]
    for k in keys:
        pipe.memory_usage(k, samples=0)
    for k, size in zip(keys, pipe.execute()):
        row = out.setdefault(key_pattern(k), [0, 0])
        row[0] += 1
        row[1] += size or 0
    return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))


def hash_fields(r: Any, key_prefix: str, batch_id: str, sample: int = 200) -> dict[str, float]:
    """Mean bytes (name + value) of each episode-hash field over a sample of the batch's live episodes,
    largest first: what the episode hash is made of mid-run."""
    from megaflow.core.keys import Keys

    keys = Keys(key_prefix)
    ids = r.lrange(keys.batch_episodes(batch_id), 0, sample - 1)
    pipe = r.pipeline(transaction=False)
    for eid in ids:
        pipe.hgetall(keys.episode(eid))
    total: dict[str, float] = {}
    hashes = [h for h in pipe.execute() if h]
    for h in hashes:
        for name, value in h.items():
            total[name] = total.get(name, 0) + len(name) + len(value)
    n = max(1, len(hashes))
    return dict(sorted(((k, v / n) for k, v in total.items()), key=lambda kv: -kv[1]))


def command_counts(r: Any) -> dict[str, int]:
    """Redis commands served so far, by command (INFO commandstats)."""
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def wait_hosts(settings: Settings, fleet: Fleet, timeout_s: float = 60) -> None:
    """Until every env worker of the fleet has registered its host with the resource manager."""
    from megaflow.services.root import Root

    root = Root(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while len(root.resources.hosts()) < len([p for p in fleet.procs if p.startswith("env-")]):
            if time.monotonic() > deadline:
                raise RuntimeError("env hosts did not register")
            time.sleep(0.2)
    finally:
        root.close()


# --- one batch -------------------------------------------------------------------------------------
def run_batch(
    settings: Settings,
    fleet: Fleet,
    redis_pid: int,
    n: int,
    profile: str,
    model_s: float | None = None,
    wait: bool = True,
    breakdown: bool = False,
) -> dict[str, Any]:
    import redis as redis_mod

    from megaflow.client import Client

    r = redis_mod.Redis.from_url(settings.redis_url, decode_responses=True)

    wait_hosts(settings, fleet)
    base_info = r.info("memory")
    base_mem = int(base_info["used_memory"])
    pids = {name: p.pid for name, p in fleet.procs.items()} | {"redis": redis_pid}
    cpu0 = {name: cpu_s(pid) for name, pid in pids.items()}
    cmds0 = command_counts(r)
    peak = {"mem": base_mem, "rss": 0}
    stop = threading.Event()

    snap: dict[str, Any] = {}

    def sample() -> None:
        while not stop.wait(0.5):
            mem = int(r.info("memory")["used_memory"])
            peak["mem"] = max(peak["mem"], mem)
            # the key breakdown once, mid-episode (half the ideal episode time after the submit)
            if breakdown and not snap and time.time() - t_sub[0] > ideal_s(profile) / 2:
                info = r.info("memory")
                clients = int(r.info("clients")["connected_clients"])
                snap.update(mem=mem, keys=key_breakdown(r, snap_batch[0]), info=info, clients=clients)
                snap["fields"] = hash_fields(r, settings.key_prefix, snap_batch[0])
            peak["rss"] = max(peak["rss"], sum(rss_bytes(pid) for pid in pids.values()))

    snap_batch, t_sub = [""], [time.time()]
    specs = [episode_spec(i, profile, model_s) for i in range(n)]
    with Client(settings) as client:
        t0 = time.time()
        sub = client.submit(specs, user="scale")
        snap_batch[0], t_sub[0] = sub.batch_id, time.time()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if not wait:
            return {"client": client, "batch": sub.batch_id, "t0": t0, "stop": stop, "peak": peak, "r": r}
        client.wait(sub.batch_id, timeout=3600, poll_s=0.2)
        wall = time.time() - t0
        results = client.results(sub.batch_id)
    stop.set()
    sampler.join(2)
    after_mem = int(r.info("memory")["used_memory"])
    cpu = {name: cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
    cmds = {k: v - cmds0.get(k, 0) for k, v in command_counts(r).items()}
    cmds = {k: v / n for k, v in sorted(cmds.items(), key=lambda kv: -kv[1]) if v}
    ideal = ideal_s(profile) if model_s is None else ideal_s(profile)
    admit = [x["phases"]["admitted"] - x["phases"]["queued"] for x in results if "admitted" in x["phases"]]
    overhead = [
        x["phases"]["finished"] - x["phases"]["submitted"] - ideal for x in results if "finished" in x["phases"]
    ]
    states = {s: sum(1 for x in results if x["state"] == s) for s in {x["state"] for x in results}}
    steps = [int(r.hget(f"{settings.key_prefix}:ep:{x['episode_id']}", "step") or 0) for x in results[:200]]
    r.close()
    return {
        "n": n,
        "wall_s": wall,
        "states": states,
        "admission_p50_s": statistics.median(admit) if admit else None,
        "admission_p99_s": pct(admit, 0.99),
        "overhead_p50_s": statistics.median(overhead) if overhead else None,
        "cpu_ms_per_episode": {k: v * 1000 / n for k, v in cpu.items()},
        "cpu_ms_per_episode_total": sum(cpu.values()) * 1000 / n,
        "redis_bytes_per_episode_peak": (peak["mem"] - base_mem) / n,
        "redis_bytes_per_episode_after": (after_mem - base_mem) / n,
        "rss_peak_mb": peak["rss"] / 2**20,
        # Celery tasks an episode took: messages pushed onto the broker's queue lists (LPUSH, in the advance
        # script or by a sender), counted by Redis itself; the step count over-counts (an evaluation advances twice)
        "tasks_per_episode": cmds.get("lpush") or (statistics.mean(steps) if steps else None),
        "steps_per_episode": statistics.mean(steps) if steps else None,
        "redis_commands_per_episode": cmds,
        "redis_memory_mid_run": {
            k: (int(snap["info"][k]) - int(base_info[k])) / n
            for k in MEMORY_FIELDS
            if "info" in snap and k in snap["info"] and k in base_info
        },
        "redis_clients_mid_run": snap.get("clients"),
        "redis_keys_mid_run": {
            k: {"keys": c, "bytes_per_episode": b / n} for k, (c, b) in snap.get("keys", {}).items()
        },
        "episode_hash_fields_mid_run": snap.get("fields", {}),
    }


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# --- the dispatch limit: raw Celery no-op throughput -------------------------------------------------
def raw_app(url: str, events: bool):
    from celery import Celery

    app = Celery("raw", broker=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=events,
        task_send_sent_event=False,
        broker_transport_options={"global_keyprefix": "raw:"},
    )

    @app.task(name="raw.noop")
    def noop(i: int) -> None:
        app.backend  # noqa: B018  (touch nothing else: a no-op)

    return app


def dispatch_limit(url: str, tmp: Path, events: bool, redis_pid: int, tasks: int = 4000) -> dict[str, float]:
    """Raw Celery no-op tasks per second through one threads worker on the same Redis, and the CPU
    each costs (publish, worker, Redis): the floor under any Celery fleet's cost per task.

    The tasks are queued first; the clock and the CPU counters start when the worker has taken the
    first of them (its start-up is not counted) and stop when the queue is empty.
    """
    import redis as redis_mod

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    app = raw_app(url, events)
    c0 = time.process_time()
    for i in range(tasks):
        app.send_task("raw.noop", args=[i])
    publish_s = time.process_time() - c0
    r = redis_mod.Redis.from_url(url)
    log = open(tmp / "raw-worker.log", "wb")
    w = subprocess.Popen(
        [sys.executable, __file__, "--raw-worker", url, *(["--events"] if events else [])],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while (left := int(r.llen("raw:celery"))) >= tasks:
            time.sleep(0.005)
        t0, worker0, redis0 = time.monotonic(), cpu_s(w.pid), cpu_s(redis_pid)
        while r.llen("raw:celery") > 0:
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        worker_s, redis_s = cpu_s(w.pid) - worker0, cpu_s(redis_pid) - redis0
    finally:
        os.killpg(w.pid, signal.SIGTERM)
        w.wait(30)
        log.close()
        app.close()
    per = 1000 / left  # ms per task, over the tasks consumed while measured
    return {
        "tasks_per_s": left / elapsed,
        "cpu_ms_per_task": publish_s * 1000 / tasks + (worker_s + redis_s) * per,
        "publish_ms": publish_s * 1000 / tasks,
        "worker_ms": worker_s * per,
        "redis_ms": redis_s * per,
    }


# --- report ----------------------------------------------------------------------------------------
def write_report(out: Path, rows: list[dict], raw: dict[str, float], profile: str) -> None:
    from megaflow.report_svg import bar_chart, step_chart

    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(
        json.dumps(
            {"profile": profile, "dispatch_limit_tasks_per_s": raw["tasks_per_s"], "raw_celery": raw, "rows": rows},
            indent=1,
        )
    )
    t1 = rows[0]["wall_s"]
    curve = step_chart(
        [("T(N)/T(1)", [(math.log10(r["n"]), r["wall_s"] / t1) for r in rows])],
        y_label="T(N)/T(1)",
        title="T(N)/T(1) against log10 N",
        x_label="log10 N",
    )
    last = rows[-1]
    split = bar_chart(
        [(k, v, f"{v:.1f}") for k, v in last["cpu_ms_per_episode"].items()],
        title=f"CPU ms per episode by service at N={last['n']}",
        x_label="ms",
    )
    (out / "scale.html").write_text(
        f"<html><body><h1>MegaFlow scale ({profile} s episodes)</h1>{curve}{split}</body></html>"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="12")
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 10, 100, 1000, 3000, 10000])
    ap.add_argument("--env-hosts", type=int, default=2)
    ap.add_argument("--events", action="store_true", help="workers send Celery task events (Flower)")
    ap.add_argument("--breakdown", action="store_true", help="also print Redis bytes by key pattern mid-run")
    ap.add_argument("--in-flight", type=int, help="instead: admit this many episodes waiting on long model calls")
    ap.add_argument(
        "--arrival-batch",
        type=int,
        default=0,
        help="with --in-flight: submit batches of this many back to back (default: one batch of all)",
    )
    ap.add_argument(
        "--model-workers",
        type=int,
        help="model worker processes (default: one per 8,000 calls in flight, at least 2; <= ~30k threads each)",
    )
    ap.add_argument(
        "--agent-inline",
        choices=["on", "off"],
        default="on",
        help="MEGAFLOW_AGENT_INLINE for the fleet: on (decisions in the model/env step) or off (agent-service tasks)",
    )
    ap.add_argument(
        "--env-threads",
        type=int,
        default=4096,
        help="most threads per env worker (MEGAFLOW_ENV_CONCURRENCY; default 4096, 512 with --in-flight)",
    )
    ap.add_argument("--out", default="bench-out/scale")
    ap.add_argument("--raw-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.raw_worker:
        raw_app(a.raw_worker, a.events).worker_main(
            [
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                "8",
                "--loglevel",
                "WARNING",
                *(["--task-events"] if a.events else []),
                "--without-gossip",
                "--without-mingle",
            ]
        )
        return
    tmp = Path(tempfile.mkdtemp(prefix="mf-scale-"))
    redis_proc, url = start_redis(tmp)
    n_max = a.in_flight or max(a.ns)
    settings = fleet_settings(
        url,
        tmp,
        n_max,
        a.profile,
        a.env_hosts,
        events=a.events,
        env_threads=min(512, a.env_threads) if a.in_flight else a.env_threads,
        agent_inline=a.agent_inline == "on",
    )
    print(f"agent decisions: {'inline in the model/env steps' if settings.agent_inline else 'agent-service tasks'}")
    fleet = Fleet(settings, tmp)
    try:
        raw = dispatch_limit(url, tmp, a.events, redis_proc.pid)
        limit = raw["tasks_per_s"]
        print(
            f"dispatch limit: raw Celery no-op throughput {limit:.0f} tasks/s (threads worker, same Redis); "
            f"CPU per no-op task {raw['cpu_ms_per_task']:.2f} ms (publish {raw['publish_ms']:.2f}, "
            f"worker {raw['worker_ms']:.2f}, Redis {raw['redis_ms']:.2f})"
        )
        fleet.start("control", ["control"])
        model_workers = a.model_workers or max(
            2, math.ceil(n_max / 8000)
        )  # one per core at least: a process is one GIL
        for m in range(1, model_workers + 1):  # each thread waits in one model call; threads share Redis connections
            threads = str(math.ceil(n_max / model_workers))
            fleet.start(f"model-{m}", ["worker", "model", "--host", f"scale-m{m}", "--concurrency", threads])
        fleet.start("agent", ["worker", "agent"])
        for h in range(1, a.env_hosts + 1):
            fleet.start(f"env-{h}", ["worker", "env", "--host", f"env-{h}"])
        wait_workers(settings, fleet, 1 + model_workers + a.env_hosts)
        if a.in_flight:
            try:
                in_flight(settings, fleet, redis_proc.pid, a.in_flight, a.profile, a.arrival_batch)
            finally:
                fleet.close(cold=True)
            return
        rows = []
        for n in a.ns:
            row = run_batch(settings, fleet, redis_proc.pid, n, a.profile, breakdown=a.breakdown)
            rows.append(row)
            t1 = rows[0]["wall_s"]
            lim_s = n * (row["tasks_per_episode"] or 0) / limit
            print(
                f"N={n:>6}: T={row['wall_s']:8.1f}s T(N)/T(1)={row['wall_s'] / t1:5.2f} "
                f"admission p50/p99={row['admission_p50_s']:.2f}/{row['admission_p99_s']:.2f}s "
                f"overhead p50={row['overhead_p50_s']:.2f}s CPU/ep={row['cpu_ms_per_episode_total']:.1f}ms "
                f"Redis/ep peak={row['redis_bytes_per_episode_peak'] / 1024:.1f}KB "
                f"after={row['redis_bytes_per_episode_after'] / 1024:.1f}KB RSS={row['rss_peak_mb']:.0f}MB "
                f"tasks/ep={row['tasks_per_episode']:.1f} dispatch-limit time={lim_s:.1f}s "
                f"T/limit={row['wall_s'] / lim_s if lim_s else float('nan'):.2f} states={row['states']}"
            )
            floor = (row["tasks_per_episode"] or 0) * raw["cpu_ms_per_task"]
            row["celery_floor_cpu_ms_per_episode"] = floor
            print(
                "        CPU ms/episode by process: "
                + ", ".join(f"{k}={v:.1f}" for k, v in row["cpu_ms_per_episode"].items())
                + f"; Celery's own floor ({row['tasks_per_episode']:.1f} no-op tasks) {floor:.1f} ms, "
                f"CPU/ep / floor = {row['cpu_ms_per_episode_total'] / floor if floor else float('nan'):.2f}"
            )
            cmds = row["redis_commands_per_episode"]
            print(
                f"        Redis commands/episode: {sum(cmds.values()):.0f} ("
                + ", ".join(f"{k}={v:.1f}" for k, v in list(cmds.items())[:10])
                + ")"
            )
            if row["redis_memory_mid_run"]:
                print(
                    "        Redis INFO memory mid-run, bytes/episode: "
                    + ", ".join(f"{k}={v:.0f}" for k, v in row["redis_memory_mid_run"].items())
                    + f" (connected clients: {row['redis_clients_mid_run']})"
                )
            if row["redis_keys_mid_run"]:
                print(
                    "        Redis bytes/episode mid-run by key: "
                    + ", ".join(
                        f"{k} ({int(v['keys'])} keys)={v['bytes_per_episode']:.0f}"
                        for k, v in list(row["redis_keys_mid_run"].items())[:12]
                    )
                )
            if row["episode_hash_fields_mid_run"]:
                fields = row["episode_hash_fields_mid_run"]
                print(
                    f"        episode hash mid-run, bytes of its {len(fields)} fields (name + value, mean): "
                    + ", ".join(f"{k}={v:.0f}" for k, v in list(fields.items())[:16])
                    + f"; all {sum(fields.values()):.0f}"
                )
        write_report(Path(a.out), rows, raw, a.profile)
        print(f"wrote {a.out}/scale.json and scale.html (logs in {tmp})")
    finally:
        fleet.close()
        redis_proc.terminate()
        redis_proc.wait(10)


def in_flight(settings: Settings, fleet: Fleet, redis_pid: int, n: int, profile: str, chunk: int = 0) -> None:
    """Admit ``n`` episodes whose model calls take long; print admission lag and RSS while they wait.

    Admission lag is ``t:admitted - t:queued`` of each episode; "from the submit call" is
    ``t:admitted - t:submitted`` (when the submit that carried it began). With ``chunk`` 0 the ``n``
    episodes are one batch: the submit writes and admits it 250 at a time (``client.SUBMIT_PART``), so
    each part is queued when written and the last parts wait for the whole submit from the call. With
    ``chunk`` K they arrive as batches of K submitted back to back (each submit returns once its batch
    is admitted), so the lag is what an arriving batch sees while the fleet already holds up to ``n``.
    "Waiting" counts episodes whose model call is running: handed to the model service (``next``) and
    the model queue empty (every message taken by a model worker thread).
    """
    import redis as redis_mod

    from megaflow.client import Client
    from megaflow.core import wire

    pids = {name: p.pid for name, p in fleet.procs.items()} | {"redis": redis_pid}
    r = redis_mod.Redis.from_url(settings.redis_url, decode_responses=True)
    wait_hosts(settings, fleet)
    rss0 = sum(rss_bytes(p) for p in pids.values())
    mem0 = int(r.info("memory")["used_memory"])
    specs = [episode_spec(i, profile, 600.0) for i in range(n)]
    size = chunk or n
    client = Client(settings)
    t0 = time.time()
    batches, submit_s = [], []
    for lo in range(0, n, size):
        t = time.time()
        batches.append(client.submit(specs[lo : lo + size], user="scale").batch_id)
        submit_s.append(time.time() - t)
    t_submit = time.time() - t0
    print(
        f"submitted {n} episodes in {len(batches)} batch(es) in {t_submit:.1f}s (each: validate, write, enqueue, "
        f"admit; longest {max(submit_s):.1f}s)"
    )
    model_queue = wire.broker_queue_key(settings.key_prefix, wire.MODEL_QUEUE)
    keys = [client.rt.keys.episode(e) for b in batches for e in client.rt.engine.batch_ids(b)]
    deadline = time.time() + 600
    rows: list = []
    t_admitted = t_waiting = None
    while time.time() < deadline:
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, "t:queued", "t:admitted", "next", "t:submitted")
        rows = pipe.execute()
        admitted = sum(1 for x in rows if x[1])
        waiting = sum(1 for x in rows if x[2] and "model" in x[2])
        backlog = r.llen(model_queue)  # sent to the model service, not yet taken by a worker thread
        now = time.time() - t0
        if t_admitted is None and admitted >= n:
            t_admitted = now
        if waiting >= n and backlog == 0:
            t_waiting = now
            break
        print(f"  {now:6.1f}s admitted {admitted}, sent to the model {waiting}, model queue {backlog}", flush=True)
        time.sleep(2)
    lag = [float(x[1]) - float(x[0]) for x in rows if x[1]]
    from_call = [float(x[1]) - float(x[3]) for x in rows if x[1]]  # from the submit call that carried it
    last = [float(x[1]) - float(x[0]) for x in rows[-size:] if x[1]]
    waiting = sum(1 for x in rows if x[2] and "model" in x[2])
    time.sleep(5)  # let the model workers take the last messages
    rss = {name: rss_bytes(pid) for name, pid in pids.items()}
    threads = {name: sum(_threads(p) for p in [pid, *descendants(pid)]) for name, pid in pids.items()}
    mem = int(r.info("memory")["used_memory"])
    clients = int(r.info("clients")["connected_clients"])
    print(
        f"in flight: {len(lag)}/{n} admitted at {t_admitted or float('nan'):.1f}s, {waiting}/{n} waiting in "
        f"model calls (model queue empty) at {t_waiting or float('nan'):.1f}s; "
        f"admission p50 {statistics.median(lag):.3f}s p99 {pct(lag, 0.99):.3f}s max {max(lag):.3f}s (goal p99 < 1 s; "
        f"from the submit call: p50 {statistics.median(from_call):.3f}s p99 {pct(from_call, 0.99):.3f}s)"
        + (f", last batch p99 {pct(last, 0.99):.3f}s" if chunk else "")
        + f"; total RSS {sum(rss.values()) / 2**30:.2f} GB (before the batch {rss0 / 2**30:.2f} GB; goal < 4 GB); "
        f"Redis {(mem - mem0) / n / 1024:.1f} KB/episode, {clients} clients"
    )
    print("  RSS MB by process: " + ", ".join(f"{k}={v / 2**20:.0f}" for k, v in rss.items()))
    print("  threads by process: " + ", ".join(f"{k}={v}" for k, v in threads.items()))
    client.close()  # the fleet and its Redis go next: their model calls are not cancelled one by one
    r.close()


def _threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    main()
