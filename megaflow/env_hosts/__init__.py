"""Environment service: containers on env hosts via the Docker SDK (ephemeral and warm-pool modes)."""

from megaflow.env_hosts.docker_host import DockerHost, ExecResult

__all__ = ["DockerHost", "ExecResult"]
