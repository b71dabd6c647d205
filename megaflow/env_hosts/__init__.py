"""Env hosts: the ``EnvHost`` seam (base.py), its config and factory (config.py), and the backends.

Backends are imported lazily: ``docker`` (docker_host.py and the modules it composes), ``sim``
(sim.py, no containers), or a user's class named by dotted path.
"""

from megaflow.env_hosts.base import EnvHandle, EnvHost, ExecResult, OutputCap

__all__ = [
    "DockerHost",
    "EnvHandle",
    "EnvHost",
    "ExecResult",
    "OutputCap",
    "SimHost",
    "load_env_host",
    "validate_env_config",
]


def __getattr__(name: str):
    if name == "DockerHost":
        from megaflow.env_hosts.docker_host import DockerHost

        return DockerHost
    if name == "SimHost":
        from megaflow.env_hosts.sim import SimHost

        return SimHost
    if name in ("load_env_host", "validate_env_config"):
        from megaflow.env_hosts import config

        return getattr(config, name)
    raise AttributeError(f"module 'megaflow.env_hosts' has no attribute {name!r}")
