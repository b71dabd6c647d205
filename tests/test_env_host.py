"""DockerHost against the real Docker engine: lifecycle, limits, network, files, error classes."""

from __future__ import annotations

import time
import uuid

import pytest

from megaflow.core.errors import CommandTimeoutError, InfraError, RetryableInfraError, TaskError
from megaflow.env_hosts import DockerHost, ExecResult
from megaflow.env_hosts import labels as L
from megaflow.env_hosts.errors import ContainerLostError
from megaflow.env_hosts.images import api_with_timeout
from tests.helpers import wait_until


def remove_host_containers(docker_client, name: str) -> None:
    for c in docker_client.api.containers(all=True, filters={"label": f"{L.HOST}={name}"}):
        docker_client.api.remove_container(c["Id"], force=True)


@pytest.fixture
def make_host(docker_client, sandbox_image, settings, redis_client):
    """Factory of DockerHosts with a unique host name; every container they label is removed after."""
    names: list[str] = []
    hosts: list[DockerHost] = []

    def make(sessions: bool = True, **overrides) -> DockerHost:
        name = f"t-env-{uuid.uuid4().hex[:8]}"
        names.append(name)
        s = settings.model_copy(
            update={"container_memory": "256m", "container_pids": 64, "container_cpus": 0.5, **overrides}
        )
        host = DockerHost(docker_client, s, name=name, redis_client=redis_client, sessions=sessions)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.shutdown()
    for name in names:
        remove_host_containers(docker_client, name)
    for host in hosts[:1]:  # loop-mode disk files of the containers removed above
        host.disk.sweep(host.containers.list_all_ids)


@pytest.fixture(params=["docker-exec", "session"])
def box(request, make_host):
    """Factory of (host, handle): every command through plain `docker exec`, or a warm container's exec session."""

    def open_box(episode_id: str, **overrides):
        if request.param == "docker-exec":
            host = make_host(sessions=False, **overrides)
            return host, host.create(episode_id, host.settings.default_image, labels={})
        host = make_host(env_mode="persistent", warm_pool_size=1, **overrides)
        host.pool.refill()
        handle = host.create(episode_id, host.settings.default_image, labels={}, mode="persistent")
        assert handle.data["warm"] and handle.id in host.exec_sessions
        return host, handle

    return open_box


def test_lifecycle_labels_and_limits(make_host, docker_client, sandbox_image):
    host = make_host(sessions=False)
    handle = host.create("ep-1", sandbox_image, labels={"run": "b1", "user": "alice"})
    assert handle.host == host.name and handle.mode == "ephemeral" and handle.image == sandbox_image
    info = docker_client.api.inspect_container(handle.id)
    labels = info["Config"]["Labels"]
    assert labels[L.RUN] == "b1" and labels[L.USER] == "alice" and labels[L.EPISODE] == "ep-1"
    assert labels[L.HOST] == host.name and float(labels[L.LEASE_EXPIRY]) > time.time()
    hc = info["HostConfig"]
    assert hc["NanoCpus"] == int(0.5e9) and hc["Memory"] == 256 * 1024**2 and hc["PidsLimit"] == 64
    assert hc["NetworkMode"] == "none" and hc["Privileged"] is False and hc["Init"] is True
    # the only mount: this host's model-gateway socket directory, read-only (no route out, no Docker socket)
    from megaflow.env_hosts.gateway_socket import CONTAINER_DIR, host_dir

    assert hc.get("Binds") == [f"{host_dir(host.settings, host.name)}:{CONTAINER_DIR}:ro"]
    assert [(m["Destination"], m["RW"]) for m in info["Mounts"]] == [(CONTAINER_DIR, False)]
    assert info["Config"]["Cmd"] == ["sleep", str(int(host.settings.container_lifetime_s))]

    r = host.execute(handle, "echo out; echo err >&2; exit 3", timeout=10)
    assert isinstance(r, ExecResult)
    assert (r.exit_code, r.output, r.timed_out, r.truncated) == (3, "out\nerr\n", False, False)
    assert ExecResult.from_json(r.to_json()) == r
    assert host.execute(handle, "test -e /var/run/docker.sock", timeout=10).exit_code == 1
    assert host.execute(handle, "pwd", timeout=10, workdir="/tmp", env={"A": "1"}).output == "/tmp\n"

    host.close(handle)
    host.close(handle)  # idempotent
    assert not docker_client.api.containers(all=True, filters={"id": handle.id})
    with pytest.raises(ContainerLostError) as err:
        host.execute(handle, "true", timeout=5)
    assert isinstance(err.value, InfraError)


def test_exec_results_status_workdir_env(box):
    host, handle = box("ep-exec")
    r = host.execute(handle, "echo out; echo err >&2; exit 3", timeout=10)
    assert (r.exit_code, r.output, r.timed_out, r.truncated) == (3, "out\nerr\n", False, False)
    r = host.execute(handle, 'pwd; echo "$A"', timeout=10, workdir="/tmp", env={"A": 1})
    assert (r.exit_code, r.output) == (0, "/tmp\n1\n")
    assert host.execute(handle, "echo $0; shopt -q login_shell && echo login", timeout=10).output == "bash\nlogin\n"
    host.close(handle)
    with pytest.raises(ContainerLostError):
        host.execute(handle, "true", timeout=5)


def test_ephemeral_container_gets_a_session_after_its_first_exec(make_host):
    host = make_host()
    handle = host.create("ep-sess", host.settings.default_image, labels={})
    parent = "ps -o comm= -p $PPID"  # who started the command's shell
    assert host.execute(handle, parent, timeout=10).output == "timeout\n"  # plain docker exec
    wait_until(lambda: handle.id in host.exec_sessions, 20, "an exec session to open", 0.05)
    session = host.exec_sessions.get(handle.id)
    assert host.execute(handle, parent, timeout=10).output == "python3\n"  # the session's runner
    assert not session.broken and host.exec_sessions.get(handle.id) is session
    host.close(handle)
    assert handle.id not in host.exec_sessions and session.broken


def test_memory_hog_is_killed_and_container_survives(box):
    host, handle = box("ep-mem", container_memory="128m")
    r = host.execute(handle, "python3 -c 'x = bytearray(600 * 1024 * 1024); print(len(x))'", timeout=30)
    assert r.exit_code == 137 and "629145600" not in r.output
    assert host.execute(handle, "echo alive", timeout=10).output == "alive\n"


def test_fork_bomb_is_contained(box):
    host, handle = box("ep-fork", container_pids=64)
    r = host.execute(handle, ":(){ :|:& };:", timeout=5)
    assert r.duration_s < 15
    deadline = time.monotonic() + 60  # killed at once; on a loaded machine init takes a while to reap them
    while True:
        after = host.execute(handle, "ps -e --no-headers | wc -l", timeout=10)
        assert after.exit_code == 0, after
        if int(after.output) < 10:  # the bomb's processes were killed and reaped
            break
        assert time.monotonic() < deadline, f"{after.output.strip()} processes left in the container"
        time.sleep(0.5)


def test_command_past_its_time_is_stopped(box):
    host, handle = box("ep-slow")
    r = host.execute(handle, "echo started; sleep 30 & sleep 30", timeout=1)
    assert r.timed_out and r.exit_code == 124 and r.output == "started\n"
    assert r.duration_s < 8
    left = host.execute(handle, "ps -e -o comm= | grep -c sleep || true", timeout=10)
    assert left.output.strip() == "1"  # only the container's own `sleep LIFETIME`
    with pytest.raises(CommandTimeoutError) as err:
        host.evaluate(handle, "sleep 30", timeout=1)
    assert isinstance(err.value, TaskError) and isinstance(err.value, TimeoutError)


def test_output_is_capped_head_and_tail(box):
    host, handle = box("ep-out", output_cap_bytes=1024)
    r = host.execute(handle, "echo FIRST; head -c 200000 /dev/zero | tr '\\0' x; echo; echo LAST", timeout=20)
    assert r.truncated and r.exit_code == 0
    assert r.output.startswith("FIRST\n") and r.output.endswith("LAST\n")
    assert "bytes of output omitted" in r.output and len(r.output) < 1200


def test_network_is_off_by_default(box):
    host, handle = box("ep-net")
    ifaces = host.execute(handle, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '", timeout=10).output.split()
    assert ifaces == ["lo"]
    r = host.execute(
        handle, "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=3)\"", timeout=10
    )
    assert r.exit_code != 0 and "unreachable" in r.output


def test_file_round_trip(box):
    host, handle = box("ep-files")
    blob = bytes(range(256)) * 64
    host.put_files(
        handle, {"/work/deep/dir/data.bin": blob, "/work/run.sh": "#!/bin/sh\necho ran\n", "/tmp/note.txt": "héllo\n"}
    )
    assert host.get_file(handle, "/work/deep/dir/data.bin") == blob
    assert host.get_file(handle, "/tmp/note.txt") == "héllo\n".encode()
    assert host.execute(handle, "/work/run.sh && stat -c %a /tmp", timeout=10).output == "ran\n1777\n"
    with pytest.raises(TaskError):
        host.get_file(handle, "/work/missing.txt")
    with pytest.raises(TaskError):
        host.put_files(handle, {"relative.txt": "x"})


def test_dead_mans_switch_ends_the_container(make_host, docker_client):
    host = make_host(container_lifetime_s=2)
    handle = host.create("ep-dms", host.settings.default_image, labels={})
    wait_until(
        lambda: not docker_client.api.inspect_container(handle.id)["State"]["Running"],
        20,
        "the container to end at its 2 s lifetime",
        0.5,
    )
    with pytest.raises(ContainerLostError):
        host.execute(handle, "true", timeout=5)


def test_missing_image_is_an_infra_error_and_quick(make_host):
    host = make_host(pull_timeout_s=60)
    started = time.monotonic()
    with pytest.raises(InfraError) as err:
        host.create("ep-pull", "megaflow-test/does-not-exist:never", labels={})
    assert not isinstance(err.value, TaskError)
    assert "does-not-exist" in str(err.value)
    assert time.monotonic() - started < 60


def test_unreachable_docker_engine_is_retryable(settings, tmp_path):
    import docker

    client = docker.DockerClient(base_url=f"unix://{tmp_path}/no-docker.sock", timeout=5, version="1.41")
    host = DockerHost(client, settings, name="t-env-nodaemon")
    with pytest.raises(RetryableInfraError):
        host.create("ep-x", "megaflow-sandbox:latest", labels={})


def test_api_with_timeout_reaches_the_same_engine(docker_client):
    api = api_with_timeout(docker_client, 7)
    assert api.ping() is True
