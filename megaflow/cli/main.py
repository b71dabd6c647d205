"""The ``megaflow`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from megaflow.core.errors import MegaflowError, SpecError
from megaflow.core.settings import Settings

app = typer.Typer(help="MegaFlow: agent-environment episodes on a Celery fleet.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console()


def _settings() -> Settings:
    return Settings.load()


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")


# --- services ------------------------------------------------------------------------------------
@app.command()
def worker(
    role: str = typer.Argument(..., help="model | agent | env"),
    host: Optional[str] = typer.Option(None, help="Env host name (default MEGAFLOW_HOST_NAME / hostname)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", help="Pool size (default per role)."),
    loglevel: str = typer.Option("INFO", help="Log level."),
) -> None:
    """Run one role's Celery worker in the foreground."""
    from megaflow.workers.process import ROLES, run_worker

    if role not in ROLES:
        raise typer.BadParameter(f"choose one of {', '.join(ROLES)}", param_hint="ROLE")
    _logging(loglevel)
    run_worker(role, _settings(), host=host, concurrency=concurrency, loglevel=loglevel)


@app.command()
def control(loglevel: str = typer.Option("INFO", help="Log level.")) -> None:
    """Run the control service (recorder + safety sweep) in the foreground."""
    import signal

    from megaflow.control import Control
    from megaflow.services.root import Root

    _logging(loglevel)
    ctl = Control(Root(_settings(), role="control"))
    signal.signal(signal.SIGTERM, lambda *_: ctl.stop.set())
    try:
        ctl.run()
    except KeyboardInterrupt:
        ctl.stop.set()


@app.command()
def up(env_hosts: int = typer.Option(2, help="Env workers (distinct env hosts) to start.")) -> None:
    """Start a local fleet: control service, model, agent and env workers."""
    from megaflow import fleet

    procs = fleet.up(_settings(), env_hosts=env_hosts, echo=console.print)
    console.print(f"fleet up: {', '.join(f'{n} (pid {p})' for n, p in sorted(procs.items()))}")


@app.command()
def down() -> None:
    """Stop the local fleet."""
    from megaflow import fleet

    stopped = fleet.down(_settings(), echo=console.print)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def demo(
    keep_fleet: bool = typer.Option(False, help="Leave the fleet running afterwards."),
    env_hosts: int = typer.Option(2, help="Env hosts of the local fleet."),
    env: str = typer.Option("docker", help="Env backend: docker (real containers) or sim (simulated, no Docker)."),
) -> None:
    """Build the image if needed, start the fleet, run the demo tasks and print a summary."""
    from megaflow.demo import run_demo

    settings = _settings()
    if env == "sim":
        settings = settings.model_copy(update={"env_backend": {"type": "sim", "preset": "demo"}})
    elif env != "docker":
        raise SpecError(f"--env: unknown env backend {env!r}; choose docker or sim")
    ok = run_demo(settings, console=console, env_hosts=env_hosts, keep_fleet=keep_fleet)
    raise typer.Exit(0 if ok else 1)


# --- work ------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """Specs from a JSONL file; a bad line raises SpecError naming the line."""
    if not path.exists():
        raise SpecError(f"{path}: no such file")
    specs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            specs.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return specs


@app.command()
def submit(
    file: Path = typer.Argument(..., help="JSONL file: task specs or SWE-bench instances, one a line."),
    user: str = typer.Option(..., "--user", "-u", help="User the batch runs as (quotas are per user)."),
    wait: bool = typer.Option(False, help="Wait for the batch and print its results."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: give up after this many seconds."),
    agent_config: Optional[Path] = typer.Option(None, help="mini-swe-agent YAML config for instance lines."),
    model: Optional[str] = typer.Option(None, help="JSON model section for instance lines."),
) -> None:
    """Submit a batch; nothing is enqueued if any line is invalid."""
    from megaflow.client import Client
    from megaflow.datasets import to_specs

    specs = to_specs(read_jsonl(file), agent_config=agent_config, model=json.loads(model) if model else None)
    with Client(_settings()) as client:
        try:
            sub = client.submit(specs, user=user)
        except SpecError as exc:
            if exc.index is not None:  # name the file line, not the list index
                lines = [n for n, line in enumerate(file.read_text().splitlines(), 1) if line.strip()]
                raise SpecError(f"{file}:{lines[exc.index]}: {str(exc).split(': ', 1)[1]}") from None
            raise
        console.print(f"batch {sub.batch_id}: {len(sub.episode_ids)} episodes submitted for {user}")
        if wait:
            client.wait(sub.batch_id, timeout=timeout)
            _print_results(client.results(sub.batch_id))


def _print_results(results: list[dict]) -> None:
    table = Table()
    for col in ("episode", "task", "state", "reward", "cause", "host", "steps"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(r["episode_id"], r["task_id"] or "", r["state"],
                      "" if r.get("reward") is None else f"{r['reward']:g}", r.get("cause") or "",
                      r.get("host") or "", str(r.get("steps") or ""))
    console.print(table)


@app.command()
def status(
    batch: Optional[str] = typer.Argument(None, help="Batch id; omit for every recent batch."),
    user: Optional[str] = typer.Option(None, help="Only this user's batches."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Records from the metadata store: counts by state, throughput and failure causes."""
    from megaflow.status import batch_status, overview

    settings = _settings()
    data = batch_status(settings, batch) if batch else overview(settings, user=user)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    from megaflow.status import render

    render(console, data)


@app.command()
def cancel(batch: str = typer.Argument(..., help="Batch id.")) -> None:
    """Cancel every unfinished episode of a batch."""
    from megaflow.client import Client

    with Client(_settings()) as client:
        n = client.cancel(batch)
    console.print(f"batch {batch}: cancelling {n} unfinished episodes")


@app.command()
def rollout(
    file: Path = typer.Argument(..., help="JSONL file: SWE-bench instances or task specs, one a line."),
    replicas: int = typer.Option(1, "--replicas", "-k", min=1, help="Episodes per task (one group)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL: one line per finished group."),
    user: str = typer.Option("rollout", "--user", "-u", help="User the episodes run as."),
    policy_version: Optional[str] = typer.Option(None, help="Policy version tag recorded with every call."),
    agent_config: Optional[Path] = typer.Option(None, help="mini-swe-agent YAML config for instance lines."),
    model: Optional[str] = typer.Option(None, help="JSON model section for instance lines."),
    max_retries: int = typer.Option(2, min=0, help="Resubmissions of an infra-failed episode."),
    timeout: Optional[float] = typer.Option(None, help="Give up after this many seconds."),
) -> None:
    """Run every task K times; write each group (rewards, trajectories, tokens) as soon as it is done."""
    from megaflow.client import Client
    from megaflow.datasets import read_records, to_specs

    model_section = json.loads(model) if model else None
    records = [r for _, r in read_records(file)]
    tasks = to_specs(records, agent_config=agent_config, model=model_section, policy_version=policy_version)
    n = masked = 0
    with Client(_settings()) as client, out.open("w") as fh:
        for group in client.rollout(tasks, replicas=replicas, policy_version=policy_version, user=user,
                                    max_infra_retries=max_retries, timeout=timeout):
            fh.write(json.dumps(group) + "\n")
            fh.flush()
            n += 1
            masked += group["masked"]
            console.print(f"group {group['index']} {group['task_id']}: rewards {group['rewards']}"
                          + (" [yellow]masked[/yellow]" if group["masked"] else ""))
    console.print(f"{n} groups written to {out} ({masked} masked)")


@app.command()
def resume(
    batch: str = typer.Argument(..., help="Batch id."),
    wait: bool = typer.Option(False, help="Wait for the re-run and print the batch's final results."),
) -> None:
    """Re-run a batch's infra failures; episodes that finished are skipped."""
    from megaflow.client import Client

    with Client(_settings()) as client:
        res = client.resume(batch)
        console.print(f"batch {batch}: {len(res.resubmitted)} infra failures re-run"
                      + (f" as batch {res.rerun_batch}" if res.rerun_batch else "")
                      + f"; {res.skipped_finished} finished (skipped), {res.still_running} still running"
                      + (f", {res.missing} expired" if res.missing else ""))
        if wait and res.rerun_batch:
            client.wait(res.rerun_batch)
        if wait:
            _print_results(client.final_results(batch))


@app.command()
def report(
    batch: str = typer.Argument(..., help="Batch id."),
    out: Path = typer.Option(Path("report"), "--out", help="Output directory."),
) -> None:
    """Write an HTML report with plots for a batch, built from the metadata store."""
    from megaflow.report import build_report
    from megaflow.stores import open_metadata_store

    settings = _settings()
    store = open_metadata_store(settings.metadata_url, settings)
    try:
        path = build_report(store, batch, out, host_capacity=settings.host_capacity)
    finally:
        store.close()
    console.print(f"report written to {path}")


# --- monitoring ------------------------------------------------------------------------------------
@app.command()
def flower(
    port: Optional[int] = typer.Option(None, help="Port (default MEGAFLOW_FLOWER_PORT)."),
    address: Optional[str] = typer.Option(None, help="Listen address (default MEGAFLOW_FLOWER_ADDRESS)."),
    loglevel: str = typer.Option("INFO", help="Log level."),
) -> None:
    """Run Flower for the fleet (basic auth from settings, state kept in STATE_DIR/flower.db)."""
    from megaflow.monitoring.flower import run_flower

    _logging(loglevel)
    run_flower(_settings(), port=port, address=address)


@app.command()
def metrics(
    port: Optional[int] = typer.Option(None, help="Port (default MEGAFLOW_METRICS_PORT)."),
    address: Optional[str] = typer.Option(None, help="Listen address (default MEGAFLOW_METRICS_ADDRESS)."),
    once: bool = typer.Option(False, "--once", help="Print the metrics once and exit instead of serving."),
    loglevel: str = typer.Option("INFO", help="Log level."),
) -> None:
    """Serve Prometheus metrics of MegaFlow's state (queues, admission, slots, warm pools, episodes)."""
    import signal
    import threading

    import redis as redis_mod

    from megaflow.core.errors import ConfigError
    from megaflow.core.keys import Keys
    from megaflow.monitoring.metrics import collect, serve_metrics

    settings = _settings()
    if once:
        client = redis_mod.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            typer.echo(collect(client, settings, Keys(settings.key_prefix)), nl=False)
        finally:
            client.close()
        return
    _logging(loglevel)
    try:
        server = serve_metrics(settings, port=port, address=address)
    except OSError as exc:
        raise ConfigError(f"cannot listen for metrics on port {settings.metrics_port if port is None else port}: "
                          f"{exc.strerror or exc}; `megaflow up` already serves them from the control service, "
                          "or pick another with --port / MEGAFLOW_METRICS_PORT") from None
    console.print(f"metrics on http://{server.server_address[0]}:{server.port}/metrics")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def _mount() -> None:
    from megaflow.cli.env import app as images_app
    from megaflow.cli.model import app as model_app
    from megaflow.cli.resources import app as resources_app

    for command in resources_app.registered_commands:
        app.registered_commands.append(command)
    for group in resources_app.registered_groups:
        app.registered_groups.append(group)
    app.add_typer(images_app, name="images")
    app.add_typer(model_app, name="model")


_mount()


def main() -> None:
    try:
        app()
    except MegaflowError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
