"""Map Docker SDK and transport failures onto MegaFlow's classified errors (infra versus task)."""

from __future__ import annotations

from contextlib import contextmanager

from megaflow.core.errors import InfraError, RetryableInfraError


class ContainerLostError(InfraError):
    """The episode's container is gone or no longer running (killed, expired, removed)."""


class ImageMissingError(InfraError):
    """The image vanished from the host between the presence check and the container create."""


@contextmanager
def docker_errors(what: str, *, missing: type[InfraError] = ContainerLostError):
    """Re-raise Docker SDK / connection errors from the block as InfraError or RetryableInfraError.

    A 404 becomes ``missing`` (by default ContainerLostError: the block addressed a container).
    """
    import docker.errors
    import requests.exceptions

    try:
        yield
    except InfraError:
        raise
    except docker.errors.NotFound as exc:
        raise missing(f"{what}: not found ({exc.explanation or exc})") from exc
    except docker.errors.APIError as exc:
        msg = exc.explanation or str(exc)
        if exc.status_code == 409 and "is not running" in str(msg):
            raise ContainerLostError(f"{what}: container is not running") from exc
        if exc.status_code is not None and exc.status_code >= 500:
            raise RetryableInfraError(f"{what}: Docker engine error: {msg}") from exc
        raise InfraError(f"{what}: Docker refused: {msg}") from exc
    except (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        docker.errors.DockerException,
        ConnectionError,
        TimeoutError,
    ) as exc:
        raise RetryableInfraError(f"{what}: Docker engine unreachable or too slow: {exc}") from exc
