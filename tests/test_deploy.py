"""deploy/ansible converged for real: site.yml on three test hosts (systemd in Docker), then a fleet.

One module-scoped cluster: scripts/testhosts.py boots a control host (redis, flower, model, agent,
control) and two env hosts (the machine's Docker engine through its socket), site.yml converges them,
and the tests below run in order against it: units active, a demo batch across both env hosts (records,
Flower), a second run with changed=0, a changed setting that restarts only the env workers while a batch
runs (no episode lost), and drain / re-enable of one env host. The hosts are removed at the end.

    .venv/bin/python -m pytest -m deploy tests/test_deploy.py -s

Skipped without Docker / Ansible / mmdebstrap locally, failed without them in CI (CI=true).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megaflow.core.settings import Settings
from tests.helpers import wait_until

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "deploy" / "ansible"
IN_CI = os.environ.get("CI") == "true"
PREFIX = f"mf-deploy-{os.getpid()}"
CTL, ENVS = "th-ctl", ("th-env1", "th-env2")
UNITS = {
    CTL: ("redis-server", "megaflow-flower", "megaflow-worker-model", "megaflow-worker-agent", "megaflow-control"),
    **{h: ("megaflow-worker-env",) for h in ENVS},
}
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


def _missing() -> str | None:
    from tests.conftest import docker_available

    if not docker_available():
        return "no Docker engine running (start it with `make test`)"
    if not shutil.which("mmdebstrap"):
        return "mmdebstrap is not installed (scripts/setup.sh installs it)"
    bindir = Path(sys.executable).parent
    if not (bindir / "ansible-playbook").exists():
        return "ansible-core is not installed (pip install -r requirements-dev.txt)"
    try:
        import ansible_collections.community.docker  # noqa: F401  (bundled by the `ansible` package)
    except ImportError:
        return "the community.docker collection is missing (pip install -r requirements-dev.txt)"
    return None


def _host(name: str) -> str:
    from scripts.testhosts import container_name

    return container_name(PREFIX, name.removeprefix("th-"))


def _exec(host: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", "exec", _host(host), *cmd], capture_output=True, text=True, timeout=timeout, check=False
    )


class Cluster:
    """The test hosts, their inventory and the playbook runs made against them."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.inventory = tmp / "inventory"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        self.env.update(
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}",
                "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
                "ANSIBLE_HOME": str(tmp / "ansible-home"),
                "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_FORCE_COLOR": "0",
                "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",  # each log ends with the slowest tasks
                "TMPDIR": str(tmp),
            }
        )
        self.runs = 0

    def playbook(self, *args: str, timeout: float = 900) -> tuple[dict[str, dict[str, int]], float]:
        """Run ansible-playbook; return (recap per host, seconds). Fails with the log's tail on error."""
        self.runs += 1
        log = self.tmp / f"run{self.runs}.log"
        started = time.monotonic()
        with log.open("w") as fh:
            proc = subprocess.run(
                [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory / "hosts.yml"), *args],
                cwd=ANSIBLE_DIR,
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        took = time.monotonic() - started
        text = log.read_text()
        assert proc.returncode == 0, f"ansible-playbook {' '.join(args)} failed:\n{text[-8000:]}"
        recap = {
            m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
            for m in RECAP.finditer(text)
        }
        return recap, took

    def settings(self, tmp: Path) -> Settings:
        """The control host's own settings (its megaflow.env), for a client on this machine."""
        text = _exec(CTL, "cat", "/etc/megaflow/megaflow.env").stdout
        values = {}
        for line in text.splitlines():
            if line.startswith("MEGAFLOW_"):
                key, _, value = line.partition("=")
                text_value = re.sub(r'\\(["\\$`])', r"\1", value[1:-1])
                # mappings (env_backend, elastic) are JSON in the env file, as the environment gives them
                values[key[len("MEGAFLOW_") :].lower()] = (
                    json.loads(text_value) if text_value[:1] == "{" else text_value
                )
        values.update(state_dir=str(tmp), metadata_url="", artifacts_url="", host_name="deploy-test-controller")
        return Settings.load(**values)

    def unit_ids(self) -> dict[tuple[str, str], str]:
        """(host, unit) -> systemd InvocationID: a new one means the unit was restarted."""
        out = {}
        for host, units in UNITS.items():
            for unit in units:
                out[(host, unit)] = _exec(
                    host, "systemctl", "show", "-p", "InvocationID", "--value", unit
                ).stdout.strip()
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = _missing()
    if reason:
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    import docker

    from megaflow.env_hosts.images import ensure_sandbox_image
    from scripts import testhosts

    tmp = tmp_path_factory.mktemp("deploy")
    cl = Cluster(tmp)
    client = docker.from_env(timeout=300)
    try:
        ensure_sandbox_image(client, Settings.load().default_image)  # the env hosts use this engine's image
    finally:
        client.close()
    try:
        started = time.monotonic()
        testhosts.create(PREFIX, {"ctl": False, **{h.removeprefix("th-"): True for h in ENVS}})
        testhosts.write_inventory(cl.inventory, PREFIX, [h.removeprefix("th-") for h in ENVS])
        print(f"\n[deploy] 3 test hosts booted in {time.monotonic() - started:.1f}s")
        recap, took = cl.playbook("site.yml")
        print(
            f"[deploy] converge of 3 hosts: {took:.1f}s; changed per host: "
            f"{ {h: r['changed'] for h, r in recap.items()} }"
        )
        cl.converge_s = took
        yield cl
    finally:
        testhosts.remove(PREFIX)


def _journals(lines: int = 40) -> str:
    """The last lines of every unit's journal on every host: what a failed check shows."""
    out = []
    for host, units in UNITS.items():
        for unit in units:
            log = _exec(host, "journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short-monotonic")
            out.append(f"--- {host} {unit}\n{log.stdout}{log.stderr}")
    return "\n".join(out)


def test_every_unit_is_active_on_every_host(cluster):
    for host, units in UNITS.items():
        proc = _exec(host, "systemctl", "is-active", *units)
        assert proc.stdout.split() == ["active"] * len(units), f"{host}: {dict(zip(units, proc.stdout.split()))}"
    import redis

    # The provisioned Redis itself, from this machine (the hosts share its network): AOF on, noeviction.
    client = redis.Redis.from_url(cluster.settings(cluster.tmp).redis_url, decode_responses=True)
    try:
        conf = client.config_get("*")
    finally:
        client.close()
    assert conf["appendonly"] == "yes" and conf["maxmemory-policy"] == "noeviction", conf
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=int(conf["port"]), socket_timeout=5).ping()


def _run_batch(settings: Settings, specs: list[dict], user: str, timeout_s: float = 420):
    from megaflow.client import Client

    with Client(settings) as client:
        sub = client.submit(specs, user=user)
        client.wait(sub.batch_id, timeout=timeout_s)
        return sub, client.results(sub.batch_id)


def _assert_own_results(results: list[dict], want: str) -> None:
    bad = [
        (r["task_id"], r["state"], r.get("cause"), (r.get("error") or "")[:200])
        for r in results
        if r["state"] != want or r.get("cause") == "infra"
    ]
    assert not bad, f"want every episode {want} by its own result: {bad}"


def _records(batch_id: str, n: int, timeout_s: float = 120) -> list[dict]:
    """The batch's task documents, read on the control host (SQLite there), once all n are final."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc = _exec(CTL, "/usr/local/bin/megaflow", "status", batch_id, "--json")
        docs = json.loads(proc.stdout)["episodes"] if proc.returncode == 0 else []
        if len(docs) == n and all(d["state"] in ("SUCCEEDED", "FAILED") for d in docs):
            return docs
        assert time.monotonic() < deadline, f"records of {batch_id} incomplete: {proc.stdout[-2000:]}{proc.stderr}"
        time.sleep(1)


def test_demo_batch_runs_across_both_env_hosts(cluster, tmp_path):
    from megaflow.client import Client
    from megaflow.demo_tasks import demo_specs

    settings = cluster.settings(tmp_path)
    started = time.monotonic()
    with Client(settings) as client:
        fix = client.submit(demo_specs("fix"), user="deploy-fix")
        noop = client.submit(demo_specs("noop"), user="deploy-noop")
        for sub in (fix, noop):
            client.wait(sub.batch_id, timeout=420)
        res_fix, res_noop = client.results(fix.batch_id), client.results(noop.batch_id)
    print(f"[deploy] demo batches ({len(res_fix)} fix + {len(res_noop)} no-op): {time.monotonic() - started:.1f}s")
    _assert_own_results(res_fix, "SUCCEEDED")
    _assert_own_results(res_noop, "FAILED")
    hosts = set()
    for sub, n in ((fix, len(res_fix)), (noop, len(res_noop))):
        hosts |= {d["host"] for d in _records(sub.batch_id, n)}
    assert hosts == set(ENVS), f"episodes ran on {hosts}"
    # Flower on the control host lists every worker of the fleet (HTTP API, basic auth).
    import httpx

    url = f"http://127.0.0.1:{settings.flower_port}/api/workers"
    auth = (settings.flower_user, settings.flower_password.get_secret_value())
    assert httpx.get(url, timeout=30).status_code == 401
    want = {"model@th-ctl", "agent@th-ctl", *(f"env@{h}" for h in ENVS)}
    deadline = time.monotonic() + 60
    while True:
        workers = set(httpx.get(url, params={"refresh": "1"}, auth=auth, timeout=30).json())
        if want <= workers:
            break
        assert time.monotonic() < deadline, f"Flower lists {workers}, want {want}"
        time.sleep(2)


def test_second_run_changes_nothing(cluster):
    before = cluster.unit_ids()
    recap, took = cluster.playbook("site.yml")
    print(f"[deploy] second run: {took:.1f}s; changed per host: { {h: r['changed'] for h, r in recap.items()} }")
    assert set(recap) == {CTL, *ENVS}
    assert all(r["changed"] == 0 for r in recap.values()), recap
    assert cluster.unit_ids() == before, "an idempotent run restarted a unit"


def test_changed_setting_restarts_only_its_units_and_loses_no_episode(cluster, tmp_path):
    """env_concurrency of the env hosts changes while a batch runs: only the env workers restart (warmly).

    Each model reply takes 30 s (the scripted model's simulated generation), so the episodes are in
    the middle of their work, containers up, when the playbook restarts the env workers: a demo
    episode alone is over in seconds, sooner than a playbook run."""
    from megaflow.client import Client
    from megaflow.core.states import TERMINAL
    from megaflow.demo_tasks import demo_specs

    settings = cluster.settings(tmp_path)
    before = cluster.unit_ids()
    specs = demo_specs("fix")[:8]
    for spec in specs:
        spec["model"]["latency_s"] = 30
    with Client(settings) as client:
        sub = client.submit(specs, user="deploy-restart")

        def seen() -> list[tuple]:
            return [(r["task_id"], r["state"], r.get("host")) for r in client.results(sub.batch_id)]

        wait_until(
            lambda: any(state == "RUNNING" for _, state, _ in seen()),
            300,
            lambda: f"an episode RUNNING: {seen()}\n{_journals()}",
            0.5,
        )
        # A group variable of env_hosts, as an operator would change it (an -e would reach every host).
        with (cluster.inventory / "group_vars" / "env_hosts.yml").open("a") as fh:
            fh.write("megaflow_env_concurrency: 3\n")
        recap, took = cluster.playbook("site.yml", "--tags", "config")
        print(
            f"[deploy] config run (env_concurrency 4 -> 3) mid-batch: {took:.1f}s; "
            f"changed per host: { {h: r['changed'] for h, r in recap.items()} }"
        )
        unfinished = [r["task_id"] for r in client.results(sub.batch_id) if r["state"] not in TERMINAL]
        assert unfinished, "the batch ended before the playbook restarted the env workers: not a mid-batch change"
        client.wait(sub.batch_id, timeout=420)
        results = client.results(sub.batch_id)
    _assert_own_results(results, "SUCCEEDED")
    after = cluster.unit_ids()
    restarted = {key for key in before if before[key] != after[key]}
    assert restarted == {(h, "megaflow-worker-env") for h in ENVS}, restarted
    assert recap[CTL]["changed"] == 0 and all(recap[h]["changed"] > 0 for h in ENVS), recap
    for host in ENVS:
        unit = _exec(host, "systemctl", "cat", "megaflow-worker-env").stdout
        assert "--concurrency 3" in unit


def test_drain_and_reenable_one_env_host(cluster, tmp_path):
    from megaflow.demo_tasks import demo_specs

    settings = cluster.settings(tmp_path)
    drained, other = ENVS
    recap, took = cluster.playbook("drain.yml", "-e", f"host={drained}")
    print(f"[deploy] drain play: {took:.1f}s")
    assert recap[drained]["changed"] == 1
    health = json.loads(_exec(CTL, "/usr/local/bin/megaflow", "host", "health", drained, "--json").stdout)
    assert health["ok"] and health["drained"], health
    _, results = _run_batch(settings, demo_specs("fix")[:4], "deploy-drain")
    _assert_own_results(results, "SUCCEEDED")
    assert {r["host"] for r in results} == {other}, "a drained host took episodes"
    recap, _ = cluster.playbook("drain.yml", "-e", f"host={drained}", "-e", "undo=true")
    assert recap[drained]["changed"] == 1
    local = json.loads(_exec(drained, "/usr/local/bin/megaflow", "host", "health", "--json").stdout)
    assert local["ok"] and local["local"] and not local["drained"], local
    assert {c["name"] for c in local["checks"]} == {"daemon", "disk", "image", "worker"}
