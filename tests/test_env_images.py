"""Image logistics against the real Docker engine: LRU eviction under a tiny disk budget, prefetch, pulls."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import time
import uuid

import pytest

from megaflow.core.errors import InfraError
from megaflow.env_hosts import DockerHost
from megaflow.env_hosts.images import prefetch, pull_image

MB = 1024 * 1024


def tiny_image(docker_client, tag: str) -> None:
    """Import a one-file image of 1 MiB of random bytes (distinct layers, so sizes add up)."""
    buf = io.BytesIO()
    data = os.urandom(MB)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("blob")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    repo, _, version = tag.rpartition(":")
    docker_client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=version)


@pytest.fixture
def tiny_images(docker_client):
    run = uuid.uuid4().hex[:6]
    tags = [f"megaflow-test-evict-{run}:{i}" for i in range(4)]
    for tag in tags:
        tiny_image(docker_client, tag)
    yield tags
    for tag in tags:
        with contextlib.suppress(Exception):
            docker_client.api.remove_image(tag, force=True)


def present(docker_client, tag: str) -> bool:
    return any(tag in (i.get("RepoTags") or []) for i in docker_client.api.images())


def test_lru_eviction_under_a_tiny_disk_budget(docker_client, sandbox_image, settings, redis_client, tiny_images):
    a, b, c, untracked = tiny_images
    host = DockerHost(
        docker_client,
        settings.model_copy(update={"image_disk_budget_gb": 2.5 * MB / 1024**3}),
        name=f"t-env-{uuid.uuid4().hex[:8]}",
        redis_client=redis_client,
    )
    for tag in (a, b, c):  # a is the least recently used
        assert host.ensure_image(tag) is False
        time.sleep(0.01)
    used = host.images.last_used()
    assert used[a] < used[b] < used[c]
    assert set(redis_client.hkeys(host.keys.env(host.name, "images"))) >= {a, b, c}

    evicted = host.maintain()["evicted"]
    assert evicted == [a]
    assert not present(docker_client, a) and present(docker_client, b) and present(docker_client, c)
    assert present(docker_client, untracked)  # never touched: MegaFlow did not bring it here
    assert a not in host.images.last_used()

    host.images.touch(b)  # now c is the oldest, but a container of this host uses it
    handle = host.create("ep-img", c, labels={})
    try:
        assert host.images.evict(budget_gb=0, protect=host.in_use_images()) == [b]
        assert present(docker_client, c)
    finally:
        host.close(handle)
    assert host.report()["disk_free_gb"] > 0


def test_prefetch_reports_present_and_failed_images(docker_client, sandbox_image, settings, redis_client):
    host = DockerHost(
        docker_client,
        settings.model_copy(update={"pull_timeout_s": 60}),
        name=f"t-env-{uuid.uuid4().hex[:8]}",
        redis_client=redis_client,
    )
    out = prefetch(host, [sandbox_image, "megaflow-test/absent:nope"])
    assert out[sandbox_image] == "present"
    assert out["megaflow-test/absent:nope"].startswith("error:")
    assert sandbox_image in host.report()["images"]


def test_pull_with_registry_credentials_fails_as_infra_error(docker_client, settings):
    s = settings.model_copy(
        update={
            "registry_url": "127.0.0.1:1",
            "registry_username": "u",
            "registry_password": None,
            "pull_timeout_s": 30,
        }
    )
    started = time.monotonic()
    with pytest.raises(InfraError, match="127.0.0.1:1/megaflow/absent"):
        pull_image(docker_client, "127.0.0.1:1/megaflow/absent:1", s)
    assert time.monotonic() - started < 30


def test_images_cli_build_is_a_no_op_when_present_and_prefetch_runs_locally(
    docker_client, sandbox_image, settings, monkeypatch
):
    from typer.testing import CliRunner

    from megaflow.cli.env import app

    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    built = runner.invoke(app, ["build", "--tag", sandbox_image])
    assert built.exit_code == 0, built.output
    assert built.output.strip().splitlines()[-1] == sandbox_image
    fetched = runner.invoke(app, ["prefetch", sandbox_image, "--hosts", settings.host_name])
    assert fetched.exit_code == 0, fetched.output
    assert fetched.stdout.split() == [settings.host_name, sandbox_image, "present"]  # progress goes to stderr
    missing = runner.invoke(app, ["prefetch", "megaflow-test/absent:nope"])
    assert missing.exit_code == 4 and "error:" in missing.output  # a failed pull: infrastructure (exit 4)


def test_create_pulls_again_when_the_image_vanished(docker_client, sandbox_image, settings, redis_client):
    """The presence cache may be stale (image removed by hand); create notices and goes through ensure again."""
    tag = f"megaflow-test-vanish-{uuid.uuid4().hex[:6]}:1"
    docker_client.api.tag(sandbox_image, *tag.split(":"))
    host = DockerHost(docker_client, settings, name=f"t-env-{uuid.uuid4().hex[:8]}", redis_client=redis_client)
    try:
        host.ensure_image(tag)
        docker_client.api.remove_image(tag)
        with pytest.raises(InfraError, match="vanish"):  # gone for good: the pull fails, classified
            host.create("ep-v", tag, labels={})
        docker_client.api.tag(sandbox_image, *tag.split(":"))
        handle = host.create("ep-v", tag, labels={})
        host.close(handle)
    finally:
        with contextlib.suppress(Exception):
            docker_client.api.remove_image(tag)


def test_images_cli_prefetch_queues_a_task_for_other_hosts(settings, redis_client, monkeypatch):
    from typer.testing import CliRunner

    from megaflow.cli.env import app

    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    unknown = CliRunner().invoke(app, ["prefetch", "img:1", "--hosts", "far-host"])
    assert unknown.exit_code != 0 and "far-host" in str(unknown.exception)  # only registered hosts
    assert not redis_client.exists(f"{settings.key_prefix}:celery:env.far-host")
    from megaflow.core.keys import Keys
    from megaflow.engine.resources.manager import ResourceManager

    ResourceManager(redis_client, settings, Keys(settings.key_prefix)).register_host(
        "far-host", capacity=2, images=[], warm={}, disk_free_gb=10.0
    )
    out = CliRunner().invoke(app, ["prefetch", "img:1", "--hosts", "far-host"])
    assert out.exit_code == 0, out.output
    assert out.output.split()[:2] == ["far-host", "queued"]
    queued = redis_client.lrange(f"{settings.key_prefix}:celery:env.far-host", 0, -1)  # kombu list of the queue
    assert len(queued) == 1
    body = json.loads(queued[0])
    assert body["headers"]["task"] == "megaflow.env.prefetch"
