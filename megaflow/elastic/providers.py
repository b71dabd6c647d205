"""Providers: how the autoscaler starts and stops env hosts.

``Provider`` is the whole interface (launch, terminate, list). ``LocalProvider`` runs env workers as
processes on this machine (like ``megaflow up``); ``Ec2Provider`` launches instances from a launch
template through boto3. Backends are imported lazily: boto3 loads only for EC2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from megaflow.core.settings import Settings
from megaflow.elastic.config import Ec2ProviderConfig, ElasticConfig, LocalProviderConfig


@dataclass
class HostHandle:
    """One host the provider started: its fleet name, the provider's id for it, its instance type."""

    name: str
    ref: str
    instance_type: str
    launched_at: float


class Provider(Protocol):
    """Starts and stops env hosts; a started host joins the fleet by itself (its env worker registers)."""

    def launch(self, n: int) -> list[HostHandle]: ...

    def terminate(self, host: HostHandle) -> None: ...

    def alive(self, host: HostHandle) -> bool: ...

    def close(self) -> None: ...


class LocalProvider:
    """Env workers (``megaflow worker env --host NAME``) as child processes with their own session.

    Each writes a pid file beside the local fleet's (``STATE_DIR/fleet/NAME.pid``), so ``megaflow down``
    stops autoscaled hosts too, and a name whose worker still runs (started by an earlier control
    process) is never given to a second worker.
    """

    def __init__(self, settings: Settings, cfg: LocalProviderConfig):
        self.settings = settings
        self.cfg = cfg
        self.logs = Path(settings.state_dir) / "logs"
        self.pids = Path(settings.state_dir) / "fleet"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.seq = 0

    def _next_name(self) -> str:
        """``PREFIX-N`` for the next N whose name no live worker of this machine holds."""
        while True:
            self.seq += 1
            name = f"{self.cfg.name_prefix}-{self.seq}"
            if name in self.procs:
                continue
            try:
                ref = (self.pids / f"{name}.pid").read_text().strip()
            except OSError:
                return name
            if not self._pid_is_worker(HostHandle(name, ref, self.cfg.instance_type, 0.0)):
                return name

    def launch(self, n: int) -> list[HostHandle]:
        env = dict(os.environ, **self.settings.to_env())
        if self.cfg.env_backend is not None:
            import json

            env["MEGAFLOW_ENV_BACKEND"] = json.dumps(self.cfg.env_backend)
        out = []
        for _ in range(n):
            name = self._next_name()
            with open(self.logs / f"{name}.log", "ab") as log:
                p = subprocess.Popen(
                    [sys.executable, "-m", "megaflow", "worker", "env", "--host", name],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.procs[name] = p
            (self.pids / f"{name}.pid").write_text(str(p.pid))
            out.append(HostHandle(name, str(p.pid), self.cfg.instance_type, time.time()))
        return out

    def terminate(self, host: HostHandle, timeout_s: float = 20.0) -> None:
        """SIGTERM (warm shutdown), SIGKILL after ``timeout_s``; reaps the child."""
        p = self.procs.pop(host.name, None)
        try:
            if p is None:  # started by an earlier control process: stop it by its pid (process group)
                self._stop_pid(host, timeout_s)
            elif p.poll() is None:
                self._stop_child(p, timeout_s)
        finally:
            pidfile = self.pids / f"{host.name}.pid"
            try:
                if p is not None or pidfile.read_text().strip() == host.ref:
                    pidfile.unlink(missing_ok=True)
            except OSError:
                pass

    @staticmethod
    def _stop_child(p: subprocess.Popen, timeout_s: float) -> None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
        except ProcessLookupError:
            pass

    def alive(self, host: HostHandle) -> bool:
        p = self.procs.get(host.name)
        if p is None:
            return self._pid_is_worker(host)
        return p.poll() is None

    def _pid_is_worker(self, host: HostHandle) -> bool:
        """True if ``host.ref`` is a live env worker for ``host.name`` (a control restart lost the child)."""
        try:
            cmd = Path(f"/proc/{int(host.ref)}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{int(host.ref)}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError):
            return False
        return state != "Z" and b"--host" in cmd and host.name.encode() in cmd

    def _stop_pid(self, host: HostHandle, timeout_s: float) -> None:
        if not self._pid_is_worker(host):
            return
        pid = int(host.ref)
        try:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self._pid_is_worker(host):
                time.sleep(0.2)
            if self._pid_is_worker(host):
                os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def usage(self, host: HostHandle) -> dict[str, float]:
        """CPU seconds and resident memory of the host's worker process (from /proc)."""
        p = self.procs.get(host.name)
        if p is None and not self._pid_is_worker(host):
            return {}
        pid = p.pid if p is not None else int(host.ref)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            tick = os.sysconf("SC_CLK_TCK")
            page = os.sysconf("SC_PAGE_SIZE")
            return {"cpu_s": (int(stat[11]) + int(stat[12])) / tick, "rss_mb": int(stat[21]) * page / 2**20}
        except (OSError, IndexError, ValueError):
            return {}

    def close(self) -> None:
        for name in list(self.procs):
            self.terminate(HostHandle(name, "", self.cfg.instance_type, 0.0))


class Ec2Provider:
    """Instances from a launch template, tagged ``megaflow:fleet`` / ``megaflow:host``; user data joins the fleet."""

    def __init__(self, settings: Settings, cfg: Ec2ProviderConfig, client: Any = None):
        self.settings = settings
        self.cfg = cfg
        if client is None:
            import boto3

            client = boto3.client("ec2", region_name=cfg.region, endpoint_url=cfg.endpoint_url)
        self.ec2 = client
        self.seq = 0

    def user_data(self, host: str) -> str:
        """The boot script: the fleet's settings as MEGAFLOW_* lines, then an env worker for ``host``."""
        env = {
            k: v
            for k, v in self.settings.to_env().items()
            if k not in ("MEGAFLOW_HOST_NAME", "MEGAFLOW_STATE_DIR", "MEGAFLOW_ELASTIC")
        }
        lines = "\n".join(f"{k}={v}" for k, v in sorted(env.items()))
        return self.cfg.user_data.replace("{env}", lines).replace("{host}", host)

    def launch(self, n: int) -> list[HostHandle]:
        out = []
        for _ in range(n):
            self.seq += 1
            name = f"{self.cfg.fleet}-{int(time.time())}-{self.seq}"
            tags = {**self.cfg.tags, "megaflow:fleet": self.cfg.fleet, "megaflow:host": name, "Name": name}
            lt_key = "LaunchTemplateId" if self.cfg.launch_template.startswith("lt-") else "LaunchTemplateName"
            kwargs: dict[str, Any] = {
                "LaunchTemplate": {lt_key: self.cfg.launch_template, "Version": self.cfg.launch_template_version},
                "MinCount": 1,
                "MaxCount": 1,
                "UserData": self.user_data(name),
                "TagSpecifications": [
                    {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
                ],
            }
            if self.cfg.instance_type:
                kwargs["InstanceType"] = self.cfg.instance_type
            if self.cfg.subnet_id:
                kwargs["SubnetId"] = self.cfg.subnet_id
            inst = self.ec2.run_instances(**kwargs)["Instances"][0]
            out.append(HostHandle(name, inst["InstanceId"], inst.get("InstanceType") or "", time.time()))
        return out

    def terminate(self, host: HostHandle) -> None:
        self.ec2.terminate_instances(InstanceIds=[host.ref])

    def alive(self, host: HostHandle) -> bool:
        res = self.ec2.describe_instances(InstanceIds=[host.ref])
        states = [i["State"]["Name"] for r in res["Reservations"] for i in r["Instances"]]
        return any(s in ("pending", "running") for s in states)

    def owned(self) -> list[HostHandle]:
        """Running instances tagged with this fleet (to adopt after a control restart)."""
        res = self.ec2.describe_instances(
            Filters=[
                {"Name": "tag:megaflow:fleet", "Values": [self.cfg.fleet]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]
        )
        out = []
        for r in res["Reservations"]:
            for i in r["Instances"]:
                tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
                out.append(
                    HostHandle(
                        tags.get("megaflow:host", i["InstanceId"]),
                        i["InstanceId"],
                        i.get("InstanceType", ""),
                        i["LaunchTime"].timestamp(),
                    )
                )
        return out

    def close(self) -> None:
        self.ec2.close()


def make_provider(settings: Settings, cfg: ElasticConfig) -> LocalProvider | Ec2Provider:
    """The provider named by ``cfg.provider.type``."""
    if isinstance(cfg.provider, Ec2ProviderConfig):
        return Ec2Provider(settings, cfg.provider)
    return LocalProvider(settings, cfg.provider)
