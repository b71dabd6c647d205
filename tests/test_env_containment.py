"""Containment probes against the real Docker engine: disk limit, unprivileged user, capabilities, secrets.

The network (only ``lo``), Docker socket, memory (OOM kill, the container lives on), pids (fork
bomb), time-limit and output-cap probes run in test_env_host.py, on both exec paths, as the
default (unprivileged) user.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from megaflow.env_hosts import DockerHost
from megaflow.env_hosts import labels as L
from megaflow.env_hosts.containers import PACKAGE_INSTALL_CAPS

CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7}


@pytest.fixture
def host(docker_client, sandbox_image, settings, redis_client):
    name = f"t-cont-{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(update={"container_memory": "256m", "container_pids": 64, "container_disk": "64m"})
    h = DockerHost(docker_client, s, name=name, redis_client=redis_client, sessions=False)
    yield h
    h.shutdown()
    for c in docker_client.api.containers(all=True, filters={"label": f"{L.HOST}={name}"}):
        h.remove_container(c["Id"])


def sh(host, handle, command: str, **kw):
    return host.execute(handle, command, timeout=kw.pop("timeout", 20), **kw)


def test_disk_limit_ends_in_enospc_and_the_host_keeps_its_disk(host):
    assert host.disk.mode in ("loop", "storage-opt"), "no disk limit can be enforced on this host"
    handle = host.create("ep-disk", host.settings.default_image, workdir="/repo")
    root = host.client.info()["DockerRootDir"]
    free_before = shutil.disk_usage(root).free
    r = sh(host, handle, "fallocate -l 2G /tmp/big; echo rc=$?")
    assert "No space left on device" in r.output and "rc=1" in r.output
    sh(host, handle, "rm -f /tmp/big")  # a failed fallocate may keep what it got
    r = sh(
        host,
        handle,
        "dd if=/dev/zero of=/repo/fill bs=1M count=200 2>&1 | grep -o 'No space.*'; echo rc=${PIPESTATUS[0]}",
    )
    assert "No space left on device" in r.output and "rc=1" in r.output
    r = sh(host, handle, "df -k / | tail -1")
    assert int(r.output.split()[1]) < 80 * 1024  # the container sees its own limit as the disk size
    assert shutil.disk_usage(root).free > free_before - 1024**3  # 2 GB asked for; the host lost < 1 GB
    if host.disk.mode == "loop":
        image = os.path.join(host.disk._dir, f"{handle.id}.ext4")
        assert os.stat(image).st_blocks * 512 <= 64 * 1024**2  # what the host really gave: at most the limit
    assert sh(host, handle, "rm -f /repo/fill /tmp/big && echo ok").output == "ok\n"  # usable again
    host.close(handle)
    if host.disk.mode == "loop":
        assert not os.path.exists(image)
        assert handle.id not in Path("/proc/self/mounts").read_text()


def test_commands_run_unprivileged_by_default(host):
    handle = host.create("ep-user", host.settings.default_image, workdir="/repo")
    assert handle.data["user"] == "1000:1000"
    assert sh(host, handle, "id -u; id -g").output == "1000\n1000\n"
    status = dict(line.split(":\t", 1) for line in sh(host, handle, "cat /proc/self/status").output.splitlines())
    assert status["CapEff"].strip() == "0000000000000000"
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"  # seccomp filter mode
    assert sh(host, handle, 'echo x > "$HOME/f" && touch /repo/a && echo ok').output == "ok\n"
    assert sh(host, handle, "touch /etc/x").exit_code != 0
    assert sh(host, handle, "touch /tmp/f && chown 0 /tmp/f").exit_code != 0
    r = sh(host, handle, "python3 -c 'import os; os.setuid(0)'")
    assert r.exit_code != 0 and "PermissionError" in r.output
    # a setuid copy of a shell gives nothing: it belongs to the user, and no-new-privileges holds
    r = sh(host, handle, "cp /bin/bash /tmp/sb && chmod u+s /tmp/sb && /tmp/sb -p -c 'id -u'")
    assert r.output.strip().splitlines()[-1] == "1000"
    host.put_files(handle, {"/repo/sub/dir/f.py": "x = 1\n", "/tmp/megaflow-eval/p": "patch"})
    r = sh(host, handle, "stat -c %u /repo/sub/dir/f.py /repo/sub /tmp/megaflow-eval && touch /repo/sub/new")
    assert r.output.split() == ["1000"] * 3 and r.exit_code == 0
    # the evaluation's pattern: the user writes its log beside files put there
    assert sh(host, handle, "echo log > /tmp/megaflow-eval/test.log && echo ok").output == "ok\n"
    assert host.get_file(handle, "/tmp/megaflow-eval/test.log") == b"log\n"


def test_root_only_when_asked_and_with_package_install_caps_only(host):
    handle = host.create("ep-root", host.settings.default_image, user="root")
    assert sh(host, handle, "id -u").output == "0\n"
    mask = int(sh(host, handle, "grep CapEff /proc/self/status").output.split()[1], 16)
    assert mask == sum(1 << CAP_BITS[c] for c in PACKAGE_INSTALL_CAPS)
    # what package installs need works: ownership, and dropping to another user (apt's _apt)
    r = sh(host, handle, "touch /etc/x && chown 42 /etc/x && python3 -c 'import os; os.setgid(65534); os.setuid(42)'")
    assert r.exit_code == 0, r.output
    for probe in (
        "mount -t tmpfs none /mnt",
        "unshare --mount true",
        "mknod /tmp/dev c 1 3",
        "date -s '2001-01-01'",
        "ip link add x type dummy 2>&1 || echo refused",
    ):
        r = sh(host, handle, probe)
        assert r.exit_code != 0 or "refused" in r.output, f"{probe!r} was allowed: {r.output}"
    # a plain exec can still ask for the unprivileged user
    assert sh(host, handle, "id -u", user="1000").output == "1000\n"


def test_no_secrets_or_settings_in_the_container_environment(host):
    handle = host.create("ep-env", host.settings.default_image)
    out = sh(host, handle, "env; cat /proc/1/environ | tr '\\0' '\\n'").output
    assert "MEGAFLOW_" not in out and "redis://" not in out and host.settings.redis_url not in out


def test_a_command_that_ignores_sigterm_is_killed_at_its_limit(host):
    handle = host.create("ep-term", host.settings.default_image)
    r = host.execute(handle, "trap '' TERM; echo started; sleep 30", timeout=1)
    assert r.timed_out and r.exit_code == 137 and r.output == "started\n" and r.duration_s < 15


@pytest.mark.parametrize("kind", ["fix", "noop"])
def test_demo_episode_as_the_unprivileged_user(host, kind):
    """Set-up, the agent's commands and the evaluation all work as the default user (workdir given at create)."""
    import re
    import types

    from megaflow.core.spec import TaskSpec
    from megaflow.demo_tasks import demo_specs
    from megaflow.services.sandbox import setup as _setup

    spec = TaskSpec.model_validate(demo_specs(kind, grading="exit_code")[0])
    rt = types.SimpleNamespace(env_host=host, settings=host.settings)
    handle = host.create("ep-demo", host.settings.default_image, workdir=spec.workdir)
    _setup(rt, handle, spec)
    for reply in spec.model.replies:
        m = re.search(r"```bash\n(.*?)\n```", reply, re.DOTALL)
        if m:
            r = host.execute(handle, m[1], workdir=spec.workdir)
            assert r.exit_code == 0, r.output
    host.put_files(handle, spec.eval.files)  # the tests, then the run whose exit status is the reward
    result = host.execute(handle, spec.eval.command, workdir=spec.workdir)
    assert (result.exit_code == 0) is (kind == "fix"), result.output
    assert sh(host, handle, f"stat -c %u {spec.workdir} {spec.workdir}/.git").output.split() == ["1000", "1000"]


def test_auto_mode_falls_back_when_docker_refuses_storage_opt(host):
    if host.client.info()["DriverStatus"][0][1] == "xfs":
        pytest.skip("Docker may accept storage-opt here")
    host.disk.mode  # noqa: B018 - resolve auto first
    host.disk._mode = "storage-opt"  # what auto picks on overlay2 over xfs; on this fs Docker refuses it
    handle = host.create("ep-fallback", host.settings.default_image)
    assert host.disk.mode == "loop"
    r = sh(host, handle, "fallocate -l 100M /tmp/x; echo rc=$?")
    assert "No space left on device" in r.output and "rc=1" in r.output


# --- read-only root (MEGAFLOW_CONTAINER_READ_ONLY) -------------------------------------------------
@pytest.fixture
def ro_host(docker_client, sandbox_image, settings, redis_client):
    name = f"t-ro-{uuid.uuid4().hex[:8]}"
    s = settings.model_copy(
        update={"container_read_only": True, "container_disk": "32m", "container_writable_dirs": "/tmp,/repo"}
    )
    h = DockerHost(docker_client, s, name=name, redis_client=redis_client)
    yield h
    h.shutdown()
    for c in docker_client.api.containers(all=True, filters={"label": f"{L.HOST}={name}"}):
        h.remove_container(c["Id"])


def test_read_only_root_with_uploads_into_the_writable_dirs(ro_host, docker_client):
    from megaflow.core.errors import TaskError

    handle = ro_host.create("ep-ro", ro_host.settings.default_image, workdir="/repo/pkg")
    assert docker_client.api.inspect_container(handle.id)["HostConfig"]["ReadonlyRootfs"] is True
    for path in ("/etc/x", "/usr/local/bin/x", "/x"):
        r = sh(ro_host, handle, f"touch {path}; echo rc=$?")
        assert "Read-only file system" in r.output and "rc=1" in r.output, r.output
    ro_host.put_files(handle, {"/repo/pkg/sub/a.py": "print('hi')\n", "/tmp/b.sh": "#!/bin/sh\necho b\n"})
    r = sh(
        ro_host,
        handle,
        "cd /repo/pkg && python3 sub/a.py && /tmp/b.sh && stat -c '%u:%g' sub/a.py sub /tmp/b.sh && id -u",
    )
    assert r.output.split() == ["hi", "b", "1000:1000", "1000:1000", "1000:1000", "1000"], r.output
    assert ro_host.get_file(handle, "/repo/pkg/sub/a.py") == b"print('hi')\n"
    r = sh(ro_host, handle, "echo x > $HOME/.rc && mkdir -p /repo/new && echo ok")
    assert r.output == "ok\n", r.output  # HOME and the work dirs are the user's
    with pytest.raises(TaskError, match="read-only"):
        ro_host.put_files(handle, {"/etc/evil.conf": "x"})
    assert "No such file" in sh(ro_host, handle, "cat /etc/evil.conf").output
    with pytest.raises(TaskError, match="does not exist"):
        ro_host.get_file(handle, "/repo/none")
    with pytest.raises(TaskError, match="not a regular file"):
        ro_host.get_file(handle, "/repo/pkg/sub")
    r = sh(ro_host, handle, "fallocate -l 64m /repo/big; echo rc=$?")
    assert "No space left on device" in r.output and "rc=1" in r.output  # each writable dir: container_disk
    ro_host.close(handle)


def test_read_only_root_refuses_a_workdir_outside_the_writable_dirs(ro_host, docker_client):
    from megaflow.core.errors import TaskError

    with pytest.raises(TaskError, match="MEGAFLOW_CONTAINER_WRITABLE_DIRS"):
        ro_host.create("ep-ro-bad", ro_host.settings.default_image, workdir="/opt/work")
    left = docker_client.api.containers(all=True, filters={"label": f"{L.HOST}={ro_host.name}"})
    assert left == []  # the container it booted is removed
