"""Each role gets only its own secrets: the environment of a worker process, filtered by role.

``role_env`` takes the full environment a fleet would hand a child (``os.environ`` plus
``Settings.to_env()``) and removes every secret that role does not use:

| secret | roles that keep it |
| --- | --- |
| MEGAFLOW_MODEL_API_KEY | model |
| MEGAFLOW_REGISTRY_PASSWORD | env |
| MEGAFLOW_FLOWER_PASSWORD | flower |
| MEGAFLOW_METRICS_PASSWORD | metrics, control (it serves the metrics endpoint on ``metrics_port``) |
| AWS_* credentials | roles that write or read artifacts, only when MEGAFLOW_ARTIFACTS_URL is s3:// |
| credentials in MEGAFLOW_METADATA_URL | roles that use the metadata store (not flower, not metrics) |
| any other secret setting (a SecretStr field of Settings) | none, until it is listed here |
| any other variable that looks like a secret (``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``) | none |

With Redis ACLs applied (``megaflow acl apply``) the Redis URL of each role carries that role's own
user and password instead of the operator's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from megaflow.security import acl

ROLE_SECRETS = {
    "MEGAFLOW_MODEL_API_KEY": frozenset({"model"}),
    "MEGAFLOW_REGISTRY_PASSWORD": frozenset({"env"}),
    "MEGAFLOW_FLOWER_PASSWORD": frozenset({"flower"}),
    "MEGAFLOW_METRICS_PASSWORD": frozenset({"metrics", "control"}),
}
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")
# roles whose steps may finish an episode (artifacts written) or read results back
ARTIFACT_ROLES = frozenset({"submitter", "control", "model", "agent", "env"})
METADATA_ROLES = frozenset({"submitter", "control", "model", "agent", "env"})
_SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSW(OR)?D|CREDENTIAL|PRIVATE", re.IGNORECASE)


def _secret_settings() -> frozenset[str]:
    """MEGAFLOW_* variables of every SecretStr setting (a new one is kept from every role until listed above)."""
    from pydantic import SecretStr

    from megaflow.core.settings import Settings

    return frozenset(
        f"MEGAFLOW_{name.upper()}" for name, f in Settings.model_fields.items() if SecretStr in _types(f.annotation)
    )


def _types(annotation: object) -> tuple[object, ...]:
    return (annotation, *getattr(annotation, "__args__", ()))


def role_of(args: list[str]) -> str:
    """The role of a fleet process from its arguments after ``python -m megaflow`` (``worker env ...`` -> env)."""
    if args[:1] == ["worker"] and len(args) > 1:
        return args[1]
    return args[0] if args else "submitter"


def _has_credentials(url: str) -> bool:
    return "@" in url.split("://", 1)[-1].split("/", 1)[0]


def role_env(role: str, env: Mapping[str, str], *, passwords: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` without the secrets ``role`` does not need (see the module doc); the role's Redis user when
    ``passwords`` (from ``megaflow acl apply``) are given."""
    if role not in acl.ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(acl.ROLES)}")
    s3 = env.get("MEGAFLOW_ARTIFACTS_URL", "").startswith("s3://")
    secret_settings = _secret_settings()
    out: dict[str, str] = {}
    for name, value in env.items():
        if name in ROLE_SECRETS:
            if role in ROLE_SECRETS[name]:
                out[name] = value
        elif name in AWS_VARS or (name.startswith("AWS_") and _SECRETISH.search(name)):
            if s3 and role in ARTIFACT_ROLES:
                out[name] = value
        elif name == "MEGAFLOW_METADATA_URL":
            if role in METADATA_ROLES or not _has_credentials(value):
                out[name] = value
        elif name.startswith("MEGAFLOW_"):
            if name not in secret_settings:
                out[name] = value
        elif not _SECRETISH.search(name):
            out[name] = value
    if passwords is not None and "MEGAFLOW_REDIS_URL" in out:
        prefix = out.get("MEGAFLOW_KEY_PREFIX", "mf")
        out["MEGAFLOW_REDIS_URL"] = acl.role_url(
            out["MEGAFLOW_REDIS_URL"], acl.user_name(prefix, role), passwords[role]
        )
    return out
