"""Submitters identified by a per-person Redis ACL user whose name is their MegaFlow user name.

``megaflow acl add-user alice`` creates Redis user ``alice`` with the submitter role's rules and
prints her MEGAFLOW_REDIS_URL once. ``check_submitter`` (called by ``Client.submit``) then refuses a
submit whose ``user=`` differs from the Redis user the connection authenticated as. The operator's
``default`` user and the fleet's own role users (``<prefix>-<role>``) may submit under any name.
"""

from __future__ import annotations

import secrets
from typing import Any

import redis

from megaflow.core import guards
from megaflow.core.errors import ConfigError, SpecError
from megaflow.security import acl


def person_rules(prefix: str, name: str) -> acl.RoleUser:
    """The Redis user of person ``name``: the submitter role's rules under that name."""
    if not guards.USER_NAME.fullmatch(name):
        raise ConfigError(f"user name {name!r}: must be {guards.USER_RULE}")
    if name == "default" or name.startswith(f"{prefix}-"):
        raise ConfigError(f"user name {name!r}: reserved (the operator's user or the fleet's role users)")
    return acl.RoleUser("submitter", name, acl.role_user(prefix, "submitter").rules)


def add_person(redis_client: Any, prefix: str, name: str, password: str | None = None) -> str:
    """Create (or reset) person ``name``'s Redis user; returns the password (new and random unless given)."""
    user = person_rules(prefix, name)
    password = password or secrets.token_urlsafe(24)
    redis_client.execute_command("ACL", "SETUSER", *acl.setuser_args(user, password))
    return password


def remove_person(redis_client: Any, prefix: str, name: str) -> bool:
    """Delete person ``name``'s Redis user; True if it existed."""
    person_rules(prefix, name)  # refuses role and operator users
    return bool(redis_client.execute_command("ACL", "DELUSER", name))


def authenticated_user(redis_client: Any) -> str:
    """The Redis user this connection authenticated as (``default`` without ACL users)."""
    who = redis_client.execute_command("ACL", "WHOAMI")
    return who.decode() if isinstance(who, bytes) else str(who)


def check_submitter(redis_client: Any, prefix: str, user: str) -> None:
    """Raise SpecError (field ``user``) when a person's connection submits under another name."""
    try:
        who = authenticated_user(redis_client)
    except redis.exceptions.NoPermissionError:  # a user without ACL WHOAMI: not one of ours, refuse
        raise SpecError(
            "user: this Redis user may not run ACL WHOAMI, so the submitter cannot be checked; "
            "create it with `megaflow acl add-user NAME`",
            field="user",
        ) from None
    if who == "default" or who.startswith(f"{prefix}-"):
        return
    if who != user:
        raise SpecError(
            f"user: {user!r} is not the Redis user you authenticated as ({who!r}); submit as user={who!r}",
            field="user",
        )
