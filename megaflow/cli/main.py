"""The ``megaflow`` command line: the root app, service commands, and the entry point.

Sub-apps are mounted with Typer's public ``add_typer``: batch and operator commands at the top
level (``submit``, ``capacity``, ``quota set``...), ``images`` and ``model`` as groups. Errors
are never handled here; ``main()`` hands them to ``megaflow.cli.errors.run``.
"""

from __future__ import annotations

import enum
import logging
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from megaflow.cli.base import EXIT_EPISODES_FAILED, App, State, console, load_settings

app = App(
    help="MegaFlow: agent-environment episodes on a Celery fleet. Exit statuses: 0 ok, 2 bad input, "
    "3 episodes failed, 4 infrastructure failure, 5 service unreachable, 6 timed out (see the README)."
)


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", envvar="MEGAFLOW_DEBUG", help="Show the full traceback of an error (also MEGAFLOW_DEBUG=1)."
        ),
    ] = False,
) -> None:
    State.debug = State.debug or debug


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")


class Role(str, enum.Enum):
    """Worker roles."""

    model = "model"
    agent = "agent"
    env = "env"


class LogLevel(str, enum.Enum):
    """Log levels."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


LogLevelOption = Annotated[
    LogLevel,
    typer.Option("--loglevel", metavar="LEVEL", case_sensitive=False, help="Log level: DEBUG, INFO, WARNING or ERROR."),
]


def preflight(settings: Any, *, docker: bool) -> None:
    """Reach Redis (and the Docker engine when ``docker``) now, so a dead service is one line, not a retry loop."""
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        client.ping()
    finally:
        client.close()
    if docker and getattr(getattr(settings, "env", None), "type", "docker") == "docker":
        from megaflow.cli.env import docker_client

        docker_client(timeout=10).close()


# --- services ------------------------------------------------------------------------------------
@app.command()
def worker(
    role: Annotated[Role, typer.Argument(metavar="ROLE", help="Which worker to run.")],
    host: Annotated[
        str | None,
        typer.Option("--host", metavar="NAME", help="Env host name (default MEGAFLOW_HOST_NAME / hostname)."),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", "-c", metavar="N", min=1, help="Pool size (default per role).")
    ] = None,
    loglevel: LogLevelOption = LogLevel.INFO,
) -> None:
    """Run one role's Celery worker in the foreground."""
    from megaflow.core import guards
    from megaflow.env_hosts.config import uses_docker
    from megaflow.workers.process import run_worker

    settings = load_settings()
    if host is not None:
        try:
            host = guards.named(host, guards.SAFE_NAME, guards.NAME_RULE)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--host") from None
    preflight(settings, docker=role is Role.env and uses_docker(settings))
    _logging(loglevel.value)
    run_worker(role.value, settings, host=host, concurrency=concurrency, loglevel=loglevel.value)


def person_handler(client: Any) -> Any:
    """The control service's answer to per-person requests: the Client's, plus the records `megaflow status`
    shows (megaflow.status), limited to the person's own batches."""
    from megaflow.core.errors import NotFoundError
    from megaflow.status import batch_status, overview

    def handle(person: str, op: str, args: dict[str, Any]) -> Any:
        if op == "overview":
            return overview(client.settings, user=person)
        if op == "batch_status":
            bid = args.get("batch_id")
            if not isinstance(bid, str) or not client.owns(person, bid):
                raise NotFoundError(f"batch {bid!r}: none of {person}'s batches has that id")
            return batch_status(client.settings, bid)
        return client.serve_person(person, op, args)

    return handle


@app.command()
def control(loglevel: LogLevelOption = LogLevel.INFO) -> None:
    """Run the control service (recorder, safety sweep, per-person requests) in the foreground."""
    import signal

    from megaflow.client import Client
    from megaflow.control import Control
    from megaflow.services.root import Root

    settings = load_settings()
    _logging(loglevel.value)
    rt = Root(settings, role="control")
    ctl = Control(rt, person_handler=person_handler(Client.on_root(rt)))  # per-person users' requests
    signal.signal(signal.SIGTERM, lambda *_: ctl.stop.set())
    try:
        ctl.run()
    except KeyboardInterrupt:
        ctl.stop.set()


@app.command()
def up(
    env_hosts: Annotated[
        int,
        typer.Option(
            "--env-hosts",
            metavar="N",
            min=0,
            help="Env workers (distinct env hosts) to start (0: the autoscaler adds them).",
        ),
    ] = 2,
) -> None:
    """Start a local fleet: control service, model, agent and env workers."""
    from megaflow import fleet

    out = console()
    settings = load_settings()
    preflight(settings, docker=fleet.uses_docker(settings))
    procs = fleet.up(settings, env_hosts=env_hosts, echo=out.print)
    out.print(f"fleet up: {', '.join(f'{n} (pid {p})' for n, p in sorted(procs.items()))}")


@app.command()
def down() -> None:
    """Stop the local fleet."""
    from megaflow import fleet

    out = console()
    stopped = fleet.down(load_settings(), echo=out.print)
    out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


class EnvChoice(str, enum.Enum):
    """Env backends the demo can run on."""

    docker = "docker"
    sim = "sim"


@app.command()
def demo(
    keep_fleet: Annotated[bool, typer.Option("--keep-fleet", help="Leave the fleet running afterwards.")] = False,
    env_hosts: Annotated[
        int, typer.Option("--env-hosts", metavar="N", min=1, help="Env hosts of the local fleet.")
    ] = 2,
    env: Annotated[
        EnvChoice, typer.Option("--env", help="Env backend: docker (real containers) or sim (simulated, no Docker).")
    ] = EnvChoice.docker,
) -> None:
    """Build the image if needed, start the fleet, run the demo tasks and print a summary."""
    from megaflow.cli.progress import Progress
    from megaflow.demo import run_demo

    settings = load_settings()
    if env is EnvChoice.sim:
        settings = settings.model_copy(update={"env_backend": {"type": "sim", "preset": "demo"}})
    preflight(settings, docker=env is EnvChoice.docker)
    ok = run_demo(settings, console=console(), env_hosts=env_hosts, keep_fleet=keep_fleet, progress=Progress)
    raise typer.Exit(0 if ok else EXIT_EPISODES_FAILED)


# --- monitoring ------------------------------------------------------------------------------------
@app.command()
def flower(
    port: Annotated[
        int | None,
        typer.Option("--port", metavar="PORT", min=0, max=65535, help="Port (default MEGAFLOW_FLOWER_PORT)."),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", metavar="ADDRESS", help="Listen address (default MEGAFLOW_FLOWER_ADDRESS)."),
    ] = None,
    loglevel: LogLevelOption = LogLevel.INFO,
) -> None:
    """Run Flower for the fleet (basic auth from settings, state kept in STATE_DIR/flower.db)."""
    from megaflow.monitoring.flower import run_flower

    settings = load_settings()
    _logging(loglevel.value)
    run_flower(settings, port=port, address=address)


@app.command()
def metrics(
    port: Annotated[
        int | None,
        typer.Option("--port", metavar="PORT", min=0, max=65535, help="Port (default MEGAFLOW_METRICS_PORT)."),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", metavar="ADDRESS", help="Listen address (default MEGAFLOW_METRICS_ADDRESS)."),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Print the metrics once and exit instead of serving.")] = False,
    loglevel: LogLevelOption = LogLevel.INFO,
) -> None:
    """Serve Prometheus metrics of MegaFlow's state (queues, admission, slots, warm pools, episodes)."""
    import signal
    import threading

    import redis as redis_mod

    from megaflow.core.errors import ConfigError
    from megaflow.core.keys import Keys
    from megaflow.monitoring.metrics import collect, serve_metrics

    settings = load_settings()
    if once:
        client = redis_mod.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            typer.echo(collect(client, settings, Keys(settings.key_prefix)), nl=False)
        finally:
            client.close()
        return
    _logging(loglevel.value)
    try:
        server = serve_metrics(settings, port=port, address=address)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen for metrics on port {settings.metrics_port if port is None else port}: "
            f"{exc.strerror or exc}; `megaflow up` already serves them from the control service, "
            "or pick another with --port / MEGAFLOW_METRICS_PORT"
        ) from None
    bound = server.server_address[0]
    bound = bound.decode() if isinstance(bound, bytes) else str(bound)
    console().print(f"metrics on http://{bound}:{server.port}/metrics")
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
    from megaflow.cli.acl import app as acl_app
    from megaflow.cli.batch import app as batch_app
    from megaflow.cli.env import app as images_app
    from megaflow.cli.model import app as model_app
    from megaflow.cli.resources import app as resources_app
    from megaflow.cli.sandbox import app as sandbox_app
    from megaflow.cli.swebench import app as swebench_app

    app.add_typer(batch_app)  # no name: its commands join the top level
    app.add_typer(resources_app)
    app.add_typer(images_app, name="images")
    app.add_typer(model_app, name="model")
    app.add_typer(swebench_app, name="swebench")
    app.add_typer(acl_app, name="acl")
    app.add_typer(sandbox_app, name="sandbox")


_mount()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the app; every error becomes one line on stderr and a documented exit status."""
    from megaflow.cli.errors import run

    sys.exit(run(app, argv))
