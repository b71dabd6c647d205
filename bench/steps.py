"""Per-step cost of a long episode: does step 200 cost more than step 1? (issue 16, "histories that grow").

One episode of ``--steps`` model calls, each followed by one command, runs in this process
(``LocalRunner``: the real engine, resource manager, agent, model and env services over a real
loopback redis-server, without Celery's workers) on the ``sim`` env backend with no simulated
latency and the scripted model with none either, so what is measured is MegaFlow's own work per
step. Every task's wall time and CPU time is recorded and grouped by the step it belongs to (model
call N and the agent, exec tasks that follow it).

Prints, for the first and the last ``--window`` steps: median wall ms and CPU ms per step (all the
tasks of a step: agent, model, exec), the history's size in Redis, and the ratio last / first
(1.0 means a step costs the same whatever the history's length).

    .venv/bin/python bench/steps.py --steps 200
    .venv/bin/python bench/steps.py --steps 200 --agent-inline   # decisions inside the model/exec steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import start_redis  # one loopback redis-server helper for every bench

from megaflow.core import wire
from megaflow.core.settings import Settings
from megaflow.core.spec import validate_specs
from megaflow.services.local import LocalRunner
from megaflow.services.root import Root

HOST = "steps-1"


def spec(steps: int) -> dict:
    replies = [f"step {i}\n```bash\necho line {i} >> /work/log.txt && wc -l /work/log.txt\n```" for i in range(steps)]
    return {
        "task_id": "long",
        "model": {"backend": "scripted", "replies": [*replies, "MEGAFLOW_SUBMIT"], "latency_s": 0},
        "agent": {"max_steps": steps + 1},
        "eval": {"command": "true"},
    }


def history_bytes(root: Root, episode_id: str) -> int:
    """Redis memory of the episode's keys (its hash, history and whatever else names it)."""
    total = 0
    for key in root.redis.scan_iter(match=f"{root.settings.key_prefix}:*{episode_id}*", count=1000):
        total += int(root.redis.memory_usage(key) or 0)
    return total


def run(steps: int, window: int, agent_inline: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mf-steps-"))
    proc, url = start_redis(tmp)
    try:
        s = Settings.load(
            redis_url=url,
            state_dir=str(tmp / "state"),
            env_backend={"type": "sim"},
            max_steps=steps + 1,
            metrics_port=0,
            task_events=False,
            agent_inline=agent_inline,
        )
        root = Root(s, role="client")
        env_root = Root(s, role="env", host=HOST)
        runner = LocalRunner(root, {HOST: env_root})
        runner.register_hosts()
        (valid,) = validate_specs([spec(steps)])
        batch, (eid,) = root.engine.create_batch([valid], "bench")
        root.resources.enqueue([{"episode_id": eid, "user": "bench", "image": s.default_image}])
        root.lifecycle.admit()

        per_step: dict[int, list[float]] = {}  # step (model call N and the tasks after it) -> [wall s, cpu s]
        sizes: dict[int, int] = {}
        step = 1
        calls = 0
        orig = runner._dispatch

        def timed(name, args, queue):
            nonlocal step, calls
            if name == wire.MODEL_COMPLETE:
                calls += 1
                step = calls
                if step in (window, steps):
                    sizes[step] = history_bytes(root, eid)
            w0, c0 = time.perf_counter(), time.process_time()
            orig(name, args, queue)
            acc = per_step.setdefault(step, [0.0, 0.0])
            acc[0] += time.perf_counter() - w0
            acc[1] += time.process_time() - c0

        runner._dispatch = timed  # type: ignore[method-assign]
        started = time.perf_counter()
        (result,) = runner.run_until_done(batch, timeout_s=600)
        handled = dict(runner.handled)
        elapsed = time.perf_counter() - started
        env_root.env_host.shutdown()
        root.close()
        env_root.close()
    finally:
        proc.terminate()
        proc.wait(10)

    def med(lo: int, hi: int, i: int) -> float:
        return statistics.median(per_step[k][i] for k in range(lo, hi + 1) if k in per_step) * 1000

    first = (med(1, window, 0), med(1, window, 1))
    last = (med(steps - window + 1, steps, 0), med(steps - window + 1, steps, 1))
    return {
        "steps": steps,
        "state": result["state"],
        "elapsed_s": round(elapsed, 2),
        "first": {"wall_ms": round(first[0], 3), "cpu_ms": round(first[1], 3), "redis_bytes": sizes.get(window)},
        "last": {"wall_ms": round(last[0], 3), "cpu_ms": round(last[1], 3), "redis_bytes": sizes.get(steps)},
        "ratio_wall": round(last[0] / first[0], 3),
        "ratio_cpu": round(last[1] / first[1], 3),
        "tasks": handled,
        "model_calls": calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=20, help="Steps averaged at each end.")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    ap.add_argument(
        "--agent-inline", action="store_true", help="decisions inside the model/exec steps (MEGAFLOW_AGENT_INLINE)"
    )
    a = ap.parse_args()
    if a.steps < 2 * a.window:
        ap.error("--steps must be at least twice --window")
    out = run(a.steps, a.window, a.agent_inline)
    if out["state"] != "SUCCEEDED":
        sys.exit(f"the episode ended {out['state']}, not SUCCEEDED: nothing to compare")
    first, last = out["first"], out["last"]
    print(f"one episode of {out['steps']} steps (model call + command each), sim env, in-process: {out['elapsed_s']} s")
    print(f"{'':12} {'wall ms/step':>13} {'CPU ms/step':>12} {'Redis bytes':>12}")
    for label, row in ((f"steps 1-{a.window}", first), (f"last {a.window}", last)):
        print(f"{label:12} {row['wall_ms']:13.2f} {row['cpu_ms']:12.2f} {row['redis_bytes'] or 0:12,}")
    print(f"tasks: {out['tasks']} ({out['model_calls']} model calls)")
    print(f"ratio last/first: wall {out['ratio_wall']:.2f}x, CPU {out['ratio_cpu']:.2f}x (1.0 = flat)")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
