"""Fault injection: a real fleet with a batch in flight, one fault at a time, and what it cost.

    python bench/faults.py [--episodes 24] [--only redis-kill,env-host-gone] [--recorder-down-s 60]
    python bench/faults.py --only docker-restart     # needs root and dockerd: a PRIVATE engine is started

One private redis-server (AOF, fsync every second) and one local fleet (control, model, agent and
two env workers, real containers) serve every scenario; each scenario submits the demo batch,
waits until episodes are in flight, injects ONE fault, and measures:

  lost        episodes not final when the batch should have ended
  dup         episodes that reached a final state more than once (two "finished" events)
  wrong       final state (or its record in the metadata store) not the expected one
  slots       slots / FIFO entries of the batch still held one lease after the end
  containers  containers of the batch left after one reaper pass
  stranded    episodes in a non-final state with no task queued or running and no lease
  exited      fleet processes that died by themselves (not the ones the fault killed)
  recovery_s  from the fault until every episode in flight at that moment moved on

Every figure but the time must be 0; tests/test_faults.py runs each scenario as a test.
The Docker-engine restart runs against a PRIVATE dockerd (its own socket, data root, exec root and
pid file under a temporary directory, no bridge, no iptables; the sandbox image copied in with docker
save/load), never the machine's shared engine; its fleet talks to it through DOCKER_HOST.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from megaflow import Client, fleet
from megaflow.core import states
from megaflow.core.settings import Settings


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIGURES = ("lost", "dup", "wrong", "slots", "containers", "stranded", "exited")


class RedisAOF:
    """A redis-server with AOF (fsync every second) on a fixed port, which a scenario stops and restarts."""

    def __init__(self, workdir: Path, port: int):
        self.dir, self.port = workdir, port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, wait_s: float = 20.0) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed (scripts/setup.sh installs it)")
        opts = ["--bind", "127.0.0.1", "--appendonly", "yes", "--appendfsync", "everysec", "--loglevel", "notice"]
        args = [exe, "--port", str(self.port), "--save", "", *opts, "--dir", str(self.dir)]
        args += ["--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:  # connection refused, or LOADING while it replays the AOF
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: a clean shutdown (AOF flushed); SIGKILL: up to the last second of writes lost."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None


class PrivateDockerd:
    """A dockerd of our own under ``workdir`` (socket, data root, exec root, pid file), restartable at will.

    ``--bridge=none --iptables=false --ip-masq=false``: it touches no network set-up of the machine.
    Only this process's dockerd (by its pid) is ever signalled.
    """

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.sock = workdir / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        d = self.dir
        return [
            shutil.which("dockerd") or "dockerd",
            "--host", self.host,
            "--data-root", str(d / "data"),
            "--exec-root", str(d / "exec"),
            "--pidfile", str(d / "docker.pid"),
            "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip-forward=false",
            "--storage-driver", "overlay2",
        ]  # fmt: skip

    def start(self, wait_s: float = 60.0) -> None:
        import docker

        log = open(self.dir / "dockerd.log", "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                client = docker.DockerClient(base_url=self.host, timeout=5)
                client.ping()
                client.close()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.dir / "dockerd.log").read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"private dockerd did not start:\n{tail}") from None
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, wait_s: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def load(self, image: str) -> None:
        """Copy ``image`` from the machine's engine into this one (docker save | docker load)."""
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        load = subprocess.run(["docker", "-H", self.host, "load", "-q"], stdin=save.stdout, capture_output=True)
        save.wait()
        if save.returncode or load.returncode:
            raise RuntimeError(f"docker save | load of {image} failed: {load.stderr.decode()[-500:]}")


@dataclass
class Result:
    """The figures of one scenario."""

    name: str
    episodes: int
    lost: int = 0
    dup: int = 0
    wrong: int = 0
    slots: int = 0
    containers: int = 0
    stranded: int = 0
    exited: int = 0
    recovery_s: float | None = None
    total_s: float = 0.0
    hit: int | None = None  # containers the fault stopped (docker-restart), to show it hit something
    notes: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return all(getattr(self, f) == 0 for f in FIGURES)

    def row(self) -> str:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        figs = " | ".join(str(getattr(self, f)) for f in FIGURES)
        return f"| {self.name} | {self.episodes} | {figs} | {rec} | {self.total_s:.0f} |"


@dataclass
class Scenario:
    """One fault: what it does (``inject`` returns when the fault is over), and what a good end looks like."""

    name: str
    inject: Callable[[Tier, Any], None]
    expect: tuple[str, str | None] = (states.SUCCEEDED, None)
    killed: tuple[str, ...] = ()  # fleet processes the fault itself stops (not counted as exited)
    # episodes the fault hit directly (ctx["victims"]) may also end as an infrastructure failure
    victims_may: tuple[tuple[str, str | None], ...] = ((states.FAILED, states.CAUSE_INFRA),)
    # an end any episode may have under this fault (counted in the notes)
    any_may: tuple[tuple[str, str | None], ...] = ()
    model: str = "scripted"  # or "openai": the in-process OpenAI-compatible server (slow/hung model)
    private_docker: bool = False  # runs on a Tier whose env workers use a private dockerd


def tier_settings(redis_url: str, state_dir: str, image: str, **over: Any) -> Settings:
    """Short leases, TTLs and sweeps, so a fault's effects show (and heal) in seconds."""
    base = dict(
        redis_url=redis_url,
        state_dir=state_dir,
        host_name="faults",
        default_image=image,
        command_timeout_s=5,
        eval_timeout_s=10,
        model_timeout_s=3,
        model_max_retries=2,
        model_backoff_base_s=0.2,
        model_backoff_max_s=1,
        boot_timeout_s=8,
        pull_timeout_s=5,
        visibility_timeout_s=45,
        episode_budget_s=240,
        container_lifetime_s=300,
        episode_guard_s=400,
        lease_s=6,
        host_ttl_s=6,
        sweep_interval_s=1,
        admit_start_timeout_s=20,
        host_capacity=4,
        boot_concurrency=2,
        metrics_port=0,
        task_events=False,
        stall_timeout_s=8,
    )
    base.update(over)
    return Settings.load(**base)


class Tier:
    """A Redis with AOF and a local fleet shared by the scenarios; run one scenario at a time."""

    def __init__(
        self,
        *,
        episodes: int = 24,
        recorder_down_s: float = 60.0,
        worker_down_s: float = 3.0,
        redis_down_s: float = 5.0,
        batch_timeout_s: float = 240.0,
        echo: Callable[[str], None] = print,
        private_docker: bool = False,
    ):
        import docker

        from megaflow.env_hosts.images import ensure_sandbox_image

        self.episodes, self.recorder_down_s, self.worker_down_s = episodes, recorder_down_s, worker_down_s
        self.redis_down_s, self.batch_timeout_s, self.echo = redis_down_s, batch_timeout_s, echo
        self.tmp = Path(tempfile.mkdtemp(prefix="mf-faults-"))
        self.redis = RedisAOF(self.tmp, free_port())
        self.dockerd: PrivateDockerd | None = None
        self._docker_host_before = os.environ.get("DOCKER_HOST")
        shared = docker.from_env(timeout=120)
        image = ensure_sandbox_image(shared, Settings.load().default_image)
        if private_docker:  # the fleet (its processes inherit DOCKER_HOST) and this client use the private engine
            shared.close()
            self.dockerd = PrivateDockerd(Path(tempfile.mkdtemp(prefix="mf-dockerd-", dir="/tmp")))
            self.dockerd.start()
            self.dockerd.load(image)
            os.environ["DOCKER_HOST"] = self.dockerd.host
            self.docker = docker.DockerClient(base_url=self.dockerd.host, timeout=120)
        else:
            self.docker = shared
        self.settings = tier_settings(self.redis.url, str(self.tmp / "state"), image)
        self.model_server: Any = None
        self.client: Client | None = None

    # --- lifetime -------------------------------------------------------------------------------
    def __enter__(self) -> Tier:
        from megaflow.core.spec import SUBMIT_WORD
        from tests.openai_server import OpenAIServer

        self.redis.start()
        self.model_server = OpenAIServer("faults-model").start()
        self.model_server.reply_text = SUBMIT_WORD
        # a client that timed out on a hung request closes its socket: not worth a traceback here
        self.model_server._httpd.handle_error = lambda request, address: None
        self.up()
        self.client = Client(self.settings)
        return self

    def __exit__(self, *exc: object) -> None:
        fleet.down(self.settings, echo=lambda m: None)
        if self.client:
            self.client.close()
        if self.model_server:
            self.model_server.stop()
        self.redis.stop()
        for c in self._containers({}):
            self._remove(c)
        self.docker.close()
        if self.dockerd is not None:
            self.dockerd.stop()
            if self._docker_host_before is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = self._docker_host_before
            shutil.rmtree(self.dockerd.dir, ignore_errors=True)
        keep = os.environ.get("MEGAFLOW_FAULTS_KEEP")  # a directory: keep the logs of the run there
        if keep:
            shutil.copytree(
                self.tmp, Path(keep) / self.tmp.name, ignore=shutil.ignore_patterns("*.aof", "*.rdb", "artifacts")
            )
        shutil.rmtree(self.tmp, ignore_errors=True)

    def up(self) -> None:
        """Start every fleet process that is not running and wait until it answers."""
        self._call(lambda: fleet.up(self.settings, env_hosts=2, wait_s=180, echo=lambda m: None))

    def kill(self, *names: str, sig: int = signal.SIGKILL) -> None:
        alive = fleet.running(self.settings)
        for name in names:
            if name in alive:
                os.killpg(alive[name], sig)
        deadline = time.monotonic() + 30
        while any(n in fleet.running(self.settings) for n in names) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _containers(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """This fleet's containers with these labels (the API's summaries: no per-container inspect to race)."""
        filters = [f"megaflow.fleet={self.settings.fleet_id}", *(f"{k}={v}" for k, v in labels.items())]
        return self.docker.api.containers(all=True, filters={"label": filters})

    def _remove(self, c: dict[str, Any], kill_only: bool = False) -> None:
        import docker

        try:
            self.docker.api.kill(c["Id"]) if kill_only else self.docker.api.remove_container(c["Id"], force=True)
        except docker.errors.APIError:  # gone already, or not running
            pass

    # --- one scenario ---------------------------------------------------------------------------
    def specs(self, sc: Scenario) -> list[dict[str, Any]]:
        from megaflow.demo_tasks import demo_specs

        if sc.model == "openai":
            base = demo_specs("noop")
            for s in base:
                s["model"] = {"backend": "openai", "endpoints": [self.model_server.base_url]}
        else:
            base = demo_specs("fix")
        return [base[i % len(base)] for i in range(self.episodes)]

    def run(self, sc: Scenario) -> Result:
        """Submit a batch, inject the fault once episodes are in flight, and measure the aftermath."""
        assert self.client is not None
        t_start = time.monotonic()
        res = Result(sc.name, self.episodes)
        before = fleet.running(self.settings)
        sub = self.client.submit(self.specs(sc), user=sc.name)
        ids = sub.episode_ids
        if not self._wait_in_flight(sub.batch_id, 3):
            res.notes.append("fewer than 3 episodes were in flight after 120s; the fault was injected anyway")
        snapshot = self._steps(ids)
        in_flight = {e: s for e, s in snapshot.items() if s is not None}
        t_fault = time.monotonic()
        ctx = {"batch": sub.batch_id, "ids": ids}
        sc.inject(self, ctx)
        if "victims" in ctx and not ctx["victims"]:
            res.notes.append("the fault found no running episode's container to hit")
        if "hit" in ctx:
            res.hit = ctx["hit"]
            res.notes.append(f"{ctx['hit']} containers were running when the engine stopped")
        res.recovery_s, finished = self._follow(ids, in_flight, t_fault)
        res.lost = len(ids) - finished
        now_alive = fleet.running(self.settings)
        res.exited = sum(1 for n, pid in before.items() if now_alive.get(n) != pid and n not in sc.killed)
        self._restore()
        res.dup = self._duplicates(sub.batch_id)
        allowed = {e: {sc.expect, *sc.any_may} for e in ids}
        allowed.update({e: {sc.expect, *sc.any_may, *sc.victims_may} for e in ctx.get("victims", ())})
        res.wrong = self._wrong(ids, sc.expect, res.notes, allowed)
        self._notes = res.notes
        res.slots = self._held_after_lease(ids)
        res.containers = self._containers_after_reap(sub.batch_id)
        res.stranded = self._stranded(ids)
        res.total_s = time.monotonic() - t_start
        if not res.ok():  # keep the fleet's logs of a scenario that went wrong
            where = Path(tempfile.gettempdir()) / f"mf-faults-logs-{sub.batch_id}"
            shutil.copytree(Path(self.settings.state_dir) / "logs", where, dirs_exist_ok=True)
            res.notes.append(f"fleet logs kept in {where}")
        return res

    def _restore(self) -> None:
        """Bring back what a scenario left down (a host gone for good comes back for the next one)."""
        if self.redis.proc is None:
            self.redis.start()
        self.up()

    def _call(self, fn: Callable[[], Any], wait_s: float = 60.0) -> Any:
        """``fn()``, retried while Redis is down (a scenario may have stopped it)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _wait_in_flight(self, batch_id: str, n: int, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = self.client.results(batch_id)
            if sum(v["state"] in (states.ENV_STARTING, states.RUNNING, states.EVALUATING) for v in views) >= n:
                return True
            time.sleep(0.1)
        return False

    def _steps(self, ids: list[str]) -> dict[str, int | None]:
        """Step of each live episode (None once final)."""
        keys = self.client.rt.keys
        pipe = self.client.rt.redis.pipeline(transaction=False)
        for eid in ids:
            pipe.hmget(keys.episode(eid), "step", "terminal")
        out = {}
        for eid, (step, terminal) in zip(ids, pipe.execute(), strict=True):
            out[eid] = None if terminal == "1" else int(step or 0)
        return out

    def _follow(self, ids: list[str], in_flight: dict[str, int], t_fault: float) -> tuple[float | None, int]:
        """Poll until the batch is final (or times out); (recovery time, episodes final)."""
        moved: set[str] = set()
        recovery = None
        deadline = time.monotonic() + self.batch_timeout_s
        finished = 0
        while time.monotonic() < deadline:
            steps = self._call(lambda: self._steps(ids))
            moved |= {e for e, s in in_flight.items() if steps[e] is None or steps[e] != s}
            if recovery is None and len(moved) == len(in_flight):
                recovery = time.monotonic() - t_fault
            finished = sum(1 for s in steps.values() if s is None)
            if finished == len(ids):
                break
            time.sleep(0.25)
        return recovery, finished

    def _duplicates(self, batch_id: str) -> int:
        r, keys = self.client.rt.redis, self.client.rt.keys
        finishes: dict[str, int] = {}
        for _id, fields in r.xrange(keys.events):
            ev = json.loads(fields["e"])
            if ev.get("batch_id") == batch_id and ev.get("phase") == "finished":
                finishes[ev["episode_id"]] = finishes.get(ev["episode_id"], 0) + 1
        return sum(1 for n in finishes.values() if n > 1)

    def _wrong(
        self,
        ids: list[str],
        expect: tuple[str, str | None],
        notes: list[str],
        allowed: dict[str, set] | None = None,
        wait_s: float = 30.0,
    ) -> int:
        """Episodes whose final state, or whose record in the metadata store, is not ``expect`` (or, for the
        fault's direct victims, one of ``allowed[episode]``)."""
        views = {v["episode_id"]: v for v in self.client.rt.engine.summaries(ids)}
        ok = {e: (allowed or {}).get(e, {expect}) for e in ids}
        bad = {e for e, v in views.items() if (v["state"], v["cause"] or None) not in ok[e]}
        other = sum(1 for e, v in views.items() if e not in bad and (v["state"], v["cause"] or None) != expect)
        if other:
            notes.append(f"{other} episode(s) ended in an accepted other way (an infrastructure failure)")
        for e in sorted(bad)[:3]:
            notes.append(f"{e}: {views[e]['state']} {views[e]['cause']} {(views[e]['error'] or '')[:120]}")
        store = self.client.rt.metadata
        pending = set(ids) - bad
        deadline = time.monotonic() + wait_s  # the recorder may lag (or have been down)
        while pending and time.monotonic() < deadline:
            pending = {e for e in pending if (store.get_task(e) or {}).get("state") != views[e]["state"]}
            if pending:
                time.sleep(0.5)
        if pending:
            notes.append(f"{len(pending)} records disagree with Redis, e.g. {sorted(pending)[0]}")
        return len(bad) + len(pending)

    def _held(self, ids: list[str]) -> int:
        rm = self.client.rt.resources
        r = self.client.rt.redis
        pipe = r.pipeline(transaction=False)
        for eid in ids:
            pipe.hexists(rm._k("held"), eid)
            pipe.zscore(rm._k("global"), eid)
            pipe.hexists(rm._k("queued"), eid)
        res = pipe.execute()
        now = self.client.rt.resources._now_ms()
        held = [e for i, e in enumerate(ids) if res[3 * i] or res[3 * i + 2] or (res[3 * i + 1] or 0) > now]
        self._held_ids = held
        return len(held)

    def _held_after_lease(self, ids: list[str]) -> int:
        deadline = time.monotonic() + self.settings.lease_s + 3 * self.settings.sweep_interval_s
        while (n := self._held(ids)) and time.monotonic() < deadline:
            time.sleep(0.25)
        if n:
            self._notes.append(f"still held: {self._held_ids[:3]}")
        return n

    def _containers_after_reap(self, batch_id: str) -> int:
        # one reaper pass: the env worker's maintenance runs every max(10 s, heartbeat period)
        deadline = time.monotonic() + 12 + self.settings.lease_s
        while (left := self._containers({"megaflow.run": batch_id})) and time.monotonic() < deadline:
            time.sleep(0.5)
        return len(left)

    def _stranded(self, ids: list[str]) -> int:
        from megaflow.control import audit

        return len(audit(self.client.rt, ids))


# --- the faults ------------------------------------------------------------------------------------
def _kill(*names: str, down: str = "worker_down_s") -> Callable[[Tier, Any], None]:
    def inject(t: Tier, ctx: Any) -> None:
        t.kill(*names)
        time.sleep(getattr(t, down))  # the fault's length (a scenario parameter, not a wait for something)
        t.up()

    return inject


def _redis(sig: int) -> Callable[[Tier, Any], None]:
    def inject(t: Tier, ctx: Any) -> None:
        t.redis.stop(sig)
        time.sleep(t.redis_down_s)
        t.redis.start()

    return inject


def _container(action: str) -> Callable[[Tier, Any], None]:
    def inject(t: Tier, ctx: Any) -> None:
        # containers of episodes past their set-up and before evaluation (a container that dies during
        # set-up is blamed on the task today: cause "setup"; see the report)
        deadline = time.monotonic() + 60
        while True:  # wait for containers of running episodes
            states_now = {v["episode_id"]: v["state"] for v in t.client.results(ctx["batch"])}
            if states.RUNNING in states_now.values() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        running = [
            c
            for c in t._containers({"megaflow.run": ctx["batch"]})
            if c["State"] == "running" and states_now.get(c["Labels"].get("megaflow.episode")) == states.RUNNING
        ]
        ctx["victims"] = [c["Labels"].get("megaflow.episode") for c in running[:2]]
        for c in running[:2]:
            t._remove(c, kill_only=action == "kill")

    return inject


def _host_gone(comes_back: bool) -> Callable[[Tier, Any], None]:
    def inject(t: Tier, ctx: Any) -> None:
        t.kill("env-2")
        if not comes_back:  # the machine is gone: its containers with it
            for c in t._containers({"megaflow.host": "env-2"}):
                t._remove(c)
            return
        # back after it was marked lost and its episodes moved: its old containers must be reaped
        rm = t.client.rt.resources
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(h["name"] == "env-2" for h in t._call(rm.hosts)):
            time.sleep(0.2)
        t.up()

    return inject


def _leave(t: Tier, ctx: Any) -> None:
    """Tell env-2 to leave: it drains (its episodes finish there), then its worker stops by itself."""
    t.client.rt.resources.leave_host("env-2")
    deadline = time.monotonic() + 180
    while "env-2" in fleet.running(t.settings):
        if time.monotonic() > deadline:
            raise TimeoutError("env-2 was told to leave and did not stop within 180s")
        time.sleep(0.2)
    assert all(h["name"] != "env-2" for h in t.client.rt.resources.hosts()), "env-2 still registered"


def _slow_model(t: Tier, ctx: Any) -> None:
    server = t.model_server
    server.slow_s = t.settings.model_timeout_s + 2  # hung: past the client's time-out, then retried
    server.inject("slow", 4)
    server.delay_s = 1.5  # slow: every reply late, within the time-out
    time.sleep(t.worker_down_s * 3)
    server.delay_s = 0.0


def _docker_restart(t: Tier, ctx: Any) -> None:
    """Restart the (private) Docker engine: running containers stop with it and stay stopped."""
    assert t.dockerd is not None, "docker-restart runs only on a Tier with private_docker=True"
    deadline = time.monotonic() + 60
    while not any(c["State"] == "running" for c in t._containers({"megaflow.run": ctx["batch"]})):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)  # episodes in flight may still be booting: restart once containers run
    ctx["victims"] = [v["episode_id"] for v in t.client.results(ctx["batch"]) if v["state"] in states.LIVE]
    ctx["hit"] = sum(1 for c in t._containers({"megaflow.run": ctx["batch"]}) if c["State"] == "running")
    t.dockerd.stop(signal.SIGTERM)
    time.sleep(t.worker_down_s)  # the engine's time away (a scenario parameter, not a wait for something)
    t.dockerd.start()


SCENARIOS = [
    Scenario("none", lambda t, ctx: None),
    Scenario("kill-agent", _kill("agent"), killed=("agent",)),
    Scenario("kill-model", _kill("model"), killed=("model",)),
    Scenario("kill-env", _kill("env-1"), killed=("env-1",)),
    Scenario("kill-control", _kill("control"), killed=("control",)),
    Scenario(
        "kill-all",
        _kill("control", "model", "agent", "env-1", "env-2"),
        killed=("control", "model", "agent", "env-1", "env-2"),
    ),
    Scenario("redis-stop", _redis(signal.SIGTERM)),
    Scenario("redis-kill", _redis(signal.SIGKILL)),
    Scenario("container-kill", _container("kill")),
    Scenario("container-remove", _container("remove")),
    Scenario("recorder-down", _kill("control", down="recorder_down_s"), killed=("control",)),
    # with its only endpoint hung, the gateway marks it unhealthy for model_cooldown_s: steps then in
    # flight end as infrastructure failures (never scored, re-run by `megaflow resume`)
    Scenario(
        "model-slow-hung",
        _slow_model,
        expect=(states.FAILED, states.CAUSE_TESTS),
        model="openai",
        any_may=((states.FAILED, states.CAUSE_INFRA),),
    ),
    Scenario("env-host-leave", _leave, killed=("env-2",)),
    Scenario("env-host-lost-back", _host_gone(True), killed=("env-2",)),
    Scenario("env-host-gone", _host_gone(False), killed=("env-2",)),
    # episodes whose container went with the engine may end as infrastructure failures (re-run by resume)
    Scenario("docker-restart", _docker_restart, private_docker=True),
]
BY_NAME = {s.name: s for s in SCENARIOS}

HEADER = (
    "| fault | episodes | lost | dup | wrong | slots | containers | stranded | exited | recovery s | total s |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--only", default="", help="comma-separated scenario names: " + ", ".join(BY_NAME))
    parser.add_argument("--recorder-down-s", type=float, default=60.0)
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(BY_NAME)}")
    started = time.monotonic()
    results = []
    print(HEADER, flush=True)
    for private in (False, True):
        todo = [n for n in names if BY_NAME[n].private_docker == private]
        if not todo:
            continue
        with Tier(episodes=args.episodes, recorder_down_s=args.recorder_down_s, private_docker=private) as tier:
            for name in todo:
                res = tier.run(BY_NAME[name])
                results.append(res)
                print(res.row(), flush=True)
    for res in results:
        for note in res.notes:
            print(f"  {res.name}: {note}")
    print(
        f"{len(results)} scenarios in {time.monotonic() - started:.0f}s; "
        f"{'every count 0' if all(r.ok() for r in results) else 'SOME COUNTS ARE NOT 0'}"
    )
    sys.exit(0 if all(r.ok() for r in results) else 1)


if __name__ == "__main__":
    main()
