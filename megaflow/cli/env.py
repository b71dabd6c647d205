"""``megaflow images ...``: build the sandbox image locally, prefetch images onto env hosts.

Mounted by the main CLI as the ``images`` group. Progress goes to stderr; stdout holds one
``HOST<TAB>IMAGE<TAB>STATUS`` line per image (or JSON with ``--json``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from megaflow.cli.base import EXIT_INFRA, JSON_HELP, App, echo_json, load_settings
from megaflow.core.errors import NotFoundError
from megaflow.env_hosts.images import prefetch

app = App(help="Sandbox images: build locally, prefetch onto env hosts.")

PREFETCH_TASK = "megaflow.env.prefetch"


def docker_client(timeout: float = 300):
    """A Docker SDK client that answered a ping, or ServiceUnavailableError naming DOCKER_HOST."""
    import docker

    from megaflow.core.errors import ServiceUnavailableError

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - any failure here means no usable engine
        raise ServiceUnavailableError(
            f"no Docker engine reachable (DOCKER_HOST or /var/run/docker.sock): {exc}; start dockerd or set DOCKER_HOST"
        ) from None


def _redis(settings):
    """A Redis client for the LRU record, or None when Redis is not reachable (the CLI still works)."""
    import redis

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5)
    try:
        client.ping()
        return client
    except redis.RedisError:
        return None


def _registered_hosts(settings) -> list[str]:
    """Env hosts registered in Redis (an unreachable Redis raises: remote hosts need it)."""
    import redis

    from megaflow.core.keys import Keys
    from megaflow.engine.resources.manager import ResourceManager

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5)
    try:
        return [h["name"] for h in ResourceManager(client, settings, Keys(settings.key_prefix)).hosts()]
    finally:
        client.close()


@app.command("build")
def build(
    tag: Annotated[
        str | None, typer.Option("--tag", metavar="TAG", help="Image tag (default: MEGAFLOW_DEFAULT_IMAGE).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the tag exists.")] = False,
) -> None:
    """Build the sandbox image (Debian minbase + python3, git, procps) with mmdebstrap and docker import."""
    from megaflow.cli.progress import Progress
    from megaflow.env_hosts.images import build_sandbox_image, ensure_sandbox_image

    settings = load_settings()
    tag = tag or settings.default_image
    client = docker_client()
    try:
        with Progress(f"build {tag}", 1) as bar:
            (build_sandbox_image if force else ensure_sandbox_image)(client, tag, progress=bar.note)
            bar.update(1, {})
    finally:
        client.close()
    typer.echo(tag)


@app.command("pip")
def pip_image(
    requirements: Annotated[
        list[str], typer.Argument(metavar="REQUIREMENT", help="Packages to install, e.g. mini-swe-agent==2.4.6.")
    ],
    tag: Annotated[str, typer.Option("--tag", metavar="TAG", help="Tag of the derived image.")],
    base: Annotated[
        str | None, typer.Option("--from", metavar="IMAGE", help="Base image (default: MEGAFLOW_DEFAULT_IMAGE).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the tag exists.")] = False,
) -> None:
    """Derive an image with Python packages installed (an installed agent's program; containers have no network)."""
    from megaflow.cli.progress import Progress
    from megaflow.env_hosts.images import build_pip_image, ensure_pip_image

    settings = load_settings()
    base = base or settings.default_image
    client = docker_client()
    try:
        with Progress(f"build {tag}", 1) as bar:
            (build_pip_image if force else ensure_pip_image)(client, base, tag, requirements, progress=bar.note)
            bar.update(1, {})
    finally:
        client.close()
    typer.echo(tag)


@app.command("prefetch")
def prefetch_cmd(
    images: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Images to make present.")],
    hosts: Annotated[
        str,
        typer.Option(
            "--hosts",
            metavar="HOST,...",
            help="Comma-separated registered env hosts (default: this host). Other hosts get "
            "a megaflow.env.prefetch task on their env.<host> queue.",
        ),
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Pre-provision env hosts with images so episodes do not wait for pulls (exit 4 if a pull fails)."""
    from megaflow.cli.progress import Progress

    if any(not image.strip() for image in images):
        raise typer.BadParameter("an image name is empty", param_hint="IMAGE")
    settings = load_settings()
    targets = list(dict.fromkeys(h.strip() for h in hosts.split(",") if h.strip())) or [settings.host_name]
    remote = [h for h in targets if h != settings.host_name]
    if remote:
        known = _registered_hosts(settings)
        unknown = [h for h in remote if h not in known]
        if unknown:
            raise NotFoundError(
                f"no env host named {', '.join(unknown)} is registered (registered: "
                f"{', '.join(known) or 'none'}); see `megaflow capacity`"
            )
    rows: list[dict[str, str]] = []

    def emit(host: str, image: str, status: str) -> None:
        rows.append({"host": host, "image": image, "status": status})
        if not as_json:
            typer.echo(f"{host}\t{image}\t{status}")

    sender = None
    with Progress("prefetch", len(targets) * len(images)) as bar:
        for host in targets:
            if host == settings.host_name:
                from megaflow.env_hosts.docker_host import DockerHost

                client = docker_client()
                try:
                    docker_host = DockerHost(client, settings, name=host, redis_client=_redis(settings))
                    for image in images:
                        for name, status in prefetch(docker_host, [image]).items():
                            emit(host, name, status)
                        bar.update(len(rows), _tally(rows))
                finally:
                    client.close()
            else:
                from megaflow.core.wire import env_host_queue
                from megaflow.workers.celery_app import create_app

                if sender is None:
                    sender = create_app(settings)
                result = sender.send_task(PREFETCH_TASK, args=[list(images)], queue=env_host_queue(host))
                rows.extend(
                    {"host": host, "image": image, "status": "queued", "task_id": result.id} for image in images
                )
                if not as_json:
                    typer.echo(f"{host}\tqueued\t{result.id}")
                bar.update(len(rows), _tally(rows))
    if as_json:
        echo_json(rows)
    if any(r["status"].startswith("error") for r in rows):
        raise typer.Exit(EXIT_INFRA)


def _tally(rows: list[dict[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        key = r["status"].split(" ", 1)[0].rstrip(":")
        out[key] = out.get(key, 0) + 1
    return out
