"""Per-host image cache: pull on demand, remember last use, evict least recently used images past a disk budget.

Only images MegaFlow itself ensured on this host (recorded in the LRU hash) are ever evicted;
images in use (a container of this host, a warm pool, the default image) are protected.
"""

from __future__ import annotations

import shutil
import threading
import time

from megaflow.core.errors import InfraError
from megaflow.env_hosts.errors import docker_errors
from megaflow.env_hosts.images import image_present, pull_image


class ImageCache:
    """Images on one env host. Redis key owned: ``keys.env(host, "images")`` hash image -> last use (unix time)."""

    def __init__(self, docker_client, settings, host: str, *, redis_client=None, keys=None):
        self.client = docker_client
        self.settings = settings
        self.host = host
        self.redis = redis_client
        self.key = keys.env(host, "images") if keys is not None else None
        self._local: dict[str, float] = {}
        self._pull_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._present_cache: set[str] = set()

    def touch(self, image: str) -> None:
        """Record that ``image`` was used now."""
        now = time.time()
        if self.redis is not None and self.key:
            self.redis.hset(self.key, image, f"{now:.3f}")
        else:
            self._local[image] = now

    def last_used(self) -> dict[str, float]:
        """Image -> last use time of every image MegaFlow tracks on this host."""
        if self.redis is not None and self.key:
            raw = self.redis.hgetall(self.key)
            return {(k if isinstance(k, str) else k.decode()): float(v) for k, v in raw.items()}
        return dict(self._local)

    def forget(self, image: str) -> None:
        if self.redis is not None and self.key:
            self.redis.hdel(self.key, image)
        self._local.pop(image, None)
        self._present_cache.discard(image)

    def mark_missing(self, image: str) -> None:
        """Drop ``image`` from the presence cache (a create found it missing): the next ensure checks again."""
        self._present_cache.discard(image)

    def has(self, image: str) -> bool:
        """Whether ``image`` is in this host's engine right now (no pull)."""
        if image in self._present_cache:
            return True
        return image_present(self.client, image)

    def ensure(self, image: str) -> bool:
        """Make ``image`` present (pull with registry credentials if missing); True when it was pulled."""
        self.touch(image)
        if image in self._present_cache:
            return False
        with self._lock:
            lock = self._pull_locks.setdefault(image, threading.Lock())
        with lock:  # one pull per image at a time; the others wait for it
            if image_present(self.client, image):
                self._present_cache.add(image)
                return False
            pull_image(self.client, image, self.settings)
            self._present_cache.add(image)
            self.touch(image)
            return True

    def present(self) -> list[str]:
        """Every tagged image in this host's engine."""
        with docker_errors("list images"):
            out = sorted(
                {t for img in self.client.api.images() for t in (img.get("RepoTags") or []) if t != "<none>:<none>"}
            )
        return out

    def sizes(self) -> dict[str, int]:
        """Tracked image -> size in bytes (shared layers counted in each; a safe over-estimate)."""
        sizes: dict[str, int] = {}
        with docker_errors("list images"):
            by_tag = {t: img.get("Size", 0) for img in self.client.api.images() for t in (img.get("RepoTags") or [])}
        for image in self.last_used():
            if image in by_tag:
                sizes[image] = by_tag[image]
        return sizes

    def evict(self, *, budget_gb: float | None = None, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Remove least recently used tracked images until their total fits the budget; returns the removed."""
        import docker.errors

        budget = (self.settings.image_disk_budget_gb if budget_gb is None else budget_gb) * 1024**3
        used = self.last_used()
        sizes = self.sizes()
        for image in list(used):
            if image not in sizes:  # gone from the engine: stop tracking it
                self.forget(image)
        total = sum(sizes.values())
        removed: list[str] = []
        for image in sorted(sizes, key=lambda i: used.get(i, 0.0)):
            if total <= budget:
                break
            if image in protect:
                continue
            try:
                with docker_errors(f"remove image {image}"):
                    try:
                        self.client.api.remove_image(image, noprune=False)
                    except docker.errors.APIError as exc:
                        if exc.status_code == 409:  # a container (not ours) still uses it
                            continue
                        raise
            except InfraError:  # in use or refused: keep it, try the next one
                continue
            self.forget(image)
            total -= sizes[image]
            removed.append(image)
        return removed

    def disk_free_gb(self) -> float:
        """Free space on the file system that holds Docker's data (or / when it cannot be seen)."""
        try:
            root = self.client.info().get("DockerRootDir") or "/"
            return shutil.disk_usage(root).free / 1024**3
        except Exception:  # noqa: BLE001 - any engine failure: report the root file system instead
            return shutil.disk_usage("/").free / 1024**3
