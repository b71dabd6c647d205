"""The ``sim`` env backend: no containers; latency, exit codes and output drawn from its config.

A sandbox is a few dicts in this process (files, shell sessions, the commands it ran), so one
process holds thousands; a command waits on an Event (no CPU, woken by ``shutdown``) in the
caller's thread, and no thread is kept per sandbox. Simple shell builtins are emulated against
the sandbox's state (cwd, variables, files), everything else goes through the rules of
``SimEnvConfig`` (sim_config.py). Sandboxes die with the process, like containers with a host:
an operation on an unknown sandbox raises ContainerLostError.
"""

from __future__ import annotations

import posixpath
import random
import re
import shlex
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from megaflow.core.errors import RetryableInfraError, TaskError
from megaflow.env_hosts.base import EnvHandle, ExecResult, OutputCap, live_among
from megaflow.env_hosts.errors import ContainerLostError
from megaflow.env_hosts.sim_config import SimEnvConfig, SimRule, draw

HISTORY = 256  # commands of a sandbox remembered for `if_ran` / `unless_ran`
_REDIRECT = re.compile(r"^(?P<body>.*?)\s*(?<![0-9&])>\s*(?P<path>[^\s<>|&;]+)(?:\s+2>&1)?\s*$")
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_FIELD = re.compile(r"\{(\w+)\}")
_SHELL_SPECIAL = {"|", "||", ">", ">>", "<", "<<", "&", "(", ")", ">&", "<&", "|&"}


def _empty_match() -> re.Match[str]:
    m = re.compile("").match("")
    assert m is not None
    return m


_EMPTY = _empty_match()  # the match of a default rule that matched nothing


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    return re.compile(pattern) if pattern is not None else None


class _Box:
    """One simulated sandbox."""

    __slots__ = ("created", "episode_id", "files", "history", "id", "image", "lock", "mode", "rng", "sessions")

    def __init__(self, sid: str, episode_id: str, image: str, mode: str, seed: int):
        self.id, self.episode_id, self.image, self.mode = sid, episode_id, image, mode
        self.created = time.time()
        self.rng = random.Random(f"{seed}:{episode_id}")
        self.history: deque[str] = deque(maxlen=HISTORY)
        self.files: dict[str, bytes] = {}
        self.sessions: dict[str, dict] = {}
        self.lock = threading.Lock()


class SimHost:
    """Implements ``EnvHost`` without containers (scale runs, fast tests, the demo without Docker)."""

    backend = "sim"

    def __init__(
        self, config: SimEnvConfig | dict | None, settings, *, name: str, is_live: Callable[[str], bool] | None = None
    ):
        self.config = config if isinstance(config, SimEnvConfig) else SimEnvConfig.model_validate(config or {})
        self.settings = settings
        self.name = name
        self.is_live = is_live
        self._rules = [
            (r, re.compile(r.match), _compile(r.if_ran), _compile(r.unless_ran)) for r in self.config.all_rules()
        ]
        self._default = (self.config.default, re.compile(self.config.default.match), None, None)
        self._boxes: dict[str, _Box] = {}
        self._of_episode: dict[str, set[str]] = {}  # episode id -> its sandbox ids (a close reads no other)
        self._lock = threading.Lock()
        self._images: set[str] | None = set(self.config.images) if self.config.images is not None else None
        self._rng = random.Random(f"{self.config.seed}:host:{name}")  # host-level draws (boots, pulls)
        self._stop = threading.Event()
        # the warm pool model (config.warm_pool): ready sandboxes and boots in flight per image
        self._warm: dict[str, int] = {}
        self._filling: dict[str, int] = {}
        self._wanted: set[str] = {settings.default_image} if settings.env_mode == "persistent" else set()
        self._sizes: dict[str, int] = {}  # the fleet's published sizes, fitted to capacity
        self.starts = 0  # sandboxes booted: episodes' own and warm-pool refills (container starts)

    @property
    def queues(self) -> list[str]:
        return ["env", f"env.{self.name}"]

    # --- time -----------------------------------------------------------------------------------
    def _wait(self, seconds: float) -> None:
        seconds *= self.config.time_scale
        if seconds > 0:
            self._stop.wait(seconds)

    def _box(self, handle: EnvHandle | dict) -> _Box:
        h = EnvHandle.coerce(handle)
        box = self._boxes.get(h.id)
        if box is None:
            raise ContainerLostError(f"sandbox {h.id} is gone (closed, reaped, or its host restarted)")
        return box

    # --- images ---------------------------------------------------------------------------------
    def has_image(self, image: str) -> bool:
        return self._images is None or image in self._images

    def ensure_image(self, image: str) -> bool:
        """Make ``image`` present (a simulated pull when it is not); True if it was pulled."""
        if self.has_image(image):
            return False
        with self._lock:
            latency = draw(self.config.pull_latency_s, self._rng)
        self._wait(latency)
        assert self._images is not None
        self._images.add(image)
        return True

    # --- create / close -------------------------------------------------------------------------
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
        if mode not in ("ephemeral", "persistent"):
            raise ValueError(f"mode must be 'ephemeral' or 'persistent', not {mode!r}")
        self.ensure_image(image)
        warm = mode == "persistent" and not network
        with self._lock:
            if warm and self.config.warm_pool:
                self._wanted.add(image)
                warm = self._warm.get(image, 0) > 0
                if warm:
                    self._warm[image] -= 1
            if not warm:
                self.starts += 1
            fail = self._rng.random() < self.config.boot_failure_p
            latency = draw(self.config.warm_latency_s if warm else self.config.boot_latency_s, self._rng)
        if mode == "persistent" and self.config.warm_pool:
            self._refill_async(image)
        self._wait(latency)
        if fail:
            raise RetryableInfraError(f"boot of {image} on {self.name}: simulated failure")
        box = _Box("sim-" + uuid.uuid4().hex[:16], episode_id, image, mode, self.config.seed)
        with self._lock:
            self._boxes[box.id] = box
            self._of_episode.setdefault(episode_id, set()).add(box.id)
        return EnvHandle(
            backend=self.backend,
            host=self.name,
            id=box.id,
            episode_id=episode_id,
            image=image,
            mode=mode,
            # no labels: nothing reads them back from a handle (the handle lives in the episode hash)
            data={"warm": warm, "user": user or self.settings.container_user},
        )

    def close_episode(self, episode_id: str) -> list[str]:
        """Drop every sandbox of ``episode_id`` (its own, a fresh evaluation one); ids dropped."""
        with self._lock:
            gone = sorted(self._of_episode.pop(episode_id, ()))
            for sid in gone:
                self._boxes.pop(sid, None)
        return gone

    def close(self, handle: EnvHandle | dict) -> None:
        with self._lock:
            self._drop(EnvHandle.coerce(handle).id)

    def _drop(self, sandbox_id: str) -> None:
        """Forget a sandbox (the caller holds the lock)."""
        box = self._boxes.pop(sandbox_id, None)
        if box is not None:
            ids = self._of_episode.get(box.episode_id)
            if ids is not None:
                ids.discard(sandbox_id)
                if not ids:
                    del self._of_episode[box.episode_id]

    # --- files ----------------------------------------------------------------------------------
    def put_files(self, handle: EnvHandle | dict, files: dict[str, str | bytes]) -> None:
        box = self._box(handle)
        for path in files:
            if not path.startswith("/"):
                raise TaskError(f"put_files: path must be absolute, got {path!r}")
        with box.lock:
            for path, content in files.items():
                box.files[posixpath.normpath(path)] = content.encode() if isinstance(content, str) else bytes(content)

    def get_file(self, handle: EnvHandle | dict, path: str) -> bytes:
        box = self._box(handle)
        data = box.files.get(posixpath.normpath(path))
        if data is None:
            raise TaskError(f"get_file: {path} does not exist in the sandbox")
        return data

    # --- exec -----------------------------------------------------------------------------------
    def execute(
        self,
        handle: EnvHandle | dict,
        command: str,
        *,
        timeout: float | None = None,
        workdir: str | None = None,
        env: dict | None = None,
    ) -> ExecResult:
        state = {"cwd": workdir or "/", "env": {k: str(v) for k, v in (env or {}).items()}}
        return self._run(self._box(handle), command, state, timeout)

    def open_session(self, handle: EnvHandle | dict, *, workdir: str | None = None, env: dict | None = None) -> str:
        box = self._box(handle)
        sid = uuid.uuid4().hex[:16]
        with box.lock:
            box.sessions[sid] = {"cwd": workdir or "/", "env": {k: str(v) for k, v in (env or {}).items()}}
        return sid

    def run_in_session(
        self, handle: EnvHandle | dict, session_id: str, command: str, *, timeout: float | None = None
    ) -> ExecResult:
        box = self._box(handle)
        state = box.sessions.get(session_id)
        if state is None:
            return ExecResult(
                exit_code=127,
                output=f"megaflow: shell session {session_id} is closed\n",
                timed_out=False,
                duration_s=0.0,
                truncated=False,
            )
        return self._run(box, command, state, timeout)

    def close_session(self, handle: EnvHandle | dict, session_id: str) -> None:
        box = self._boxes.get(EnvHandle.coerce(handle).id)
        if box is not None:
            box.sessions.pop(session_id, None)

    def _run(self, box: _Box, command: str, state: dict, timeout: float | None) -> ExecResult:
        timeout = self.settings.command_timeout_s if timeout is None else float(timeout)
        started = time.monotonic()
        target = None
        body = command
        if self.config.builtins:
            lines = command.rstrip("\n").split("\n")
            m = _REDIRECT.match(lines[-1]) if "<<" not in command else None
            if m:
                target = posixpath.normpath(posixpath.join(state["cwd"], m["path"]))
                body = "\n".join(lines[:-1] + [m["body"]])
        with box.lock:
            emulated = self._builtins(box, body, state) if self.config.builtins else None
            if emulated is not None:
                code, output = emulated
                latency = draw(self.config.default.latency_s, box.rng)
            else:
                rule, match = self._pick(box, command)
                latency = draw(rule.latency_s, box.rng)
                code = int(draw(rule.exit_code, box.rng))
                output = self._render(rule, match, command, box.rng)
            box.history.append(command)
        if latency > timeout:
            self._wait(timeout)
            self._box({"id": box.id})
            return ExecResult(
                exit_code=124,
                output="",
                timed_out=True,
                duration_s=round(time.monotonic() - started, 4),
                truncated=False,
            )
        self._wait(latency)
        self._box({"id": box.id})  # closed or reaped meanwhile: the sandbox is lost
        if target is not None:
            if target != "/dev/null":
                with box.lock:
                    box.files[target] = output.encode()
            output = ""
        text, truncated = OutputCap.apply(output, self.settings.output_cap_bytes)
        return ExecResult(
            exit_code=code,
            output=text,
            timed_out=False,
            duration_s=round(time.monotonic() - started, 4),
            truncated=truncated,
        )

    def _pick(self, box: _Box, command: str) -> tuple[SimRule, re.Match[str]]:
        for rule, match_re, if_ran, unless_ran in self._rules:
            m = match_re.search(command)
            if m is None:
                continue
            if if_ran is not None and not any(if_ran.search(c) for c in box.history):
                continue
            if unless_ran is not None and any(unless_ran.search(c) for c in box.history):
                continue
            return rule, m
        rule, match_re, _, _ = self._default
        return rule, match_re.search(command) or _EMPTY

    @staticmethod
    def _render(rule: SimRule, match: re.Match, command: str, rng: random.Random) -> str:
        def fill(text: str, groups: dict) -> str:
            return _FIELD.sub(lambda f: groups.get(f[1], f[0]), text)

        pieces = [
            fill(e.output, {k: v for k, v in mm.groupdict().items() if v is not None})
            for e in rule.each
            for mm in re.finditer(e.match, command)
        ]
        groups = {k: v for k, v in match.groupdict().items() if v is not None}
        return "".join(pieces) + fill(str(draw(rule.output, rng)), groups)

    def _builtins(self, box: _Box, command: str, state: dict) -> tuple[int, str] | None:
        """(exit code, output) when every part of ``command`` is a simple builtin, else None."""
        segments: list[tuple[str, list[str]]] = []  # (connector before it, words)
        for line in command.split("\n"):
            if "$(" in line or "`" in line:
                return None
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            try:
                tokens = list(lex)
            except ValueError:
                return None
            connector, words = ";", list[str]()
            for tok in tokens + [";"]:
                if tok in ("&&", ";"):
                    if words:
                        segments.append((connector, words))
                    connector, words = tok, []
                elif tok in _SHELL_SPECIAL:
                    return None
                else:
                    words.append(tok)
        code, out = 0, []
        env = state["env"]
        for connector, words in segments:
            if connector == "&&" and code != 0:
                continue
            words = [_VAR.sub(lambda v: env.get(v[1] or v[2], ""), w) for w in words]
            name, args = words[0], words[1:]
            if name == "cd":
                state["cwd"] = posixpath.normpath(
                    posixpath.join(state["cwd"], args[0] if args else env.get("HOME", "/root"))
                )
                code = 0
            elif name == "export" or (re.fullmatch(r"[A-Za-z_]\w*=.*", name, re.DOTALL) and not args):
                for a in args if name == "export" else [name]:
                    k, eq, v = a.partition("=")
                    if eq:
                        env[k] = v
                code = 0
            elif name == "unset":
                for a in args:
                    env.pop(a, None)
                code = 0
            elif name == "pwd":
                out.append(state["cwd"] + "\n")
                code = 0
            elif name == "echo":
                newline = not (args and args[0] == "-n")
                out.append(" ".join(args[1:] if not newline else args) + ("\n" if newline else ""))
                code = 0
            elif name == "cat" and args:
                code = 0
                for a in args:
                    data = box.files.get(posixpath.normpath(posixpath.join(state["cwd"], a)))
                    if data is None:
                        out.append(f"cat: {a}: No such file or directory\n")
                        code = 1
                    else:
                        out.append(data.decode("utf-8", "replace"))
            elif name in ("true", "mkdir", ":"):
                code = 0
            elif name == "false":
                code = 1
            elif name == "exit":
                return (int(args[0]) if args and args[0].isdigit() else code), "".join(out)
            else:
                return None
        return code, "".join(out)

    # --- upkeep ---------------------------------------------------------------------------------
    def maintain(self, is_live: Callable[[str], bool] | None = None) -> dict:
        """Reap sandboxes whose episode is over (``is_live`` says False) or whose lifetime lapsed."""
        is_live = is_live or self.is_live
        lapse = time.time() - self.settings.container_lifetime_s
        with self._lock:
            boxes = list(self._boxes.values())
        live = live_among(is_live, {b.episode_id for b in boxes}) if is_live is not None else None
        reaped = [b.id for b in boxes if b.created < lapse or (live is not None and b.episode_id not in live)]
        with self._lock:
            for sid in reaped:
                self._drop(sid)
        if self.config.warm_pool:
            for image in sorted(self._wanted | set(self._sizes)):
                self._refill_async(image)
        return {"reaped": reaped, "warm_trimmed": 0, "warm_started": 0, "evicted": []}

    # --- warm pool model ----------------------------------------------------------------------
    def _size(self, image: str) -> int:
        if image in self._sizes:
            return self._sizes[image]
        return self.settings.warm_pool_size if image in self._wanted else 0

    def _refill_async(self, image: str) -> None:
        """Boot the sandboxes ``image``'s pool lacks, one after another, in a background thread."""
        with self._lock:
            need = self._size(image) - self._warm.get(image, 0) - self._filling.get(image, 0)
            if need <= 0 or self._stop.is_set():
                return
            self._filling[image] = self._filling.get(image, 0) + need

        def boot() -> None:
            for _ in range(need):
                with self._lock:
                    latency = draw(self.config.boot_latency_s, self._rng)
                self._wait(latency)
                with self._lock:
                    self._filling[image] -= 1
                    if self._stop.is_set():
                        continue
                    self.starts += 1
                    if self._warm.get(image, 0) < self._size(image):
                        self._warm[image] = self._warm.get(image, 0) + 1

        threading.Thread(target=boot, name=f"sim-warm-{image}", daemon=True).start()

    def set_pool_sizes(self, sizes: dict[str, int]) -> dict[str, int]:
        """Adopt the fleet's warm-pool sizes within capacity (only with ``warm_pool``; else ``{}``)."""
        if not self.config.warm_pool:
            return {}
        from megaflow.env_hosts.pool import fit_pool_sizes

        applied = fit_pool_sizes(sizes, self.config.capacity or self.settings.host_capacity)
        with self._lock:
            self._sizes = applied
            for image in list(self._warm):
                self._warm[image] = min(self._warm[image], self._size(image))
        for image in applied:
            self._refill_async(image)
        return applied

    def report(self) -> dict:
        return {
            "host": self.name,
            "backend": self.backend,
            "capacity": self.config.capacity or self.settings.host_capacity,
            "images": sorted(self._images) if self._images is not None else [],
            "warm": {img: n for img, n in self._warm.items() if n},
            "sandbox_starts": self.starts,
            "disk_free_gb": self.config.disk_free_gb,
            "sandboxes": len(self._boxes),
        }

    def shutdown(self) -> None:
        """Drop every sandbox and wake every waiting command (they end with ContainerLostError)."""
        self._stop.set()
        with self._lock:
            self._boxes.clear()
            self._of_episode.clear()
