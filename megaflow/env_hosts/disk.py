"""Per-container disk limit: a writable layer that ends in ENOSPC at ``container_disk``, whatever the driver.

Modes (``settings.container_disk_mode``):

- ``storage-opt``: Docker's own ``--storage-opt size=``. Works on overlay2 over xfs mounted with
  ``pquota`` (also btrfs, zfs, devicemapper); on overlay2 over ext4 Docker refuses it.
- ``loop``: between create and start, the container's overlay2 layer directory (upper + work dirs)
  is moved onto a sparse ext4 image of the limit's size, loop-mounted in its place. Every write
  of the container (root file system, /tmp, the work dir) lands there: ENOSPC at the limit, and
  the host loses at most the limit. Needs root in the host's mount namespace (what an env worker
  that talks to dockerd has anyway), ``mkfs.ext4`` and loop devices; overlay2 on any backing fs.
  ``docker rm`` unmounts it (the loop device is auto-cleared); the image file is deleted at close
  and by the upkeep sweep.
- ``auto``: ``storage-opt`` on overlay2 over xfs, else ``loop`` when possible, else ``off`` (logged).
- ``off``: no limit (the writable layer can fill the host's disk).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable

from megaflow.core.errors import ConfigError, InfraError

log = logging.getLogger(__name__)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """``"10g"`` -> bytes (docker's units: b, k, m, g, t; a trailing ``b`` allowed); ``""`` or ``"0"`` -> 0."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", (text or "0").lower())
    if not m:
        raise ConfigError(f"container_disk: {text!r} is not a size like 10g or 512m")
    return int(float(m[1]) * _UNITS[m[2]])


def _run(*argv: str, timeout: float = 60) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise InfraError(f"disk limit: `{' '.join(argv)}` failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")


class DiskLimit:
    """Applies ``settings.container_disk`` to this host's containers (see the module docstring for the modes)."""

    def __init__(self, docker_client, settings):
        self.client = docker_client
        self.settings = settings
        self.size = parse_size(settings.container_disk)
        self._mode: str | None = None
        self._dir: str | None = None
        self._lock = threading.Lock()

    # --- mode -----------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """The mode in force: storage-opt, loop or off (``auto`` resolved on first use)."""
        with self._lock:
            if self._mode is None:
                self._mode = self._resolve()
            return self._mode

    def _resolve(self) -> str:
        wanted = self.settings.container_disk_mode
        if self.size == 0 or wanted == "off":
            return "off"
        info = self.client.info()
        driver = info.get("Driver")
        backing = dict(info.get("DriverStatus") or []).get("Backing Filesystem", "")
        self._dir = self.settings.container_disk_dir or os.path.join(
            info.get("DockerRootDir") or "/var/lib/docker", "megaflow-disks"
        )
        if wanted == "storage-opt" or (
            wanted == "auto" and driver in ("overlay2", "btrfs", "zfs") and (backing == "xfs" or driver != "overlay2")
        ):
            return "storage-opt"
        why = self._loop_unavailable(driver, info.get("DockerRootDir") or "")
        if why is None:
            return "loop"
        if wanted == "loop":
            raise ConfigError(
                f"container_disk_mode=loop: {why}; use storage-opt (overlay2 on xfs with pquota) "
                "or set container_disk_mode=off"
            )
        log.warning("no per-container disk limit on this host (%s); containers can fill its disk", why)
        return "off"

    @staticmethod
    def _loop_unavailable(driver: str | None, root: str) -> str | None:
        if driver != "overlay2":
            return f"the loop mode needs the overlay2 storage driver, not {driver}"
        if os.geteuid() != 0:
            return "the loop mode needs the env worker to run as root"
        if not shutil.which("mkfs.ext4") or not shutil.which("mount"):
            return "the loop mode needs mkfs.ext4 and mount (apt-get install e2fsprogs mount)"
        if not os.path.isdir(os.path.join(root, "overlay2")):
            return f"Docker's data root {root}/overlay2 is not visible here (a remote or VM Docker engine?)"
        if not os.path.exists("/dev/loop-control"):
            return "no /dev/loop-control (loop devices unavailable)"
        return None

    def refused(self, error: str) -> bool:
        """Docker refused storage-opt (e.g. overlay2 on xfs without pquota): in auto mode fall back, True to retry."""
        low = error.lower()
        if (
            self.mode != "storage-opt"
            or self.settings.container_disk_mode != "auto"
            or not ("storage-opt" in low or "storage_opt" in low or "quota" in low)
        ):
            return False
        info = self.client.info()
        why = self._loop_unavailable(info.get("Driver"), info.get("DockerRootDir") or "")
        with self._lock:
            self._mode = "loop" if why is None else "off"
            self._dir = self._dir or os.path.join(info.get("DockerRootDir") or "/var/lib/docker", "megaflow-disks")
        log.warning(
            "Docker refused --storage-opt size (%s); disk limit mode now %s%s",
            error[:200],
            self._mode,
            "" if why is None else f" ({why})",
        )
        return True

    def storage_opt(self) -> dict[str, str] | None:
        """``storage_opt`` for the container create, in storage-opt mode."""
        return {"size": str(self.size)} if self.mode == "storage-opt" else None

    def describe(self) -> dict:
        return {"mode": self.mode, "limit_bytes": self.size}

    # --- loop mode ------------------------------------------------------------------------------
    def _image(self, cid: str) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, f"{cid}.ext4")

    def attach(self, cid: str) -> None:
        """Loop mode: put the created (not yet started) container's layer on its own sized file system."""
        if self.mode != "loop":
            return
        upper = self.client.api.inspect_container(cid)["GraphDriver"]["Data"]["UpperDir"]
        layer = os.path.dirname(upper)
        assert self._dir is not None  # set when the mode was resolved
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        image = self._image(cid)
        with open(image, "wb") as f:
            f.truncate(self.size)
        try:
            # -d: the new file system starts with the layer dir's contents (diff/, work/, link, lower)
            _run(
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=1,nodiscard",
                "-d",
                layer,
                image,
            )
            _run("mount", "-o", "loop", image, layer)
        except Exception:
            self.release(cid)
            raise

    def release(self, cid: str) -> None:
        """Loop mode: unmount what Docker left mounted and delete the container's image file (idempotent)."""
        if self._dir is None:
            return
        image = self._image(cid)
        for target in self._mounts_of(image):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
        try:
            os.remove(image)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("disk limit: could not remove %s: %s", image, exc)

    @staticmethod
    def _mounts_of(image: str) -> list[str]:
        """Mount points whose loop device is backed by ``image``."""
        try:
            out = subprocess.run(
                ["losetup", "-j", image, "-O", "NAME", "-n"], capture_output=True, text=True, check=False
            ).stdout.split()
            with open("/proc/self/mounts") as f:
                return [line.split()[1] for line in f if line.split()[0] in out]
        except OSError:
            return []

    def sweep(self, live_ids: Callable[[], set[str]]) -> list[str]:
        """Release image files of containers that no longer exist (auto-removed warm ones, crashes).

        ``live_ids()`` lists every container of the engine; it is called after the files are listed,
        and a file is only made after its container exists, so a container being booted is never hit.
        """
        if self._dir is None or not os.path.isdir(self._dir):
            return []
        names = [n[: -len(".ext4")] for n in os.listdir(self._dir) if n.endswith(".ext4")]
        if not names:
            return []
        live = live_ids()
        gone = [cid for cid in names if cid not in live]
        for cid in gone:
            self.release(cid)
        return gone
