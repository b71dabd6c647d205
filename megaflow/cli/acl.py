"""``megaflow acl render|apply|url|check``: Redis ACL users per role (see megaflow.security.acl).

Mounted by the main CLI as ``app.add_typer(acl_app, name="acl")``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from megaflow.cli.base import App, load_settings

app = App(help="Redis ACL users per role: least commands and keys each needs.")

RoleArg = Annotated[str, typer.Argument(help="submitter, control, model, agent, env, flower or metrics.")]


def _check_role(role: str) -> None:
    from megaflow.security import acl

    if role not in acl.ROLES:
        raise typer.BadParameter(f"unknown role {role!r}; one of {', '.join(acl.ROLES)}", param_hint="ROLE")


@app.command()
def render(
    aclfile: Annotated[bool, typer.Option("--aclfile", help="Redis aclfile lines instead of ACL SETUSER.")] = False,
) -> None:
    """Print the rules of every role (passwords hashed; new random ones are saved in STATE_DIR/acl)."""
    from megaflow.security import acl

    settings = load_settings()
    passwords = acl.ensure_passwords(settings.state_dir)
    lines = (acl.render_aclfile if aclfile else acl.render)(settings.key_prefix, passwords)
    typer.echo("\n".join(lines))


@app.command()
def apply() -> None:
    """Create or reset every role user on MEGAFLOW_REDIS_URL's server (needs an admin connection).

    Role passwords are kept in STATE_DIR/acl/passwords.json (mode 0600); `megaflow up` then starts
    each fleet process as its role's user, and creates the users again after a Redis restart.
    """
    import redis

    from megaflow.security import acl

    settings = load_settings()
    passwords = acl.ensure_passwords(settings.state_dir)
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        names = acl.apply(client, settings.key_prefix, passwords)
    finally:
        client.close()
    typer.echo(
        f"applied {len(names)} Redis users: {', '.join(names)} (passwords in {acl.passwords_path(settings.state_dir)})"
    )


@app.command()
def url(role: RoleArg) -> None:
    """Print MEGAFLOW_REDIS_URL with ROLE's user and password (for that role's env file)."""
    from megaflow.security import acl

    _check_role(role)
    settings = load_settings()
    passwords = acl.ensure_passwords(settings.state_dir)
    typer.echo(acl.role_url(settings.redis_url, acl.user_name(settings.key_prefix, role), passwords[role]))


@app.command()
def check() -> None:
    """Connect to Redis with MEGAFLOW_REDIS_URL and say as whom (one line; a wrong password is one clear error)."""
    import redis

    settings = load_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, decode_responses=True)
    try:
        who = client.execute_command("ACL", "WHOAMI")
    except redis.exceptions.NoPermissionError:
        who = "(a user that may not run ACL WHOAMI)"
    finally:
        client.close()
    typer.echo(f"Redis answers; authenticated as {who}")


@app.command("add-user")
def add_user(name: Annotated[str, typer.Argument(help="The person's MegaFlow user name (their Redis user).")]) -> None:
    """Create or reset a person's Redis user (only their own keys; the control service acts for them on their
    own batches) and print their MEGAFLOW_REDIS_URL once."""
    import redis

    from megaflow.security import acl, identity

    settings = load_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        password = identity.add_person(client, settings.key_prefix, name)
    finally:
        client.close()
    typer.echo(acl.role_url(settings.redis_url, name, password))


@app.command("del-user")
def del_user(name: Annotated[str, typer.Argument(help="The person's MegaFlow user name.")]) -> None:
    """Delete a person's Redis user (Redis closes their open connections)."""
    import redis

    from megaflow.security import identity

    settings = load_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        existed = identity.remove_person(client, settings.key_prefix, name)
    finally:
        client.close()
    typer.echo(f"deleted Redis user {name}" if existed else f"no Redis user {name}")
