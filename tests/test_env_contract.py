"""The EnvHost contract, one fixture parametrised over every backend: docker, sim, and a third-party one.

The third-party backend (``CliDockerHost`` below) lives in this module and is loaded by dotted path
through ``load_env_host``, like a user's Kubernetes or remote-sandbox backend would be.
"""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from pydantic import BaseModel, ConfigDict, Field

from megaflow.core.errors import ConfigError, InfraError, TaskError
from megaflow.core.settings import Settings
from megaflow.env_hosts import EnvHandle, EnvHost, ExecResult, OutputCap, load_env_host, shell
from megaflow.env_hosts import labels as L
from megaflow.env_hosts.config import validate_env_config
from megaflow.env_hosts.errors import ContainerLostError

BIG = "echo FIRST; head -c 200000 /dev/zero | tr '\\0' x; echo; echo LAST"


class CliDockerHost:
    """A tiny third-party backend: containers through the `docker` command line, nothing of MegaFlow's Docker code."""

    backend = "cli-docker"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        type: str = Field(description="The dotted path of this class.")
        image: str = Field("megaflow-sandbox:latest", description="Image used when create names none.")

    def __init__(self, config, *, settings, name, redis=None, keys=None):
        self.config, self.settings, self.name = config, settings, name

    def _docker(self, *args: str, timeout: float = 60, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=timeout, check=False)

    def create(
        self, episode_id, image, *, labels=None, mode="ephemeral", network=False, user=None, workdir=None
    ) -> EnvHandle:
        p = self._docker(
            "run",
            "-d",
            "--init",
            "--network",
            "none",
            "--label",
            f"{L.HOST}={self.name}",
            image or self.config.image,
            "sleep",
            "600",
        )
        if p.returncode:
            raise InfraError(f"docker run: {p.stderr.decode()}")
        if workdir:
            self._docker("exec", p.stdout.decode().strip(), "mkdir", "-p", workdir)
        return EnvHandle(self.backend, self.name, p.stdout.decode().strip(), episode_id, image, mode)

    def execute(self, handle, command, *, timeout=None, workdir=None, env=None) -> ExecResult:
        h = EnvHandle.coerce(handle)
        timeout = timeout or self.settings.command_timeout_s
        args = [
            "exec",
            *(["-w", workdir] if workdir else []),
            *[f"-e{k}={v}" for k, v in (env or {}).items()],
            h.id,
            "timeout",
            "-k",
            "2",
            f"{timeout:g}s",
            "bash",
            "-lc",
            "exec 2>&1\n" + command,
        ]
        started = time.monotonic()
        p = self._docker(*args, timeout=timeout + 30)
        if b"No such container" in p.stderr or b"is not running" in p.stderr:
            raise ContainerLostError(f"{h.id[:12]} is gone")
        text, truncated = OutputCap.apply(p.stdout + p.stderr, self.settings.output_cap_bytes)
        duration = time.monotonic() - started
        return ExecResult(p.returncode, text, p.returncode in (124, 137), round(duration, 4), truncated)

    def put_files(self, handle, files) -> None:
        for path, content in files.items():
            if not path.startswith("/"):
                raise TaskError(f"put_files: path must be absolute, got {path!r}")
            data = content.encode() if isinstance(content, str) else content
            d = path.rsplit("/", 1)[0] or "/"
            cmd = f"mkdir -p '{d}' && cat > '{path}'"
            p = self._docker("exec", "-i", EnvHandle.coerce(handle).id, "sh", "-c", cmd, stdin=data)
            if p.returncode:
                raise InfraError(p.stderr.decode())

    def get_file(self, handle, path) -> bytes:
        p = self._docker("exec", EnvHandle.coerce(handle).id, "cat", path)
        if p.returncode:
            raise TaskError(f"get_file: {path}: {p.stderr.decode().strip()}")
        return p.stdout

    def open_session(self, handle, *, workdir=None, env=None) -> str:
        sid = shell.new_session_id()
        self.execute(handle, shell.open_script(sid, workdir, env))
        return sid

    def run_in_session(self, handle, session_id, command, *, timeout=None) -> ExecResult:
        return self.execute(handle, shell.wrap(session_id, command), timeout=timeout)

    def close_session(self, handle, session_id) -> None:
        self.execute(handle, shell.close_script(session_id))

    def close(self, handle) -> None:
        self._docker("rm", "-f", EnvHandle.coerce(handle).id)

    def has_image(self, image) -> bool:
        return self._docker("image", "inspect", image).returncode == 0

    def ensure_image(self, image) -> None:
        if not self.has_image(image):
            raise InfraError(f"{image} is missing")

    def report(self) -> dict:
        return {"host": self.name, "capacity": 4, "images": [], "warm": {}, "disk_free_gb": 1.0}

    def maintain(self, is_live=None) -> dict:
        return {"reaped": []}

    def shutdown(self) -> None:
        ids = self._docker("ps", "-aq", "--filter", f"label={L.HOST}={self.name}").stdout.decode().split()
        if ids:
            self._docker("rm", "-f", *ids)


SIM = {
    "type": "sim",
    "seed": 7,
    "boot_latency_s": {"dist": "uniform", "low": 0.0, "high": 0.01},
    "rules": [
        {"match": r"^sleep 30$", "latency_s": 30},
        {"match": r"head -c 200000", "output": "FIRST\n" + "x" * 200000 + "\nLAST\n"},
        {"match": r"echo out; echo err >&2; exit 3", "exit_code": 3, "output": "out\nerr\n"},
    ],
}


@pytest.fixture(
    params=[
        pytest.param("docker", marks=pytest.mark.docker),
        pytest.param("sim", marks=pytest.mark.unit),
        pytest.param("third-party", marks=pytest.mark.docker),
    ]
)
def env(request, tmp_path):
    """(host, image) of one backend, built by load_env_host from settings.env_backend."""
    kind = request.param
    image = "megaflow-sandbox:latest"
    if kind != "sim":
        request.getfixturevalue("sandbox_image")  # skips without a Docker engine
    config = {
        "docker": {"type": "docker", "sessions": False},
        "sim": SIM,
        "third-party": {"type": f"{__name__}:CliDockerHost"},
    }[kind]
    settings = Settings.load(
        state_dir=str(tmp_path), output_cap_bytes=1024, env_backend=config, container_memory="256m", container_cpus=0.5
    )
    host = load_env_host(settings, name=f"t-contract-{uuid.uuid4().hex[:8]}")
    assert isinstance(host, EnvHost)
    yield host, image
    host.shutdown()
    if kind == "docker":
        for c in host.containers.list_mine():
            host.remove_container(c["Id"])


def test_create_exec_close(env):
    host, image = env
    handle = host.create("ep-c1", image, labels={"run": "b1"})
    assert (handle.host, handle.episode_id, handle.image, handle.mode) == (host.name, "ep-c1", image, "ephemeral")
    assert EnvHandle.from_json(handle.to_json()) == handle
    r = host.execute(handle, "echo out; echo err >&2; exit 3", timeout=10)
    assert (r.exit_code, r.output, r.timed_out, r.truncated) == (3, "out\nerr\n", False, False)
    r = host.execute(handle.to_json(), 'pwd; echo "$A"', timeout=10, workdir="/tmp", env={"A": 1})
    assert (r.exit_code, r.output) == (0, "/tmp\n1\n")
    assert host.has_image(image)
    host.close(handle)
    host.close(handle)  # idempotent
    with pytest.raises(ContainerLostError):
        host.execute(handle, "true", timeout=5)


def test_time_limit_and_output_cap(env):
    host, image = env
    handle = host.create("ep-c2", image)
    r = host.execute(handle, "sleep 30", timeout=1)
    assert r.timed_out and r.exit_code == 124 and r.duration_s < 15
    r = host.execute(handle, BIG, timeout=20)
    assert r.exit_code == 0 and r.truncated
    assert r.output.startswith("FIRST\n") and r.output.endswith("LAST\n")
    assert "bytes of output omitted" in r.output and len(r.output) < 1200
    host.close(handle)


def test_files_round_trip(env):
    host, image = env
    handle = host.create("ep-c3", image)
    blob = bytes(range(256)) * 64
    host.put_files(handle, {"/work/deep/dir/data.bin": blob, "/tmp/note.txt": "héllo\n"})
    assert host.get_file(handle, "/work/deep/dir/data.bin") == blob
    assert host.get_file(handle, "/tmp/note.txt") == "héllo\n".encode()
    assert host.execute(handle, "cat /tmp/note.txt", timeout=10).output == "héllo\n"
    with pytest.raises(TaskError):
        host.get_file(handle, "/work/missing.txt")
    with pytest.raises(TaskError):
        host.put_files(handle, {"relative.txt": "x"})
    host.close(handle)


def test_sessions_keep_state(env):
    host, image = env
    handle = host.create("ep-c4", image, workdir="/work")
    one = host.open_session(handle, workdir="/tmp")
    two = host.open_session(handle, env={"B": "b"})
    assert host.run_in_session(handle, one, "cd /work && export A=7", timeout=10).exit_code == 0
    r = host.run_in_session(handle, one, 'pwd; echo "$A"', timeout=10)
    assert (r.exit_code, r.output) == (0, "/work\n7\n")
    r = host.run_in_session(handle, two, 'pwd; echo "$A$B"', timeout=10)
    assert r.output == "/\nb\n"  # sessions are independent
    assert host.execute(handle, 'pwd; echo "$A"', timeout=10).output == "/\n\n"  # plain exec: a fresh shell
    host.close_session(handle, one)
    assert host.run_in_session(handle, one, "pwd", timeout=10).exit_code == 127
    host.close(handle)


def test_report_and_maintain(env):
    host, image = env
    report = host.report()
    assert {"host", "capacity", "images", "warm", "disk_free_gb"} <= set(report) and report["host"] == host.name
    handle = host.create("ep-c5", image)
    counts = host.maintain(lambda episode_id: episode_id != "ep-c5")
    assert isinstance(counts, dict)
    if handle.backend != "cli-docker":  # the tiny third-party backend keeps no labels to reap by
        assert handle.id in counts["reaped"]
        with pytest.raises(ContainerLostError):
            host.execute(handle, "true", timeout=5)
    host.close(handle)


def test_bad_backend_configs_name_the_field():
    for bad, field in [
        ({"type": "sim", "rules": [{"match": "("}]}, "env_backend.rules.0.match"),
        ({"type": "sim", "boot_latency_s": {"dist": "gamma"}}, "env_backend.boot_latency_s"),
        ({"type": "docker", "sesions": True}, "env_backend.sesions"),
        ({"type": "nosuchpkg.mod:Host"}, "env_backend.type"),
        ({"type": f"{__name__}:CliDockerHost", "imag": "x"}, "env_backend.imag"),
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate_env_config(bad)
    with pytest.raises(ValueError, match="env_backend"):
        Settings.load(env_backend={"typ": "sim"})


def test_a_stopped_docker_engine_fails_the_heartbeat_report():
    """With its engine down, an env host's report raises: its heartbeat lapses and the host is marked lost."""
    import docker

    from megaflow.core.errors import InfraError
    from megaflow.core.settings import Settings
    from megaflow.env_hosts.docker_host import DockerHost

    dead = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", timeout=3, version="1.43")
    host = DockerHost(dead, Settings.load(), name="engine-down")
    with pytest.raises(InfraError, match="Docker engine"):
        host.report()
