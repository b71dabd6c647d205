"""Test hosts for deploy/ansible: small Debian "VMs" as Docker containers with systemd as PID 1.

    scripts/testhosts.py image                      build (once) the cached host image, print its tag
    scripts/testhosts.py up [--prefix P] [--env-hosts N] [--inventory DIR]   create the hosts, write an inventory
    scripts/testhosts.py down [--prefix P]          remove every host of that prefix

The image is a Debian 12 rootfs from ``mmdebstrap --variant=minbase`` (systemd, python3, sudo, ...)
turned into an image by ``docker import``, tagged ``megaflow-testhost:<hash of its recipe>`` so it is
built once and reused. Hosts run on the machine's network (every service port is an inventory
variable), without --privileged (refused here), and carry the label megaflow.testhost=<prefix>.
Env hosts get the machine's /var/run/docker.sock (see deploy/ansible/README.md for why).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"
# What a Debian cloud image has (apt bindings for Ansible, iproute2 for network facts) plus systemd.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "sudo",
    "python3",
    "python3-apt",
    "iproute2",
    "ca-certificates",
    "procps",
)
# Units a container cannot run (no consoles, no kernel modules, no clock to set), masked in the image.
MASKED = (
    "getty@tty1.service",
    "console-getty.service",
    "systemd-timesyncd.service",
    "systemd-modules-load.service",
    "sys-kernel-config.mount",
    "systemd-remount-fs.service",
)
RECIPE_VERSION = "1"  # bump when the build below changes
SOURCES = "/etc/apt/sources.list.d/debian.sources"
LABEL = "megaflow.testhost"
EXTRA_CAS = "/usr/local/share/ca-certificates"
RUN_ARGS = (
    "--network",
    "host",
    "--cap-add",
    "ALL",
    "--cap-drop",
    "SYS_RESOURCE",
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "--cgroupns=host",
    "-v",
    "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs",
    "/run",
    "--tmpfs",
    "/run/lock",
    "--tmpfs",
    "/tmp:exec",
    "-e",
    "container=docker",
    "--stop-signal",
    "SIGRTMIN+3",
)
# pip's wheel cache, shared by the hosts and kept between runs: a converge still runs a real
# `pip install` from PyPI inside each host, it just does not download the same wheels every time.
PIP_CACHE = Path(os.environ.get("MEGAFLOW_TESTHOST_CACHE", "/var/cache/megaflow-testhosts")) / "pip"


def _docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], check=False, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} failed: {proc.stderr.strip()[-2000:]}")
    return proc


def image_tag() -> str:
    """The cached image's tag: a hash of everything that goes into building it."""
    recipe = "\n".join(
        [RECIPE_VERSION, SUITE, *PACKAGES, *MASKED, Path(SOURCES).read_text() if os.path.exists(SOURCES) else ""]
    )
    return "megaflow-testhost:" + hashlib.sha256(recipe.encode()).hexdigest()[:12]


def ensure_image(echo=print) -> str:
    """Build the host image once (mmdebstrap + docker import); later calls reuse it by tag."""
    tag = image_tag()
    if _docker("image", "inspect", tag, check=False).returncode == 0:
        return tag
    exe = shutil.which("mmdebstrap")
    if not exe:
        raise RuntimeError("building the test host image needs mmdebstrap (apt-get install mmdebstrap)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="megaflow-testhost-") as tmp:
        tar = os.path.join(tmp, "rootfs.tar")
        cmd = [
            exe,
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            "--skip=cleanup/reproducible",
            '--customize-hook=chroot "$1" systemctl mask ' + " ".join(MASKED),
            '--customize-hook=rm -f "$1"/etc/machine-id && touch "$1"/etc/machine-id',
            SUITE,
            tar,
        ]
        if os.path.exists(SOURCES):
            cmd.append(SOURCES)
        echo(f"building {tag}: mmdebstrap {SUITE} with {','.join(PACKAGES)}")
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-3000:]}")
        _docker("import", "--change", 'CMD ["/sbin/init"]', "--change", "ENV container=docker", tar, tag, timeout=600)
    echo(f"built {tag} in {time.monotonic() - started:.0f}s")
    return tag


def container_name(prefix: str, host: str) -> str:
    return f"{prefix}-{host}"


def create(prefix: str, hosts: dict[str, bool], *, echo=print, boot_timeout_s: float = 120) -> list[str]:
    """Start one container per host (name -> gets the Docker socket); wait until systemd is up in each."""
    tag = ensure_image(echo)
    remove(prefix, echo=lambda m: None)
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    names = []
    for host, docker_socket in hosts.items():
        name = container_name(prefix, host)
        extra = ["-v", "/var/run/docker.sock:/var/run/docker.sock"] if docker_socket else []
        _docker(
            "run",
            "-d",
            "--name",
            name,
            "--label",
            f"{LABEL}={prefix}",
            *RUN_ARGS,
            "-v",
            f"{PIP_CACHE}:/root/.cache/pip",
            *extra,
            tag,
            "/sbin/init",
        )
        names.append(name)
    deadline = time.monotonic() + boot_timeout_s
    for name in names:
        while True:
            proc = _docker("exec", name, "systemctl", "is-system-running", check=False, timeout=30)
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = _docker("exec", name, "systemctl", "--failed", "--no-legend", check=False).stdout
                    echo(f"{name}: degraded: {failed.strip()}")
                # mmdebstrap left empty apt lists with a fresh mtime, which apt's cache_valid_time would trust.
                _docker("exec", name, "touch", "-d", "@0", "/var/lib/apt/lists")
                break
            if time.monotonic() > deadline:
                logs = _docker("logs", "--tail", "40", name, check=False)
                raise RuntimeError(
                    f"{name} did not boot in {boot_timeout_s:.0f}s (state {state!r}): "
                    f"{(logs.stdout + logs.stderr)[-2000:]}"
                )
            time.sleep(0.5)
    for name in names:
        trust_machine_cas(name)
    echo(f"booted {', '.join(names)}")
    return names


def trust_machine_cas(name: str) -> None:
    """Give a host the CA certificates this machine added to its own store (a TLS-inspecting egress proxy).

    Without them pip inside the host cannot reach PyPI from here; pip's vendored CA bundle is told to
    use the system store. A host on a network without such a proxy needs neither.
    """
    extra = sorted(Path(EXTRA_CAS).glob("*.crt")) if os.path.isdir(EXTRA_CAS) else []
    if not extra:
        return
    for crt in extra:
        _docker("cp", str(crt), f"{name}:{EXTRA_CAS}/{crt.name}")
    _docker(
        "exec",
        name,
        "sh",
        "-c",
        "update-ca-certificates >/dev/null && "
        "printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n' > /etc/pip.conf",
        timeout=60,
    )


def remove(prefix: str, *, echo=print) -> list[str]:
    """Remove every container labelled with ``prefix`` (running or not)."""
    ids = _docker("ps", "-aq", "--filter", f"label={LABEL}={prefix}").stdout.split()
    if ids:
        _docker("rm", "-f", "-v", *ids, timeout=180)
        echo(f"removed {len(ids)} test hosts ({prefix})")
    return ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_inventory(path: Path, prefix: str, env_hosts: list[str], *, control: str = "ctl") -> Path:
    """An inventory directory for the test hosts: hosts.yml plus group_vars/ (which win over group_vars/all.yml).

    The control host holds redis, flower, model, agent and control; each env host only its env worker.
    Every port is chosen free on this machine (the hosts share its network); passwords are random.
    """
    import yaml

    ctl = f"th-{control}"
    envs = {f"th-{h}": {"ansible_host": container_name(prefix, h)} for h in env_hosts}
    hosts = {ctl: {"ansible_host": container_name(prefix, control), "megaflow_metrics_port": _free_port()}}
    inventory = {
        "all": {
            "children": {
                "testhosts": {
                    "children": {
                        "redis": {"hosts": {ctl: None}},
                        "mongodb": {"hosts": {}},
                        "flower": {"hosts": {ctl: None}},
                        "model_hosts": {"hosts": {ctl: None}},
                        "agent_hosts": {"hosts": {ctl: None}},
                        "control": {"hosts": {ctl: hosts[ctl]}},
                        "env_hosts": {"hosts": envs},
                    }
                }
            }
        }
    }
    fleet = {
        # How Ansible reaches the hosts: `docker exec` (community.docker), as root.
        "ansible_connection": "community.docker.docker",
        "ansible_user": "root",
        "ansible_python_interpreter": "/usr/bin/python3",
        # One network for all: every address is loopback and every port is its own.
        "megaflow_address": "127.0.0.1",
        "redis_bind": "127.0.0.1",
        "redis_port": _free_port(),
        "redis_maxmemory": "256mb",
        "megaflow_flower_address": "127.0.0.1",
        "megaflow_flower_port": _free_port(),
        "megaflow_metrics_address": "127.0.0.1",
        # The machine's nofile hard limit is below 65536 and a container cannot raise it.
        "megaflow_limit_nofile": 16384,
        # Records: MongoDB's apt repository is unreachable here, so SQLite on the control host.
        "megaflow_metadata_store": "sqlite",
        "megaflow_host_capacity": 4,
        "megaflow_env_concurrency": 4,
        "megaflow_model_concurrency": 8,
        "megaflow_lease_s": 20,
        "megaflow_host_ttl_s": 15,
        "megaflow_sweep_interval_s": 5,
        "vault_redis_password": secrets.token_hex(16),
        "vault_flower_password": secrets.token_hex(8),
        "vault_metrics_password": secrets.token_hex(8),
        "vault_mongodb_password": secrets.token_hex(16),
        "vault_mongodb_admin_password": secrets.token_hex(16),
    }
    groups = {
        "testhosts": fleet,
        # No GPU and no model server here: the deterministic scripted backend answers model calls.
        "model_hosts": {"megaflow_model_backend": "scripted"},
        # The env workers drive the machine's Docker engine through its socket, mounted into each env host.
        "env_hosts": {"env_hosts_docker": "socket", "env_hosts_build_image": False},
    }
    (path / "group_vars").mkdir(parents=True, exist_ok=True)
    (path / "hosts.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    for group, values in groups.items():
        (path / "group_vars" / f"{group}.yml").write_text("---\n" + yaml.safe_dump(values, sort_keys=False))
    return path / "hosts.yml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["image", "up", "down"])
    ap.add_argument("--prefix", default="mf-th", help="Container name prefix and label value.")
    ap.add_argument("--env-hosts", type=int, default=2, help="Env hosts to create beside the control host.")
    ap.add_argument("--inventory", type=Path, default=None, help="Write an inventory for the hosts into this folder.")
    args = ap.parse_args(argv)
    if args.action == "image":
        print(ensure_image())
    elif args.action == "up":
        envs = [f"env{i + 1}" for i in range(args.env_hosts)]
        create(args.prefix, {"ctl": False, **{h: True for h in envs}})
        if args.inventory:
            print(write_inventory(args.inventory, args.prefix, envs))
    else:
        remove(args.prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
