"""The env seam: backend-neutral handles and results, the one output cap, and the ``EnvHost`` Protocol.

Every env backend (``docker``, ``sim``, a user's class named by dotted path) implements
``EnvHost``. The engine keeps only ``EnvHandle.to_json()`` in the episode hash and hands either
that dict or the ``EnvHandle`` back to the backend; backends accept both (``EnvHandle.coerce``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

OMITTED = "\n[... {n} bytes of output omitted ...]\n"  # marker between the head and tail of capped output


@dataclass(frozen=True)
class EnvHandle:
    """One live sandbox of one backend; JSON-able, so it can live in Redis and travel in task arguments."""

    backend: str  # the backend's name: "docker", "sim", or a third-party one
    host: str  # env host that owns the sandbox (operations go to queue env.<host>)
    id: str  # container / sandbox id
    episode_id: str
    image: str
    mode: str = "ephemeral"  # ephemeral | persistent
    data: dict[str, Any] = field(default_factory=dict)  # backend-specific extras (JSON-safe)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict; ``container_id`` repeats ``id`` for readers written against the old dict handles."""
        return {
            "backend": self.backend,
            "host": self.host,
            "id": self.id,
            "episode_id": self.episode_id,
            "image": self.image,
            "mode": self.mode,
            "data": dict(self.data),
            "container_id": self.id,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EnvHandle:
        """Inverse of ``to_json``; also takes the old docker dict handles (``container_id``, extras at top level)."""
        if "id" in d:
            return cls(
                backend=str(d.get("backend") or "docker"),
                host=str(d.get("host") or ""),
                id=str(d["id"]),
                episode_id=str(d.get("episode_id") or ""),
                image=str(d.get("image") or ""),
                mode=str(d.get("mode") or "ephemeral"),
                data=dict(d.get("data") or {}),
            )
        if "container_id" in d:  # old docker handle: {container_id, name, host, image, mode, episode_id, ...}
            core = {"container_id", "host", "image", "mode", "episode_id"}
            return cls(
                backend="docker",
                host=str(d.get("host") or ""),
                id=str(d["container_id"]),
                episode_id=str(d.get("episode_id") or ""),
                image=str(d.get("image") or ""),
                mode=str(d.get("mode") or "ephemeral"),
                data={k: v for k, v in d.items() if k not in core},
            )
        raise ValueError("an env handle needs an 'id' (or an old-style 'container_id')")

    @classmethod
    def coerce(cls, handle: EnvHandle | dict[str, Any]) -> EnvHandle:
        """The handle itself, or one rebuilt from its JSON form."""
        return handle if isinstance(handle, EnvHandle) else cls.from_json(handle)


@dataclass
class ExecResult:
    """Outcome of one command in a sandbox (JSON-able, sent back over Celery)."""

    exit_code: int | None  # None: the command did not finish (the client gave up on it)
    output: str  # stdout and stderr joined in order, capped head + tail
    timed_out: bool
    duration_s: float
    truncated: bool  # part of the output was dropped by the cap

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def to_json(self) -> dict:
        return asdict(self)

    def history_record(self, command: str) -> dict:
        """The episode history's record of this result (role ``env``, kind ``exec``): what the agent
        renders its observation from."""
        return {
            "role": "env",
            "kind": "exec",
            "command": command,
            "exit_code": self.exit_code,
            "output": self.output,
            "timed_out": self.timed_out,
            "duration_s": round(self.duration_s, 4),
            "truncated": self.truncated,
        }

    @classmethod
    def from_json(cls, data: dict) -> ExecResult:
        return cls(**{k: data[k] for k in ("exit_code", "output", "timed_out", "duration_s", "truncated")})


class OutputCap:
    """Keeps the first and last ``cap // 2`` bytes of a stream, counting what falls in between.

    The one implementation of the cap: the docker exec-session runner ships this class's source
    into the container (session.py), so both exec paths cut output the same way.
    """

    def __init__(self, cap):
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = deque()
        self.tail_len = 0
        self.dropped = 0

    def feed(self, data):
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail.append(data)
        self.tail_len += len(data)
        while self.tail_len - len(self.tail[0]) >= self.tail_cap:
            self.tail_len -= len(self.tail[0])
            self.dropped += len(self.tail.popleft())
        if self.tail_len > self.tail_cap:  # trim the oldest chunk in place
            cut = self.tail_len - self.tail_cap
            self.tail[0] = self.tail[0][cut:]
            self.tail_len -= cut
            self.dropped += cut

    @property
    def truncated(self):
        return self.dropped > 0

    def text(self):
        head = bytes(self.head).decode("utf-8", "replace")
        tail = b"".join(self.tail).decode("utf-8", "replace")
        if self.dropped:
            return head + OMITTED.format(n=self.dropped) + tail
        return head + tail

    @classmethod
    def apply(cls, data, cap):
        """(text, truncated) of ``data`` (bytes or str) cut to ``cap`` bytes."""
        c = cls(cap)
        c.feed(data.encode("utf-8", "replace") if isinstance(data, str) else data)
        return c.text(), c.truncated


@runtime_checkable
class EnvHost(Protocol):
    """What the env service needs from a backend. Failures raise megaflow.core.errors classes.

    A command that fails or times out is a normal ``ExecResult``; a sandbox that is gone raises
    an ``InfraError`` (``ContainerLostError``); a backend that cannot reach its engine raises a
    ``RetryableInfraError``; a bad path or missing file is a ``TaskError``.
    """

    name: str  # this env host's name (the ``host`` of its handles)

    def create(
        self,
        episode_id: str,
        image: str,
        *,
        labels: dict[str, str] | None = None,
        mode: str = "ephemeral",
        network: bool = False,
        user: str | None = None,
        workdir: str | None = None,
    ) -> EnvHandle:
        """Start (or take a warm) sandbox of ``image`` for an episode.

        Commands run as ``user`` ("root" or "UID[:GID]"; None: the backend's unprivileged default),
        who owns ``workdir`` (created if missing).
        """
        ...

    def execute(
        self,
        handle: EnvHandle | dict,
        command: str,
        *,
        timeout: float | None = None,
        workdir: str | None = None,
        env: dict | None = None,
    ) -> ExecResult:
        """Run ``bash -lc command`` (fresh shell) under a time limit, output capped."""
        ...

    def put_files(self, handle: EnvHandle | dict, files: Mapping[str, str | bytes]) -> None:
        """Write files (absolute path -> content), creating parent directories."""
        ...

    def get_file(self, handle: EnvHandle | dict, path: str) -> bytes:
        """Read one regular file; a missing path is a TaskError."""
        ...

    def open_session(self, handle: EnvHandle | dict, *, workdir: str | None = None, env: dict | None = None) -> str:
        """Start a long-lived shell session; returns its id."""
        ...

    def run_in_session(
        self, handle: EnvHandle | dict, session_id: str, command: str, *, timeout: float | None = None
    ) -> ExecResult:
        """Run a command in the session: ``cd`` and exported variables persist to the next call."""
        ...

    def close_session(self, handle: EnvHandle | dict, session_id: str) -> None:
        """Forget a session (idempotent)."""
        ...

    def close(self, handle: EnvHandle | dict) -> None:
        """Remove the sandbox (idempotent).

        A backend may also offer ``close_episode(episode_id) -> list[str]`` (docker and sim do): remove
        every sandbox of an episode on this host, e.g. a fresh evaluation container a cancel cuts short.
        """
        ...

    def has_image(self, image: str) -> bool:
        """Whether ``image`` is present on this host without a pull."""
        ...

    def ensure_image(self, image: str) -> Any:
        """Make ``image`` present (pull or equivalent)."""
        ...

    def report(self) -> dict:
        """Heartbeat contents: host, capacity, images, warm (image -> count), disk_free_gb.

        A backend with a warm pool may also offer ``set_pool_sizes(sizes) -> dict`` (docker does): the
        env worker's heartbeat passes it the fleet's published pool sizes (image -> sandboxes per host)
        when they change, and the backend applies them within its capacity.
        """
        ...

    def maintain(self, is_live: Callable[[str], bool] | None = None) -> dict:
        """One upkeep pass (reap what is not live, refill warm pools, evict images); returns counts.

        ``is_live(episode_id)`` may also offer ``many(episode_ids) -> set`` (the env worker's does: one
        script call per 1,000 episodes); ``live_among`` asks it that way when it can.
        """
        ...

    def shutdown(self) -> None:
        """Release what this instance holds (warm sandboxes, sessions) on a clean stop."""
        ...


def live_among(is_live: Callable[[str], bool], episode_ids: set[str]) -> set[str]:
    """The episodes of ``episode_ids`` that ``is_live`` says still run: in one call of its ``many`` when it
    has one (a host with thousands of sandboxes must not ask Redis once per sandbox), else one by one."""
    many = getattr(is_live, "many", None)
    if many is not None:
        return set(many(episode_ids))
    return {e for e in episode_ids if is_live(e)}
