"""Containers on one Docker engine: boot with limits and labels, plain ``docker exec``, files, remove.

Every container runs with CPU / memory / pids limits, no network unless asked, no privileges
and no Docker socket (only the model gateway's socket directory, read-only, see gateway_socket.py),
carries MegaFlow labels, and has a dead-man's switch: its main process is
``sleep LIFETIME`` under docker-init, so it ends by itself even if every MegaFlow process dies.
A plain exec runs the command under coreutils ``timeout -k`` in its own process group, kills
whatever is left in that group afterwards, and caps the output (head and tail kept).
"""

from __future__ import annotations

import io
import re
import socket
import tarfile
import threading
import time
import uuid

from megaflow.core.errors import InfraError, RetryableInfraError, TaskError
from megaflow.env_hosts import labels as L
from megaflow.env_hosts.base import ExecResult, OutputCap
from megaflow.env_hosts.errors import ContainerLostError, ImageMissingError, docker_errors

KILL_GRACE_S = 5  # SIGKILL this long after SIGTERM when a command runs past its limit
CLIENT_SLACK_S = 15  # the client gives up on an exec stream this long after the in-container limit
LEASE_MARGIN_S = 60  # the lease label lapses this long after the container's main process ends
_NAME_OK = re.compile(r"[^a-zA-Z0-9_.-]+")

# Runs "$2" under coreutils timeout (its own process group), then SIGKILLs whatever is left in
# that group, so a fork bomb or a stray background job cannot outlive its command. The kill is
# a builtin: it works even when the pids limit is exhausted. stderr joins stdout (in order).
_WRAPPER = (
    f'timeout -k {KILL_GRACE_S} "$1" bash -lc "$2" & p=$!; wait $p 2>/dev/null; rc=$?; '
    "kill -9 -- -$p 2>/dev/null; kill -9 -- -$p 2>/dev/null; exit $rc"
)


# Root in a container keeps only what package installs need (dpkg/apt/pip: owners, modes, dropping
# to the _apt user, signalling its own children); an unprivileged user has no capabilities at all.
PACKAGE_INSTALL_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETUID", "SETGID", "KILL")
HOME = "/home/megaflow"  # HOME of an unprivileged command user (created at boot, owned by that user)


def parse_user(user: str) -> tuple[int, int]:
    """``"root"`` / ``"UID"`` / ``"UID:GID"`` -> (uid, gid)."""
    if user in ("root", "0", "0:0"):
        return 0, 0
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def user_env(user: str, env: dict | None) -> dict[str, str] | None:
    """The exec environment: HOME for an unprivileged user (it has no passwd entry), then ``env``."""
    out = {} if parse_user(user)[0] == 0 else {"HOME": HOME, "USER": "megaflow"}
    out.update({k: str(v) for k, v in (env or {}).items()})
    return out or None


def container_name(host: str, tag: str) -> str:
    """A unique, Docker-safe container name for ``host`` and a tag (episode id or "warm")."""
    return _NAME_OK.sub("-", f"mf-{host}-{tag}")[:100] + "-" + uuid.uuid4().hex[:6]


def timed_out(code: int | None, duration: float, timeout: float) -> bool:
    """124: timeout sent TERM; 137: it had to KILL. Only count them when the limit really passed."""
    return code in (124, 137) and duration >= timeout * 0.95


class Containers:
    """Create, exec in, copy files to/from and remove containers of one env host."""

    def __init__(self, docker_client, settings, host: str, images, disk):
        self.client = docker_client
        self.settings = settings
        self.host = host
        self.images = images  # ImageCache: told when a create finds its image missing
        self.disk = disk  # DiskLimit: the writable layer's size limit
        self._boot_slots = threading.BoundedSemaphore(settings.boot_concurrency)
        self._boot_api = None

    def _boot_client(self):
        if self._boot_api is None:
            from megaflow.env_hosts.images import api_with_timeout

            self._boot_api = api_with_timeout(self.client, self.settings.boot_timeout_s)
        return self._boot_api

    def boot(
        self,
        image: str,
        labels: dict[str, str],
        *,
        lifetime: float,
        network: bool,
        name: str,
        auto_remove: bool = False,
        user: str = "root",
    ) -> tuple[str, str, float]:
        """Create and start one container within the boot deadline; returns (id, name, lease expiry).

        Its main process runs as ``user``; an unprivileged user gets its HOME before the start.
        """
        s = self.settings
        expiry = time.time() + lifetime + LEASE_MARGIN_S
        labels = {
            **labels,
            L.MANAGED: "1",
            L.FLEET: s.fleet_id,
            L.HOST: self.host,
            L.IMAGE: image,
            L.LEASE_EXPIRY: f"{expiry:.0f}",
        }
        labels.setdefault(L.EPISODE, "")
        if not self._boot_slots.acquire(timeout=s.boot_timeout_s):
            raise RetryableInfraError(
                f"boot: {s.boot_concurrency} containers already booting on {self.host} for {s.boot_timeout_s:.0f}s"
            )
        api = self._boot_client()
        cid = None
        try:
            with docker_errors(f"boot of {image} on {self.host}", missing=InfraError):
                cid = self._create(
                    api,
                    image,
                    labels,
                    lifetime=lifetime,
                    network=network,
                    name=name,
                    auto_remove=auto_remove,
                    user=user,
                )
                self.disk.attach(cid)
                if (
                    parse_user(user)[0] != 0 and not self.settings.container_read_only
                ):  # else HOME is a tmpfs of its own
                    self.make_dirs(cid, [HOME], user)
                api.start(cid)
        except InfraError as exc:
            self.images.mark_missing(image)
            if cid is not None:
                self.remove(cid)
            if cid is None and "no such image" in str(exc).lower():
                raise ImageMissingError(f"boot of {image} on {self.host}: image missing ({exc})") from exc
            raise
        finally:
            self._boot_slots.release()
        return cid, name, expiry

    def writable_dirs(self) -> list[str]:
        """The tmpfs dirs of a read-only root (container_writable_dirs plus HOME); [] when the root is writable."""
        if not self.settings.container_read_only:
            return []
        dirs = [d.strip().rstrip("/") or "/" for d in self.settings.container_writable_dirs.split(",") if d.strip()]
        return list(dict.fromkeys([*dirs, HOME]))

    def _tmpfs(self, user: str) -> dict[str, str] | None:
        """tmpfs mounts of a read-only root, owned by ``user``, each ``container_disk`` in size; sticky and
        open to all (like /tmp), so a warm container can serve another user (an exec never gets capabilities
        that would let root write into a user's directory)."""
        dirs = self.writable_dirs()
        if not dirs:
            return None
        uid, gid = parse_user(user)
        size = self.disk.size
        opts = f"rw,exec,nosuid,nodev,uid={uid},gid={gid}" + (f",size={size}" if size else "")
        return {d: opts + ",mode=1777" for d in dirs}

    def _create(
        self,
        api,
        image: str,
        labels: dict[str, str],
        *,
        lifetime: float,
        network: bool,
        name: str,
        auto_remove: bool,
        user: str,
    ) -> str:
        """``docker create`` with the limits; retried once without storage-opt when auto mode finds it refused."""
        import docker.errors

        from megaflow.env_hosts.gateway_socket import binds

        s = self.settings
        gateway = binds(s, self.host)  # the gateway's socket directory, read-only: no route out
        for attempt in (1, 2):
            host_config = api.create_host_config(
                binds=gateway,
                nano_cpus=int(s.container_cpus * 1e9),
                mem_limit=s.container_memory,
                memswap_limit=s.container_memory,
                pids_limit=s.container_pids,
                network_mode="bridge" if network else "none",
                privileged=False,
                init=True,
                auto_remove=auto_remove,
                security_opt=["no-new-privileges"],
                cap_drop=["ALL"],
                cap_add=list(PACKAGE_INSTALL_CAPS),
                storage_opt=self.disk.storage_opt(),
                read_only=self.settings.container_read_only,
                tmpfs=self._tmpfs(user),
            )
            try:
                return api.create_container(
                    image,
                    ["sleep", str(int(lifetime))],
                    name=name,
                    labels=labels,
                    host_config=host_config,
                    working_dir="/",
                    stdin_open=False,
                    network_disabled=not network,
                    user=user,
                )["Id"]
            except docker.errors.APIError as exc:
                if attempt == 2 or not self.disk.refused(str(exc)):
                    raise
        raise AssertionError("unreachable")

    def exec(
        self,
        cid: str,
        command: str,
        *,
        timeout: float,
        workdir: str | None = None,
        env: dict | None = None,
        user: str = "root",
    ) -> ExecResult:
        """Run ``bash -lc command`` as ``user`` through a plain ``docker exec`` under the in-container time limit."""
        argv = ["bash", "-c", _WRAPPER, "megaflow-exec", f"{timeout:g}s", "exec 2>&1\n" + command]
        api = self.client.api
        cap = OutputCap(self.settings.output_cap_bytes)
        started = time.monotonic()
        deadline = started + timeout + KILL_GRACE_S + CLIENT_SLACK_S
        client_gave_up = False
        with docker_errors(f"exec in {cid[:12]}"):
            exec_id = api.exec_create(
                cid,
                argv,
                stdout=True,
                stderr=True,
                workdir=workdir,
                environment=user_env(user, env),
                user=user,
            )["Id"]
            sock = api.exec_start(exec_id, socket=True)
            raw = getattr(sock, "_sock", sock)
            try:
                client_gave_up = not _read_frames(raw, cap, deadline)
            finally:
                sock.close()
            info = api.exec_inspect(exec_id)
        duration = time.monotonic() - started
        code = None if info.get("Running") else info.get("ExitCode")
        if code is None and not client_gave_up:
            self.check_running(cid)
        return ExecResult(
            exit_code=code,
            output=cap.text(),
            timed_out=client_gave_up or timed_out(code, duration, timeout),
            duration_s=round(duration, 4),
            truncated=cap.truncated,
        )

    def state(self, cid: str) -> dict:
        """Docker's ``State`` of the container (raises ContainerLostError when it is gone)."""
        with docker_errors(f"inspect {cid[:12]}"):
            return self.client.api.inspect_container(cid)["State"]

    def check_running(self, cid: str) -> None:
        """Raise ContainerLostError unless the container runs."""
        state = self.state(cid)
        if not state.get("Running"):
            raise ContainerLostError(
                f"container {cid[:12]} stopped ({state.get('Status')}, "
                f"OOMKilled={state.get('OOMKilled')}, exit {state.get('ExitCode')})"
            )

    def make_dirs(self, cid: str, dirs: list[str], user: str) -> None:
        """Create ``dirs`` (absolute) owned by ``user``; an existing one is handed to the user (not its contents)."""
        uid, gid = parse_user(user)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for d in dirs:
                tar.addfile(_dir_entry(d, uid, gid))
        self._put_archive(cid, buf.getvalue(), f"make_dirs {', '.join(dirs)}", user)

    def _put_archive(self, cid: str, data: bytes, what: str, user: str) -> None:
        """Unpack a tar at ``/``: Docker's put_archive, or on a read-only root (which Docker refuses) ``tar -x``
        run as ``user`` through an exec, so the files land in the writable tmpfs dirs, owned by that user."""
        if not self.settings.container_read_only:
            with docker_errors(f"{what} in {cid[:12]}"):
                ok = self.client.api.put_archive(cid, "/", data)
            if not ok:
                raise InfraError(f"{what} into {cid[:12]}: Docker refused the archive")
            return
        api = self.client.api
        cap = OutputCap(64 * 1024)
        with docker_errors(f"{what} in {cid[:12]}"):
            exec_id = api.exec_create(
                cid,
                ["tar", "-x", "--no-same-owner", "--no-overwrite-dir", "-C", "/", "-f", "-"],
                stdin=True,
                stdout=True,
                stderr=True,
                user=user,
            )["Id"]
            sock = api.exec_start(exec_id, socket=True)
            raw = getattr(sock, "_sock", sock)
            try:
                raw.sendall(data)
                raw.shutdown(socket.SHUT_WR)
                finished = _read_frames(raw, cap, time.monotonic() + 60 + len(data) / 1e6)
            finally:
                sock.close()
            code = api.exec_inspect(exec_id).get("ExitCode")
        if not finished or code != 0:
            self.check_running(cid)
            writable = ", ".join(self.writable_dirs())
            raise TaskError(
                f"{what}: the container's root is read-only (MEGAFLOW_CONTAINER_READ_ONLY) and only {writable} "
                f"are writable (MEGAFLOW_CONTAINER_WRITABLE_DIRS); tar said: {cap.text().strip()[-300:] or code}"
            )

    def put_files(
        self, cid: str, files: dict[str, str | bytes], *, user: str = "root", writable: tuple[str, ...] = ()
    ) -> None:
        """Write files (absolute path -> content) into the container as one tar archive, owned by ``user``.

        Missing directories below one of ``writable`` (the user's own directories) are created owned
        by the user too, so that it can add files beside them later.
        """
        uid, gid = parse_user(user)
        for path in files:
            if not path.startswith("/"):
                raise TaskError(f"put_files: path must be absolute, got {path!r}")
        dirs: set[str] = set()
        for path in files:
            root = next((w.rstrip("/") for w in writable if uid and path.startswith(w.rstrip("/") + "/")), None)
            parent = path.rsplit("/", 1)[0]
            while root is not None and len(parent) > len(root) and parent not in dirs:
                dirs.add(parent)
                parent = parent.rsplit("/", 1)[0]
        buf = io.BytesIO()
        now = time.time()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for d in sorted(dirs):
                tar.addfile(_dir_entry(d, uid, gid))
            for path, content in files.items():
                data = content.encode() if isinstance(content, str) else bytes(content)
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size, info.mtime, info.uid, info.gid = len(data), now, uid, gid
                info.mode = 0o755 if data.startswith(b"#!") else 0o644
                tar.addfile(info, io.BytesIO(data))
        self._put_archive(cid, buf.getvalue(), "put_files", user)

    def get_file(self, cid: str, path: str) -> bytes:
        """Read one regular file from the container; a missing path is a TaskError."""
        import docker.errors

        if self.settings.container_read_only:  # Docker cannot read a tmpfs from outside: cat it through an exec
            return self._cat(cid, path)

        with docker_errors(f"get_file from {cid[:12]}"):
            try:
                stream, _ = self.client.api.get_archive(cid, path)
            except docker.errors.NotFound as exc:
                self.check_running(cid)  # a gone container is an infra error
                raise TaskError(f"get_file: {path} does not exist in the container") from exc
            data = b"".join(stream)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.next()
            f = tar.extractfile(member) if member is not None and member.isfile() else None
            if f is None:
                raise TaskError(f"get_file: {path} is not a regular file")
            return f.read()

    def _cat(self, cid: str, path: str) -> bytes:
        api = self.client.api
        script = 'if [ ! -e "$1" ]; then exit 3; elif [ ! -f "$1" ]; then exit 4; fi; exec cat -- "$1"'
        with docker_errors(f"get_file from {cid[:12]}"):
            exec_id = api.exec_create(cid, ["sh", "-c", script, "get_file", path], stdout=True, stderr=True)["Id"]
            out, err = api.exec_start(exec_id, demux=True)
            code = api.exec_inspect(exec_id).get("ExitCode")
        if code == 0:
            return out or b""
        self.check_running(cid)
        if code == 3:
            raise TaskError(f"get_file: {path} does not exist in the container")
        if code == 4:
            raise TaskError(f"get_file: {path} is not a regular file")
        raise TaskError(f"get_file: cannot read {path}: {(err or b'').decode(errors='replace').strip()[-300:]}")

    def remove(self, cid: str) -> bool:
        """Force-remove the container and its anonymous volumes; False when it was already gone."""
        import docker.errors

        try:
            with docker_errors(f"remove {cid[:12]}"):
                try:
                    self.client.api.remove_container(cid, force=True, v=True)
                    return True
                except docker.errors.NotFound:
                    return False
                except docker.errors.APIError as exc:
                    if exc.status_code == 409 and "already in progress" in str(exc):
                        return False
                    raise
        except ContainerLostError:
            return False
        finally:
            self.disk.release(cid)

    def list_all_ids(self) -> set[str]:
        """Ids of every container of this engine (any owner)."""
        with docker_errors("list containers"):
            return {c["Id"] for c in self.client.api.containers(all=True, quiet=True)}

    def list_mine(self) -> list[dict]:
        """MegaFlow containers of this host and fleet (running or not), as Docker lists them."""
        with docker_errors("list containers"):
            return self.client.api.containers(
                all=True,
                filters={"label": [f"{L.HOST}={self.host}", f"{L.FLEET}={self.settings.fleet_id}", f"{L.MANAGED}=1"]},
            )


def _dir_entry(path: str, uid: int, gid: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path.strip("/"))
    info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, 0o755, uid, gid, time.time()
    return info


def _read_frames(raw: socket.socket, cap: OutputCap, deadline: float) -> bool:
    """Read Docker's multiplexed exec stream (8-byte frame headers) into ``cap`` until EOF.

    Returns False when ``deadline`` passed first (a process inside kept the stream open).
    """
    buf = b""
    need = 8
    header = True
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        raw.settimeout(min(remaining, 5.0))
        try:
            chunk = raw.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            return True
        buf += chunk
        while len(buf) >= need:
            if header:
                need = int.from_bytes(buf[4:8], "big")
                buf = buf[8:]
                header = False
                if need == 0:
                    need, header = 8, True
            else:
                cap.feed(buf[:need])
                buf = buf[need:]
                need, header = 8, True
