"""Warm pool (persistent mode): started containers per image on one host, handed out after a liveness check.

Bounded in size (``settings.warm_pool_size`` per image, or the size the elastic fleet published
for an image: ``set_sizes``, applied by the env worker's heartbeat within the host's capacity) and
idle time (a container idle past ``settings.warm_idle_s`` is replaced; an image nobody asked for in
that time stops being kept warm). A warm container lives ``warm_idle_s + container_lifetime_s``,
so one handed out always has a full episode lifetime left. Used containers are removed at close,
never put back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from megaflow.core.errors import InfraError
from megaflow.env_hosts import labels as L
from megaflow.env_hosts.containers import LEASE_MARGIN_S, container_name


def fit_pool_sizes(sizes: dict[str, int], capacity: int) -> dict[str, int]:
    """Pool sizes (image -> containers) fitted to ``capacity`` warm containers in all.

    Over capacity, slots go one at a time to the images asking most (ties by name), so every image
    gets at least one while slots last; images asking for none are left out.
    """
    want = {img: int(n) for img, n in sizes.items() if int(n) > 0}
    if sum(want.values()) <= capacity:
        return want
    applied = dict.fromkeys(want, 0)
    order = sorted(want, key=lambda img: (-want[img], img))
    left = max(0, capacity)
    while left > 0 and any(applied[i] < want[i] for i in order):
        for img in order:
            if left > 0 and applied[img] < want[img]:
                applied[img] += 1
                left -= 1
    return {img: n for img, n in applied.items() if n > 0}


@dataclass
class WarmEntry:
    container_id: str
    name: str
    image: str
    started: float  # unix time
    lease_expiry: float


class WarmPool:
    """Warm containers of one env host, by image (the host's Containers, ExecSessions, Claims and ImageCache)."""

    def __init__(
        self,
        settings,
        *,
        host: str,
        instance_id: str,
        containers,
        sessions,
        claims,
        images,
        pinned=(),
        log: Callable[[str], None] = print,
        on_refill: Callable[[], None] = lambda: None,
    ):
        self.settings = settings
        self.host = host
        self.instance_id = instance_id
        self.containers = containers
        self.sessions = sessions
        self.claims = claims
        self.images = images
        self.log = log
        self.on_refill = on_refill  # called at the start of each refill (the host marks its pool alive)
        self._lock = threading.Lock()
        self._items: dict[str, deque[WarmEntry]] = {}
        self._wanted: dict[str, float] = {}  # image -> last time an episode asked for it
        self._pinned: set[str] = set(pinned)  # images kept warm regardless of demand
        self._sizes: dict[str, int] = {}  # image -> pool size published by the fleet (kept warm while published)
        self._refilling: set[str] = set()
        self._taking: set[str] = set()  # popped from the pool, claim not yet recorded
        self._threads: list[threading.Thread] = []
        self._closed = False

    def want(self, image: str, *, at: float | None = None) -> None:
        """Note that an episode asked for ``image`` in persistent mode at ``at`` (default now; keeps its pool alive)."""
        with self._lock:
            self._wanted[image] = time.time() if at is None else at
            self._items.setdefault(image, deque())

    def wanted(self) -> set[str]:
        with self._lock:
            return set(self._pinned) | set(self._wanted) | set(self._sizes)

    def size(self, image: str) -> int:
        """Target pool size of ``image``: the fleet's published size, else ``settings.warm_pool_size``."""
        with self._lock:
            return self._sizes.get(image, self.settings.warm_pool_size)

    def set_sizes(self, sizes: dict[str, int], capacity: int) -> dict[str, int]:
        """Adopt the fleet's pool sizes (image -> containers), fitted to ``capacity`` warm containers in all.

        Over capacity, see ``fit_pool_sizes``. Images left out fall back to the static setting (kept
        warm only if pinned or asked for). Returns the sizes applied; excess containers go at the
        next ``trim``, missing ones come with the next ``refill``.
        """
        applied = fit_pool_sizes(sizes, capacity)
        with self._lock:
            self._sizes = applied
            for img in applied:
                self._items.setdefault(img, deque())
        return applied

    def owns(self, container_id: str) -> bool:
        with self._lock:
            return container_id in self._taking or any(
                e.container_id == container_id for q in self._items.values() for e in q
            )

    def entries(self, image: str) -> list[WarmEntry]:
        """The warm containers of ``image`` waiting in the pool, oldest first."""
        with self._lock:
            return list(self._items.get(image, ()))

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {image: len(q) for image, q in self._items.items() if q}

    def take(self, image: str, episode_id: str, labels: dict[str, str]) -> tuple[WarmEntry, float] | None:
        """A live warm container of ``image``, now claimed for ``episode_id``, and its lease expiry; or None."""
        min_left = self.settings.container_lifetime_s
        while True:
            with self._lock:
                q = self._items.get(image)
                entry = q.popleft() if q else None
                if entry is not None:
                    self._taking.add(entry.container_id)
            if entry is None:
                return None
            try:
                if self._alive(entry, min_left, claim=True):
                    expiry = time.time() + self.settings.container_lifetime_s + LEASE_MARGIN_S
                    self.claims.record(
                        entry.container_id, {"episode_id": episode_id, "lease_expiry": expiry, "labels": labels}
                    )
                    self.images.touch(image)
                    return entry, expiry
                self._remove(entry.container_id)
            finally:
                with self._lock:
                    self._taking.discard(entry.container_id)

    def _remove(self, cid: str) -> None:
        self.sessions.drop(cid)
        self.containers.remove(cid)

    def _alive(self, entry: WarmEntry, min_left: float, *, claim: bool = False) -> bool:
        """Liveness check: the container runs and has at least ``min_left`` seconds of lifetime left.

        With an exec session, a ping round trip through the runner (about a millisecond); without,
        Docker's view of the container state. ``claim`` also unbinds the runner from this process.
        """
        if entry.started + self.settings.warm_idle_s + self.settings.container_lifetime_s - time.time() < min_left:
            return False
        # With a session: the runner answered, so the container runs commands right now (and, when
        # handed out, no longer stops itself if this process dies: the reaper decides then).
        pong = self.sessions.ping(entry.container_id, bind=False if claim else None)
        if pong is not None:  # a warm container whose runner does not answer is not handed out
            return pong
        try:
            state = self.containers.state(entry.container_id)
        except InfraError:
            return False
        return bool(state.get("Running")) and not state.get("Paused") and not state.get("Restarting")

    def _start_one(self, image: str) -> WarmEntry:
        lifetime = self.settings.warm_idle_s + self.settings.container_lifetime_s
        labels = {L.EPISODE: "", L.MODE: "persistent", L.POOL_OWNER: self.instance_id}
        user = self.settings.container_user
        cid, name, expiry = self.containers.boot(
            image,
            labels,
            lifetime=lifetime,
            network=False,
            name=container_name(self.host, "warm"),
            auto_remove=True,
            user=user,
        )
        # The first exec then skips `docker exec` (falls back if unavailable), and the container
        # stops (and is auto-removed) as soon as this process dies, even by SIGKILL.
        if self.sessions.open(cid, user=user):
            self.sessions.ping(cid, bind=True, wait=30.0)
        return WarmEntry(cid, name, image, time.time(), expiry)

    def refill(self, image: str | None = None) -> int:
        """Start containers until each wanted image (or just ``image``) has a full pool; returns how many."""
        self.on_refill()
        started = 0
        images = [image] if image else sorted(self.wanted())
        for img in images:
            while not self._closed:
                with self._lock:
                    have = len(self._items.setdefault(img, deque()))
                if have >= self.size(img):
                    break
                try:
                    self.images.ensure(img)
                    entry: WarmEntry | None = self._start_one(img)
                except InfraError as exc:
                    self.log(f"warm pool refill of {img} failed: {exc}")
                    break  # the next upkeep pass tries again
                with self._lock:
                    if not self._closed:
                        self._items.setdefault(img, deque()).append(entry)  # type: ignore[arg-type]
                        entry = None
                if entry is not None:  # drained while booting
                    self._remove(entry.container_id)
                    break
                started += 1
        return started

    def refill_async(self, image: str) -> None:
        """Refill ``image``'s pool in a background thread (at most one per image at a time)."""
        with self._lock:
            if image in self._refilling:
                return
            self._refilling.add(image)

        def run():
            try:
                self.refill(image)
            except Exception as exc:  # noqa: BLE001 - a background refill must not die loudly
                self.log(f"warm pool refill of {image} failed: {exc!r}")
            finally:
                with self._lock:
                    self._refilling.discard(image)

        thread = threading.Thread(target=run, name=f"warm-refill-{image}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def trim(self) -> int:
        """Remove warm containers idle past ``warm_idle_s``, dead, beyond their image's size, and pools
        nobody asked for lately."""
        now = time.time()
        idle = self.settings.warm_idle_s
        drop: list[WarmEntry] = []
        with self._lock:
            for image, last in list(self._wanted.items()):
                if image not in self._pinned and image not in self._sizes and now - last > idle:
                    del self._wanted[image]
            for image, q in self._items.items():
                keep: deque[WarmEntry] = deque()
                kept = image in self._pinned or image in self._wanted or image in self._sizes
                for e in q:
                    if now - e.started > idle or not kept:
                        drop.append(e)
                    else:
                        keep.append(e)
                limit = self._sizes.get(image, self.settings.warm_pool_size)
                while len(keep) > limit:  # the fleet asked for fewer: the oldest go first
                    drop.append(keep.popleft())
                self._items[image] = keep
        failed_check: list[WarmEntry] = []
        with self._lock:
            candidates = [e for q in self._items.values() for e in q]
        for e in candidates:
            if not self._alive(e, 0):
                failed_check.append(e)
        dead: list[WarmEntry] = []
        with self._lock:
            for e in failed_check:
                waiting = self._items.get(e.image)
                if waiting and e in waiting:  # not handed out meanwhile
                    waiting.remove(e)
                    dead.append(e)
        for e in drop + dead:
            self._remove(e.container_id)
        return len(drop) + len(dead)

    def drain(self) -> int:
        """Remove every warm container of this pool (waits briefly for background refills)."""
        self._closed = True
        for thread in list(self._threads):
            thread.join(timeout=self.settings.boot_timeout_s)
        with self._lock:
            entries = [e for q in self._items.values() for e in q]
            self._items.clear()
        for e in entries:
            self._remove(e.container_id)
        return len(entries)
