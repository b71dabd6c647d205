"""Redis ACL users per role, rendered from the key names in :mod:`megaflow.core.keys` and the wire prefix.

Every role gets only the commands and key patterns it needs: no role but the operator's own (Redis's
``default`` user, left as it is) may run admin or dangerous commands (FLUSHALL, CONFIG, KEYS, DEBUG,
SHUTDOWN, ACL ...); only ``control`` may write the quotas; ``flower`` and ``metrics`` see only what
they show. Passwords are sent as SHA-256 hashes (``#<hex>``), never in the clear.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from megaflow.core.keys import RESOURCE_KEYS, RESOURCE_KEYS_PER, Keys
from megaflow.core.wire import broker_prefix

ROLES = ("submitter", "control", "model", "agent", "env", "flower", "metrics")

# Command sets (Redis ACL categories); "-@admin -@dangerous" always comes after them.
_DATA = "+@read +@write +@keyspace +@scripting +@stream +@transaction +@connection +@fast +@pubsub"
_COMMANDS = {
    "submitter": _DATA,
    "control": _DATA,
    "model": _DATA,
    "agent": _DATA,
    "env": _DATA,
    "flower": "+@read +@write +@pubsub +@connection +@transaction +@fast +@scripting",  # inspect replies, kombu Lua
    "metrics": "+@read +@connection +@scripting +time",
}
NEVER = "-@admin -@dangerous"  # FLUSHALL, FLUSHDB, CONFIG, KEYS, DEBUG, SHUTDOWN, ACL, MONITOR, ...
# redis-py selects the URL's db; WHOAMI names the submitter (CLIENT SETINFO is refused, redis-py ignores that)
ALSO = "+select +acl|whoami"


@dataclass(frozen=True)
class RoleUser:
    """One Redis ACL user: its name and the rules after ``ACL SETUSER <name>`` (password left out)."""

    role: str
    name: str
    rules: tuple[str, ...]


def user_name(prefix: str, role: str) -> str:
    """The Redis user of ``role`` for the fleet under key prefix ``prefix`` (``mf-agent``)."""
    return f"{prefix}-{role}"


def _patterns(keys: Keys, role: str) -> list[str]:
    p = keys.prefix
    broker = broker_prefix(p) + "*"
    res_write = [keys.res(n) for n in RESOURCE_KEYS if n != "quotas"]
    res_write += [f"{keys.res()}:{n}:*" for n in RESOURCE_KEYS_PER]
    quotas = keys.res("quotas")
    episodes = [keys.episode("*"), keys.batch("*"), keys.batches, keys.live, keys.events]
    health = keys.worker_health("*", "*")
    if role == "control":
        return [f"~{p}:*"]
    if role == "flower":
        return [f"~{broker}"]
    if role == "metrics":
        return [f"%R~{p}:*"]
    rw = [*episodes, *res_write, broker]
    ro = [quotas, health, keys.env("*"), keys.model("*")]
    gateway = keys.gateway("*")  # the per-episode gateway: env hosts serve it, model workers answer
    # the elastic fleet (megaflow.elastic): the warm-pool sizes chosen at submit, read by env hosts with
    # the record of the hosts it launched (an episode's "host launched" note at provision)
    pools, launched = f"{p}:elastic:pools", f"{p}:elastic:hosts"
    if role == "model":
        rw += [keys.model("*"), health, gateway]
        ro = [quotas, keys.env("*")]
    elif role == "env":
        rw += [keys.env("*"), health, gateway]
        ro = [quotas, keys.model("*"), pools, launched]
    elif role == "agent":
        rw += [health]
        ro = [quotas, keys.env("*"), keys.model("*")]
    else:  # submitter: automatic mode choice publishes pool sizes
        rw += [pools]
    return [f"~{k}" for k in rw] + [f"%R~{k}" for k in ro]


def role_user(prefix: str, role: str) -> RoleUser:
    """The ACL user of ``role`` (key patterns from :class:`Keys`, commands from its category set)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    keys = Keys(prefix)
    channels = "&*" if role != "metrics" else "resetchannels"
    rules = (
        "reset",
        "on",
        *_patterns(keys, role),
        channels,
        "-@all",
        *_COMMANDS[role].split(),
        *NEVER.split(),
        *ALSO.split(),
    )
    return RoleUser(role, user_name(prefix, role), rules)


def password_hash(password: str) -> str:
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def setuser_args(user: RoleUser, password: str) -> list[str]:
    """Arguments of ``ACL SETUSER`` for ``user`` with ``password`` (hashed)."""
    return [user.name, *user.rules, password_hash(password)]


def render(prefix: str, passwords: dict[str, str]) -> list[str]:
    """One ``ACL SETUSER`` line per role (passwords hashed), for a script or Ansible's redis role."""
    return ["ACL SETUSER " + " ".join(setuser_args(role_user(prefix, r), passwords[r])) for r in ROLES]


def render_aclfile(prefix: str, passwords: dict[str, str]) -> list[str]:
    """The same users in Redis's aclfile format (``user NAME ...``), for ``aclfile`` in redis.conf."""
    lines = []
    for r in ROLES:
        u = role_user(prefix, r)
        lines.append("user " + " ".join([u.name, *[x for x in u.rules if x != "reset"], password_hash(passwords[r])]))
    return lines


# --- passwords and role URLs --------------------------------------------------------------------
def passwords_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where ``megaflow acl apply`` keeps the role passwords (mode 0600)."""
    return Path(state_dir) / "acl" / "passwords.json"


def load_passwords(state_dir: str | os.PathLike[str]) -> dict[str, str] | None:
    """The role passwords of this fleet, or None when ACLs were never applied from here."""
    path = passwords_path(state_dir)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def ensure_passwords(state_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The role passwords (new random ones for roles that have none), saved with mode 0600."""
    path = passwords_path(state_dir)
    current = load_passwords(state_dir) or {}
    out = {r: current.get(r) or secrets.token_urlsafe(24) for r in ROLES}
    if out != current:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(out, f)
    return out


def role_url(redis_url: str, user: str, password: str) -> str:
    """``redis_url`` with ``user:password`` in place of whatever credentials it had."""
    parts = urlsplit(redis_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def apply(redis_client: Any, prefix: str, passwords: dict[str, str]) -> list[str]:
    """Create or reset every role user on the server behind ``redis_client`` (an admin connection)."""
    names = []
    for r in ROLES:
        user = role_user(prefix, r)
        redis_client.execute_command("ACL", "SETUSER", *setuser_args(user, passwords[r]))
        names.append(user.name)
    return names
