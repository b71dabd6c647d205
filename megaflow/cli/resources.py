"""Operator commands: ``megaflow capacity``, ``megaflow quota set USER N``, ``megaflow host drain|health NAME``.

``app`` holds the three; the main CLI mounts them (``capacity`` as a command, ``quota`` and
``host`` as groups).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from megaflow.cli.base import JSON_HELP, App, check_user, console, echo_json, load_settings

app = App(help="Capacity, quotas and env hosts.")
quota_app = App(help="Per-user limits of episodes running at once.")
host_app = App(help="Env hosts.")
app.add_typer(quota_app, name="quota")
app.add_typer(host_app, name="host")


def _manager() -> Any:
    import redis

    from megaflow.core.keys import Keys
    from megaflow.engine.resources.manager import ResourceManager

    settings = load_settings()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    return ResourceManager(client, settings, Keys(settings.key_prefix))


def render_capacity(cap: dict[str, Any]) -> list[Any]:
    """Rich renderables for ``capacity()``'s result: summary, users, hosts."""
    from rich.table import Table

    g, q = cap["global"], cap["queue"]
    summary = Table(title="Capacity", show_header=True)
    for col in ("tier", "used", "limit"):
        summary.add_column(col, justify="right" if col != "tier" else "left")
    summary.add_row("global", str(g["used"]), str(g["limit"]))
    summary.add_row("queued", str(q["length"]), "")
    oldest = q.get("oldest")
    summary.add_row("oldest wait", f"{q['oldest_wait_s']:.1f}s" + (f" ({oldest['episode_id']})" if oldest else ""), "")
    summary.add_row("admitted, not started", str(q["admitted_not_started"]), "")

    users = Table(title="Users")
    for col in ("user", "used", "limit", "queued", "at limit"):
        users.add_column(col, justify="left" if col == "user" else "right", no_wrap=col == "user")
    for u in cap["users"]:
        limit = f"{u['limit']}" + (" *" if u["override"] else "")
        users.add_row(u["user"], str(u["used"]), limit, str(u["queued"]), "yes" if u["at_limit"] else "")

    hosts = Table(title="Env hosts")
    for col in ("host", "used", "capacity", "booting", "images", "warm", "disk free GB", "heartbeat", "state"):
        hosts.add_column(col, justify="left" if col in ("host", "state") else "right", no_wrap=col == "host")
    for h in cap["hosts"]:
        state = "drained" if h["drained"] else ("up" if h["alive"] else "stale")
        hosts.add_row(
            h["name"],
            str(h["used"]),
            str(h["capacity"]),
            f"{h['booting']}/{h['boot_limit']}",
            str(h["images"]),
            str(sum(h["warm"].values())),
            f"{h['disk_free_gb']:.1f}",
            f"{h['heartbeat_age_s']:.1f}s ago",
            state,
        )
    return [summary, users, hosts]


@app.command()
def capacity(as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """Used / limit per tier, per user and per env host; queue length and oldest wait."""
    cap = _manager().capacity()
    if as_json:
        echo_json(cap)
        return
    out = console()
    for table in render_capacity(cap):
        out.print(table)


@quota_app.command("set")
def quota_set(
    user: Annotated[str, typer.Argument(metavar="USER", help="User name.")],
    n: Annotated[
        int | None,
        typer.Argument(metavar="N", min=0, help="Episodes the user may run at once (omit with --default)."),
    ] = None,
    default: Annotated[bool, typer.Option("--default", help="Drop the override: back to MEGAFLOW_USER_LIMIT.")] = False,
) -> None:
    """Set a user's limit of episodes running at once (or drop the override with --default)."""
    check_user(user)
    if (n is None) == (not default):
        raise typer.BadParameter("give either N or --default", param_hint="N")
    mgr = _manager()
    mgr.set_quota(user, None if default else n)
    mgr.request_admission()  # a raised quota may let waiting episodes in (the sweeper admits)
    typer.echo(f"quota of {user}: {mgr.quota(user)}" + (" (default)" if default else ""))


@host_app.command("drain")
def host_drain(
    name: Annotated[str, typer.Argument(metavar="HOST", help="Env host name (as in `megaflow capacity`).")],
    undo: Annotated[bool, typer.Option("--undo", help="Accept new admissions again.")] = False,
) -> None:
    """Stop admitting episodes to a host; episodes already running there finish."""
    mgr = _manager()
    mgr.drain_host(name, drain=not undo)  # NotFoundError for a host never registered
    if undo:
        mgr.request_admission()
        typer.echo(f"host {name}: accepting admissions")
    else:
        used = next((h["used"] for h in mgr.hosts() if h["name"] == name), 0)
        typer.echo(f"host {name}: drained ({used} episodes still running there will finish)")


@host_app.command("leave")
def host_leave(
    name: Annotated[str, typer.Argument(metavar="HOST", help="Env host name (as in `megaflow capacity`).")],
) -> None:
    """Tell a host to leave: no new episodes; its env worker unregisters and stops once its episodes finish."""
    mgr = _manager()
    mgr.leave_host(name)  # NotFoundError for a host never registered
    used = next((h["used"] for h in mgr.hosts() if h["name"] == name), 0)
    typer.echo(f"host {name}: leaving ({used} episodes still running there will finish, then its worker stops)")


@host_app.command("health")
def host_health(
    name: str | None = typer.Argument(None, help="Env host name (default: this host, MEGAFLOW_HOST_NAME)."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Docker daemon up, disk free above the image budget, image present, env worker answering ping."""
    import json

    from megaflow.core.settings import Settings
    from megaflow.health import host_health as check

    report = check(Settings.load(), name)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for c in report["checks"]:
            typer.echo(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']:<7} {c['detail']}")
        state = ("healthy" if report["ok"] else "unhealthy") + (" (drained)" if report["drained"] else "")
        typer.echo(f"host {report['host']}: {state}")
    if not report["ok"]:
        raise typer.Exit(1)
