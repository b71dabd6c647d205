"""``megaflow demo``: build the image, start the fleet, run the demo tasks twice, summarise.

Run 1 replays the reference fix of every built-in task (all must succeed); run 2 replays a
no-op agent (all must fail). Exit status 0 only when both came out that way.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from megaflow import fleet
from megaflow.client import Client
from megaflow.core.settings import Settings
from megaflow.demo_tasks import demo_specs

PHASES = [
    ("queue wait", "queued", "admitted"),
    ("env start", "admitted", "env_ready"),
    ("agent loop", "env_ready", "evaluating"),
    ("evaluation", "evaluating", "finished"),
    ("total", "submitted", "finished"),
]


def phase_stats(results: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """(p50, max) seconds per phase over the episodes that have both ends of the phase."""
    out = {}
    for label, start, end in PHASES:
        xs = [r["phases"][end] - r["phases"][start] for r in results if start in r["phases"] and end in r["phases"]]
        if xs:
            out[label] = (statistics.median(xs), max(xs))
    return out


class _NoProgress:
    """A progress display that shows nothing (library use)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoProgress:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, done: int, counts: dict[str, int] | None = None) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def run_demo(
    settings: Settings,
    *,
    console: Console | None = None,
    env_hosts: int = 2,
    timeout_s: float = 280.0,
    keep_fleet: bool = False,
    progress: Any = None,
) -> bool:
    console = console or Console()
    t0 = time.monotonic()
    fleet.check_services(settings)
    # containers grade like the SWE-bench harness; the sim backend answers the tests' exit status
    grading = "swebench" if fleet.uses_docker(settings) else "exit_code"
    if fleet.uses_docker(settings):
        import docker

        from megaflow.env_hosts.images import ensure_sandbox_image

        d = docker.from_env(timeout=300)
        ensure_sandbox_image(d, settings.default_image, progress=lambda m: console.print(f"[dim]{m}[/dim]"))
        d.close()
    else:
        console.print(f"[dim]env backend {settings.env_backend.get('type')}: no containers, no Docker engine[/dim]")
    was_running = bool(fleet.running(settings))
    console.print("[bold]starting the fleet[/bold]" if not was_running else "[bold]using the running fleet[/bold]")
    fleet.up(settings, env_hosts=env_hosts, echo=lambda m: console.print(f"[dim]{m}[/dim]"))
    ok = False
    try:
        with Client(settings) as client:
            fix = client.submit(demo_specs("fix", grading=grading), user="demo")
            noop = client.submit(demo_specs("noop", grading=grading), user="demo-noop")
            console.print(
                f"submitted {len(fix.episode_ids)} reference-fix episodes (batch {fix}) and "
                f"{len(noop.episode_ids)} no-op episodes (batch {noop})"
            )
            started = time.monotonic()
            total = len(fix.episode_ids) + len(noop.episode_ids)
            deadline = time.monotonic() + timeout_s
            # the CLI passes megaflow.cli.progress.Progress: a bar on a terminal, a line per change when piped
            with (progress or _NoProgress)("demo (both runs)", total, stream=console.file) as bar:
                while True:
                    counts: dict[str, int] = {}
                    done = 0
                    for sub in (fix, noop):
                        st = client.status(sub.batch_id)
                        done += st["done"]
                        for state, n in st["counts"].items():
                            counts[state] = counts.get(state, 0) + n
                    bar.update(done, counts)
                    if done >= total:
                        break
                    if time.monotonic() > deadline:
                        bar.note(f"timed out after {timeout_s:.0f}s")
                        break
                    time.sleep(0.3)
            wall = time.monotonic() - started
            res_fix, res_noop = client.results(fix.batch_id), client.results(noop.batch_id)
        ok = _summary(console, res_fix, res_noop, wall)
        console.print(f"demo finished in {time.monotonic() - t0:.1f}s; see `megaflow status {fix}`")
    finally:
        if not keep_fleet and not was_running:
            fleet.down(settings, echo=lambda m: console.print(f"[dim]{m}[/dim]"))
    return ok


def _summary(console: Console, res_fix: list[dict], res_noop: list[dict], wall: float) -> bool:
    table = Table(title=f"MegaFlow demo ({wall:.1f}s wall for both runs)")
    for col in ("run", "episodes", "succeeded", "failed", "other", "expected"):
        table.add_column(col)
    ok = True
    for name, res, want in (("reference fix", res_fix, "SUCCEEDED"), ("no-op agent", res_noop, "FAILED")):
        s = sum(r["state"] == "SUCCEEDED" for r in res)
        f = sum(r["state"] == "FAILED" for r in res)
        good = all(r["state"] == want for r in res)
        ok &= good
        table.add_row(
            name,
            str(len(res)),
            str(s),
            str(f),
            str(len(res) - s - f),
            f"all {want}: " + ("[green]yes[/green]" if good else "[red]NO[/red]"),
        )
    console.print(table)
    lat = Table(title="per-phase latency (seconds)")
    for col in ("phase", "p50", "max"):
        lat.add_column(col)
    for label, (p50, mx) in phase_stats(res_fix + res_noop).items():
        lat.add_row(label, f"{p50:.3f}", f"{mx:.3f}")
    console.print(lat)
    bad = [r for r in res_fix if r["state"] != "SUCCEEDED"] + [r for r in res_noop if r["state"] != "FAILED"]
    for r in bad[:5]:
        console.print(f"[red]{r['task_id']}: {r['state']} cause={r['cause']} error={(r['error'] or '')[:300]}[/red]")
    return ok
