"""Sandbox images: build the default image locally (mmdebstrap + docker import), pull from a registry.

The local build needs no registry: ``mmdebstrap`` bootstraps a minimal Debian root file system
from the host's apt sources into a tar, which ``docker import`` turns into an image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable

from megaflow.core.errors import ConfigError, InfraError, RetryableInfraError

SANDBOX_PACKAGES = ("python3", "git", "ca-certificates", "procps", "coreutils", "patch", "python3-pytest")
DEFAULT_SUITE = "bookworm"
DEFAULT_SOURCES = "/etc/apt/sources.list.d/debian.sources"


def image_present(docker_client, image: str) -> bool:
    """True when ``image`` is in the engine's local store."""
    import docker.errors

    from megaflow.env_hosts.errors import docker_errors

    with docker_errors(f"look up image {image}"):
        try:
            docker_client.api.inspect_image(image)
            return True
        except docker.errors.ImageNotFound:
            return False


def api_with_timeout(docker_client, timeout: float):
    """A low-level client on the same engine whose socket timeout is ``timeout`` (pull / boot deadlines).

    Unix-socket and plain-TCP engines get their own client; a TLS engine reuses the given one.
    """
    import docker

    api = docker_client.api
    base = api.base_url
    if base.startswith("http+docker://"):
        path = getattr(api.get_adapter(base), "socket_path", None)
        if not path:
            return api
        base = "unix://" + path
    elif base.startswith("https://"):
        return api
    return docker.APIClient(base_url=base, timeout=max(1, int(timeout)), version=api.api_version)


def _split_tag(tag: str) -> tuple[str, str]:
    repo, sep, version = tag.rpartition(":")
    if not sep or "/" in version:
        return tag, "latest"
    return repo, version


def build_sandbox_image(
    docker_client,
    tag: str,
    *,
    progress: Callable[[str], None] = print,
    suite: str = DEFAULT_SUITE,
    mirror: str | None = None,
    packages: tuple[str, ...] = SANDBOX_PACKAGES,
) -> str:
    """Bootstrap a minimal Debian with ``packages`` and import it as ``tag``; returns ``tag``.

    ``mirror`` is an apt sources file or URL for mmdebstrap; by default the host's
    ``/etc/apt/sources.list.d/debian.sources`` when it exists, else mmdebstrap's own default.
    """
    exe = shutil.which("mmdebstrap")
    if not exe:
        raise ConfigError(
            "building the sandbox image needs mmdebstrap (apt-get install mmdebstrap), "
            "or pull a prebuilt image and set MEGAFLOW_DEFAULT_IMAGE"
        )
    if mirror is None and os.path.exists(DEFAULT_SOURCES):
        mirror = DEFAULT_SOURCES
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="megaflow-image-") as tmp:
        tar = os.path.join(tmp, "rootfs.tar")
        cmd = [exe, "--variant=minbase", "--include=" + ",".join(packages), "--skip=cleanup/reproducible", suite, tar]
        if mirror:
            cmd.append(mirror)
        progress(f"building {tag}: {' '.join(cmd)}")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise InfraError(f"mmdebstrap failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
        repo, version = _split_tag(tag)
        progress(f"importing {tar} as {tag}")
        try:
            docker_client.api.import_image_from_file(tar, repository=repo, tag=version, changes=['CMD ["/bin/bash"]'])
        except Exception as exc:  # docker.errors.APIError, requests errors
            raise InfraError(f"docker import of {tag} failed: {exc}") from exc
    if not image_present(docker_client, tag):
        raise InfraError(f"docker import reported success but {tag} is not in the image store")
    progress(f"built {tag} in {time.monotonic() - started:.0f}s")
    return tag


def ensure_sandbox_image(docker_client, tag: str, *, progress: Callable[[str], None] = print) -> str:
    """Return ``tag``, building the sandbox image first only if it is missing."""
    if image_present(docker_client, tag):
        return tag
    return build_sandbox_image(docker_client, tag, progress=progress)


DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})


def image_registry(image: str) -> str:
    """The registry host an image name points at (Docker's rule): ``reg:5000/a/b:t`` -> ``reg:5000``;
    a name with no registry part (``python:3.12``, ``org/app``) -> ``docker.io``."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host = first.lower()
    else:
        host = DOCKER_HUB
    return DOCKER_HUB if host in _HUB_ALIASES else host


def registry_host(url: str | None) -> str:
    """The host[:port] of MEGAFLOW_REGISTRY_URL (scheme and path dropped); unset means Docker Hub."""
    if not url:
        return DOCKER_HUB
    rest = url.strip().split("://", 1)[-1]
    host = rest.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def registry_auth(image: str, settings) -> dict[str, str] | None:
    """The registry credentials for pulling ``image``: only when it lives on MEGAFLOW_REGISTRY_URL's host
    (Docker Hub when unset); an image that points anywhere else is pulled anonymously."""
    if not settings.registry_username or image_registry(image) != registry_host(settings.registry_url):
        return None
    password = settings.registry_password.get_secret_value() if settings.registry_password else ""
    auth = {"username": settings.registry_username, "password": password}
    if settings.registry_url:
        auth["serveraddress"] = settings.registry_url
    return auth


def pull_image(docker_client, image: str, settings, *, timeout: float | None = None) -> None:
    """Pull ``image`` within ``settings.pull_timeout_s``, with the registry credentials only if it is on
    the configured registry (:func:`registry_auth`).

    An image that does not exist or is refused raises :class:`InfraError`; a daemon or
    network failure raises :class:`RetryableInfraError`.
    """
    import docker.errors

    deadline = timeout if timeout is not None else settings.pull_timeout_s
    repo, version = _split_tag(image)
    auth = registry_auth(image, settings)
    # The pull runs on a client with its own socket timeout so a stalled registry ends at the
    # deadline instead of holding an env-worker thread forever.
    api = api_with_timeout(docker_client, deadline)
    started = time.monotonic()
    try:
        # Streamed: errors arrive as {"error": ...} lines, and the whole pull is held to the deadline
        # (the socket timeout alone only bounds each read).
        for line in api.pull(repo, tag=version, auth_config=auth, stream=True, decode=True):
            if isinstance(line, dict) and line.get("error"):
                msg = str(line["error"])
                cls = (
                    InfraError
                    if ("denied" in msg or "not found" in msg or "unauthorized" in msg)
                    else RetryableInfraError
                )
                raise cls(f"pull of {image} failed: {msg}")
            if time.monotonic() - started > deadline:
                raise RetryableInfraError(f"pull of {image} passed its deadline of {deadline:.0f}s")
    except InfraError:
        raise
    except docker.errors.NotFound as exc:
        raise InfraError(f"image {image} not found in the registry: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        msg = str(exc.explanation or exc)
        if (exc.status_code and 400 <= exc.status_code < 500) or "denied" in msg or "not found" in msg:
            raise InfraError(f"pull of {image} refused: {msg}") from exc
        raise RetryableInfraError(f"pull of {image} failed: {msg}") from exc
    except Exception as exc:  # requests.ReadTimeout, ConnectionError
        took = time.monotonic() - started
        raise RetryableInfraError(
            f"pull of {image} failed after {took:.0f}s (deadline {deadline:.0f}s): {exc}"
        ) from exc
    finally:
        if api is not docker_client.api:
            api.close()
    if not image_present(docker_client, image):
        raise InfraError(f"pull of {image} finished but the image is not in the store")


def prefetch(docker_host, images: list[str]) -> dict[str, str]:
    """Make each image present on ``docker_host`` (pull if missing); image -> present | pulled | error: ..."""
    out: dict[str, str] = {}
    for image in images:
        try:
            out[image] = "pulled" if docker_host.ensure_image(image) else "present"
        except InfraError as exc:
            out[image] = f"error: {exc}"
    return out


def _run_in_image(docker_client, image: str, code: str) -> str:
    """Output of ``python3 -c code`` in a throw-away, no-network container of ``image``."""
    out = docker_client.containers.run(image, ["python3", "-c", code], network_mode="none", remove=True)
    return out.decode().strip()


def build_pip_image(
    docker_client,
    base: str,
    tag: str,
    requirements: list[str] | tuple[str, ...],
    *,
    progress: Callable[[str], None] = print,
    pip: tuple[str, ...] | None = None,
) -> str:
    """Derive ``tag`` from ``base`` with Python packages installed (an installed agent's program).

    Containers have no network, so nothing is installed at run time: the host's pip resolves
    ``requirements`` as binary wheels for the base image's Python and machine (``pip install
    --target``), and ``docker build`` (no network, no RUN step) copies them into the image's
    ``/usr/local/lib/pythonX.Y/dist-packages`` with their console scripts in ``/usr/local/bin``.
    """
    import sys

    started = time.monotonic()
    info = _run_in_image(
        docker_client, base, "import sys, platform; print('%d.%d' % sys.version_info[:2], platform.machine())"
    )
    pyver, machine = info.split()
    abi = "cp" + pyver.replace(".", "")
    platforms = [f"manylinux{v}_{machine}" for v in ("2014", "_2_17", "_2_28", "_2_31", "_2_34")]
    with tempfile.TemporaryDirectory(prefix="megaflow-pip-image-") as ctx:
        target = os.path.join(ctx, "site")
        cmd = [*(pip or (sys.executable, "-m", "pip")), "install", "--quiet", "--target", target]
        cmd += ["--only-binary=:all:", "--python-version", pyver, "--implementation", "cp", "--abi", abi]
        for p in platforms:
            cmd += ["--platform", p]
        cmd += list(requirements)
        progress(f"building {tag}: {' '.join(cmd)}")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise InfraError(f"pip install --target for {tag} failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
        bindir = os.path.join(ctx, "bin")
        shutil.move(os.path.join(target, "bin"), bindir) if os.path.isdir(os.path.join(target, "bin")) else None
        os.makedirs(bindir, exist_ok=True)
        for name in os.listdir(bindir):  # the scripts name the host's interpreter: point them at the image's
            path = os.path.join(bindir, name)
            if not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
                with open(path, "wb") as f:
                    f.write(b"#!/usr/bin/python3\n" + data.split(b"\n", 1)[1])
                os.chmod(path, 0o755)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(
                f"FROM {base}\nCOPY site/ /usr/local/lib/python{pyver}/dist-packages/\nCOPY bin/ /usr/local/bin/\n"
                f'LABEL io.megaflow.pip="{" ".join(requirements)}"\n'
            )
        progress(f"docker build of {tag} from {base}")
        try:
            for line in docker_client.api.build(path=ctx, tag=tag, rm=True, network_mode="none", decode=True):
                if isinstance(line, dict) and line.get("error"):
                    raise InfraError(f"docker build of {tag} failed: {line['error']}")
        except InfraError:
            raise
        except Exception as exc:  # docker.errors.APIError, requests errors
            raise InfraError(f"docker build of {tag} failed: {exc}") from exc
    if not image_present(docker_client, tag):
        raise InfraError(f"docker build reported success but {tag} is not in the image store")
    progress(f"built {tag} in {time.monotonic() - started:.0f}s")
    return tag


def ensure_pip_image(
    docker_client,
    base: str,
    tag: str,
    requirements: list[str] | tuple[str, ...],
    *,
    progress: Callable[[str], None] = print,
) -> str:
    """Return ``tag``, building it with :func:`build_pip_image` only if it is missing (cached like the others)."""
    if image_present(docker_client, tag):
        return tag
    return build_pip_image(docker_client, base, tag, requirements, progress=progress)
