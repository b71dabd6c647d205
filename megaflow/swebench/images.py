"""Instance images by the harness's naming: pulled when a registry has them, else built here.

``sweb.eval.x86_64.<instance_id>:latest`` is the local name (the harness's ImageSpec without a
namespace); ``swebench/sweb.eval.x86_64.<id with __ as _1776_>:latest`` the published one. The
env host pulls a missing image on first use (megaflow.env_hosts.image_cache). Without a registry,
``build_from_dockerfile`` builds a task repo's Dockerfile and ``build_from_git_repo`` commits a
local git repository into a base image at /testbed (no network needed).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from megaflow.core.errors import ConfigError, InfraError
from megaflow.swebench.rows import SWEBENCH_WORKDIR, instance_image


def _split(tag: str) -> tuple[str, str]:
    repo, sep, version = tag.rpartition(":")
    return (repo, version) if sep and "/" not in version else (tag, "latest")


def _tar(entries: dict[str, Path]) -> bytes:
    """A tar of host paths (files or directories, symlinks kept) placed at container paths."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for dest, src in entries.items():
            src = Path(src)
            if not src.exists():
                raise ConfigError(f"image build: {src} does not exist")
            tar.add(str(src), arcname=dest.lstrip("/"))
    return buf.getvalue()


def build_from_git_repo(
    client,
    instance_id: str,
    repo_dir: str | Path,
    *,
    base_image: str,
    workdir: str = SWEBENCH_WORKDIR,
    extra: dict[str, Path] | None = None,
    namespace: str | None = None,
    setup: str | None = None,
) -> str:
    """Commit ``repo_dir`` (with its .git) into ``base_image`` at ``workdir``; returns the image name.

    ``extra`` maps container paths to host paths copied too (tools, site-packages); ``setup`` is a
    shell command run once in the container before the commit.
    """
    import docker.errors

    tag = instance_image(instance_id, namespace)
    if not (Path(repo_dir) / ".git").exists():
        raise ConfigError(f"image build: {repo_dir} is not a git repository (no .git)")
    container = None
    try:
        container = client.containers.create(
            base_image, ["sleep", "600"], network_disabled=True, labels={"megaflow.build": instance_id}
        )
        container.start()
        if not container.put_archive("/", _tar({workdir: Path(repo_dir), **(extra or {})})):
            raise InfraError(f"image build of {tag}: Docker refused the archive")
        if setup:
            code, out = container.exec_run(["bash", "-lc", setup], workdir=workdir)
            if code != 0:
                raise InfraError(f"image build of {tag}: set-up failed (exit {code}): {out.decode()[-1000:]}")
        repo, version = _split(tag)
        container.commit(repository=repo, tag=version, changes=[f"WORKDIR {workdir}"])
    except docker.errors.DockerException as exc:
        raise InfraError(f"image build of {tag}: {exc}") from exc
    finally:
        if container is not None:
            container.remove(force=True)
    return tag


def build_from_dockerfile(
    client, instance_id: str, context_dir: str | Path, *, namespace: str | None = None, dockerfile: str = "Dockerfile"
) -> str:
    """Build a task repo's ``tasks/<id>/Dockerfile`` (its directory is the context) under the harness's name."""
    import docker.errors

    tag = instance_image(instance_id, namespace)
    try:
        client.images.build(path=str(context_dir), dockerfile=dockerfile, tag=tag, rm=True)
    except docker.errors.DockerException as exc:
        raise InfraError(f"image build of {tag} from {context_dir}: {exc}") from exc
    return tag
