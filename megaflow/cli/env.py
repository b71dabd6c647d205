"""``megaflow images ...``: build the sandbox image locally, prefetch images onto env hosts.

Mount with ``main_app.add_typer(megaflow.cli.env.app, name="images")``.
"""

from __future__ import annotations

import typer

from megaflow.env_hosts.images import prefetch

app = typer.Typer(help="Sandbox images: build locally, prefetch onto env hosts.", no_args_is_help=True)

PREFETCH_TASK = "megaflow.env.prefetch"


def _docker():
    import docker

    from megaflow.core.errors import ServiceUnavailableError

    try:
        client = docker.from_env(timeout=300)
        client.ping()
        return client
    except Exception as exc:
        raise ServiceUnavailableError(f"no Docker engine reachable (DOCKER_HOST or /var/run/docker.sock): {exc}")


def _redis(settings):
    """A Redis client for the LRU record, or None when Redis is not reachable (the CLI still works)."""
    import redis

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5)
    try:
        client.ping()
        return client
    except redis.RedisError:
        return None


@app.command("build")
def build(tag: str = typer.Option(None, "--tag", help="Image tag (default: MEGAFLOW_DEFAULT_IMAGE)."),
          force: bool = typer.Option(False, "--force", help="Rebuild even if the tag exists.")) -> None:
    """Build the sandbox image (Debian minbase + python3, git, procps) with mmdebstrap and docker import."""
    from megaflow.env_hosts.images import build_sandbox_image, ensure_sandbox_image
    from megaflow.core.settings import Settings

    settings = Settings.load()
    tag = tag or settings.default_image
    client = _docker()
    try:
        (build_sandbox_image if force else ensure_sandbox_image)(client, tag, progress=typer.echo)
    finally:
        client.close()
    typer.echo(tag)


@app.command("prefetch")
def prefetch_cmd(images: list[str] = typer.Argument(..., help="Images to make present."),
                 hosts: str = typer.Option("", "--hosts",
                                           help="Comma-separated env hosts (default: this host). Other hosts "
                                           "get a megaflow.env.prefetch task on their env.<host> queue.")) -> None:
    """Pre-provision env hosts with images so episodes do not wait for pulls."""
    from megaflow.core.settings import Settings

    settings = Settings.load()
    targets = [h.strip() for h in hosts.split(",") if h.strip()] or [settings.host_name]
    failed = False
    sender = None
    for host in targets:
        if host == settings.host_name:
            from megaflow.env_hosts.docker_host import DockerHost

            client = _docker()
            try:
                docker_host = DockerHost(client, settings, name=host, redis_client=_redis(settings))
                for image, status in prefetch(docker_host, images).items():
                    typer.echo(f"{host}\t{image}\t{status}")
                    failed |= status.startswith("error")
            finally:
                client.close()
        else:
            from megaflow.core.wire import env_host_queue
            from megaflow.workers.celery_app import create_app

            if sender is None:
                sender = create_app(settings)
            result = sender.send_task(PREFETCH_TASK, args=[list(images)], queue=env_host_queue(host))
            typer.echo(f"{host}\tqueued\t{result.id}")
    if failed:
        raise typer.Exit(1)
