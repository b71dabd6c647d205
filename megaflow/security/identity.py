"""Submitters identified by a per-person Redis ACL user whose name is their MegaFlow user name.

``megaflow acl add-user alice`` creates Redis user ``alice`` and prints her MEGAFLOW_REDIS_URL once.
That user may touch only ``<prefix>:u:alice:*`` (and run no admin command): every operation of hers
(submit, status, results, cancel, trajectory) is a request the control service serves as her, on her
own batches only (:mod:`megaflow.security.requests`), so neither the Client nor raw Redis commands
reach another person's batches, the quotas, the hosts or the broker. ``check_submitter`` (called by
``Client.submit``) refuses a submit whose ``user=`` differs from the Redis user of the connection;
the operator's ``default`` user and the fleet's role users (``<prefix>-<role>``) may submit under any name.
"""

from __future__ import annotations

import secrets
from typing import Any

import redis

from megaflow.core import guards
from megaflow.core.errors import ConfigError, SpecError
from megaflow.core.keys import Keys
from megaflow.security import acl

# what a person's client sends: a request (XADD), the wait for its answer (BLPOP), a stale answer dropped
_PERSON_COMMANDS = "-@all +@connection +xadd +blpop +lpop +del +exists +ping"


def is_person(prefix: str, redis_user: str) -> bool:
    """Whether ``redis_user`` is a per-person user (not the operator's ``default`` nor a fleet role user)."""
    return redis_user != "default" and not redis_user.startswith(f"{prefix}-")


def person_rules(prefix: str, name: str) -> acl.RoleUser:
    """The Redis user of person ``name``: only keys ``<prefix>:u:<name>:*``, only the commands of a request."""
    if not guards.USER_NAME.fullmatch(name):
        raise ConfigError(f"user name {name!r}: must be {guards.USER_RULE}")
    if not is_person(prefix, name):
        raise ConfigError(f"user name {name!r}: reserved (the operator's user or the fleet's role users)")
    keys = Keys(prefix)
    rules = (
        "reset",
        "on",
        f"~{keys.user(name, '*')}",
        "resetchannels",
        *_PERSON_COMMANDS.split(),
        *acl.NEVER.split(),
        *acl.ALSO.split(),
    )
    return acl.RoleUser("submitter", name, rules)


def add_person(redis_client: Any, prefix: str, name: str, password: str | None = None) -> str:
    """Create (or reset) person ``name``'s Redis user and register it with control; returns the password
    (new and random unless given)."""
    user = person_rules(prefix, name)
    password = password or secrets.token_urlsafe(24)
    redis_client.execute_command("ACL", "SETUSER", *acl.setuser_args(user, password))
    redis_client.sadd(Keys(prefix).persons, name)
    return password


def remove_person(redis_client: Any, prefix: str, name: str) -> bool:
    """Delete person ``name``'s Redis user and its namespace's requests; True if it existed."""
    person_rules(prefix, name)  # refuses role and operator users
    keys = Keys(prefix)
    redis_client.srem(keys.persons, name)
    redis_client.delete(keys.user(name, "req"))
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
    if not is_person(prefix, who):
        return
    if who != user:
        raise SpecError(
            f"user: {user!r} is not the Redis user you authenticated as ({who!r}); submit as user={who!r}",
            field="user",
        )
