"""deploy/ansible: the playbook parses, the example inventory has every group, and every template
renders with the example inventory into files the code accepts.

Rendering runs the real site.yml in check mode (`--check --diff --tags config`) with a local
connection against the example hosts: nothing is installed, written or restarted, no fact is
gathered, and a small callback plugin collects each rendered file from the diff. Needs ansible-core
(requirements-dev.txt): skipped without it, failed without it in CI.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from megaflow.core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "deploy" / "ansible"
INVENTORY = ANSIBLE_DIR / "inventory.example.ini"
IN_CI = os.environ.get("CI") == "true"
GROUPS = ("redis", "mongodb", "flower", "model_hosts", "agent_hosts", "env_hosts")
WORKER_UNITS = ("megaflow-worker-model.service", "megaflow-worker-agent.service", "megaflow-worker-env.service")
# One host of each kind (agent-2 shows the control service stays on the first agent host;
# env-2 carries per-host overrides in the example inventory).
RENDER_HOSTS = ("redis-1", "mongo-1", "ops-1", "gpu-1", "agent-1", "agent-2", "env-2")
DOMAIN = ".example.internal"
# Characters that break naive quoting in systemd, sh, URLs and redis.conf.
NASTY_PASSWORD = "p@ss w0rd/$HOME\"`id`\\#;:'x"

COLLECTOR = textwrap.dedent('''
    """Writes every task result's rendered files (diff "after") as JSON lines to $MEGAFLOW_COLLECT."""
    import json
    import os

    from ansible.plugins.callback import CallbackBase


    class CallbackModule(CallbackBase):
        CALLBACK_VERSION = 2.0
        CALLBACK_TYPE = "aggregate"
        CALLBACK_NAME = "megaflow_collect"
        CALLBACK_NEEDS_ENABLED = True

        def _write(self, result):
            """One line per rendered file; loop items arrive one by one, with their own rendered args."""
            res, args = result._result, result._task.args
            diff = res.get("diff") or []
            with open(os.environ["MEGAFLOW_COLLECT"], "a") as fh:
                for d in diff if isinstance(diff, list) else [diff]:
                    if not isinstance(d, dict) or not isinstance(d.get("after"), str):
                        continue
                    fh.write(json.dumps({
                        "host": result._host.get_name(), "task": result._task.get_name(),
                        "dest": str(args.get("dest", "")), "mode": str(args.get("mode", "")),
                        "source": os.path.basename(str(d.get("after_header") or "")), "after": d["after"],
                    }) + "\\n")

        def v2_runner_on_ok(self, result):
            if not isinstance(result._result.get("results"), list):
                self._write(result)

        def v2_runner_item_on_ok(self, result):
            self._write(result)
''')


def _tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


@pytest.fixture(scope="module")
def ansible_env(tmp_path_factory) -> dict[str, str]:
    if not _tool("ansible-playbook"):
        msg = "ansible-core is not installed (pip install -r requirements-dev.txt)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("ansible")
    (tmp / "callbacks").mkdir()
    (tmp / "callbacks" / "megaflow_collect.py").write_text(COLLECTOR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_HOME": str(tmp / "home"),
            "ANSIBLE_LOCAL_TEMP": str(tmp / "local"),
            "ANSIBLE_REMOTE_TMP": str(tmp / "remote"),
            "ANSIBLE_GATHERING": "explicit",
            "ANSIBLE_PIPELINING": "True",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_CALLBACK_PLUGINS": str(tmp / "callbacks"),
            "ANSIBLE_CALLBACKS_ENABLED": "megaflow_collect",
            "MEGAFLOW_COLLECT": str(tmp / "rendered.jsonl"),
            "TMPDIR": str(tmp),
        }
    )
    return env


def _run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_tool(args[0]) or args[0], *args[1:]],
        cwd=ANSIBLE_DIR,
        env=env,
        text=True,
        check=False,
        capture_output=True,
        timeout=timeout,
    )


def test_syntax_check(ansible_env):
    proc = _run(ansible_env, "ansible-playbook", "--syntax-check", "-i", str(INVENTORY), "site.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_inventory_has_every_group_and_no_real_addresses(ansible_env):
    proc = _run(ansible_env, "ansible-inventory", "-i", str(INVENTORY), "--list")
    assert proc.returncode == 0, proc.stderr
    inv = json.loads(proc.stdout)
    for group in GROUPS:
        assert inv.get(group, {}).get("hosts"), f"group {group} has no host in {INVENTORY.name}"
    text = INVENTORY.read_text()
    assert not re.search(r"\b(10\.\d+|172\.(1[6-9]|2\d|3[01])|192\.168)\.\d+\.\d+\b", text), "private IP in example"
    hosts = {h for g in GROUPS for h in inv[g]["hosts"]}
    assert all(h.endswith(DOMAIN) for h in hosts), hosts


def test_group_vars_name_every_setting_and_no_secret():
    fields = list(Settings.model_fields)
    names = yaml.safe_load((ANSIBLE_DIR / "roles/common/vars/main.yml").read_text())["common_setting_names"]
    assert len(names) == len(set(names)) and set(names) == set(fields), (
        "a Settings field was added or removed: update common_setting_names in deploy/ansible/roles/common/"
        f"vars/main.yml and megaflow_<field> in group_vars/all.yml (missing: {sorted(set(fields) - set(names))}, "
        f"extra: {sorted(set(names) - set(fields))})"
    )
    all_vars = yaml.safe_load((ANSIBLE_DIR / "group_vars/all.yml").read_text())
    missing = [f for f in fields if f"megaflow_{f}" not in all_vars]
    assert not missing, f"add megaflow_<field> to deploy/ansible/group_vars/all.yml for: {missing}"
    for name, value in all_vars.items():
        if re.search(r"password|secret|api_key|access_key", name) and isinstance(value, str):
            assert "vault_" in str(value), f"{name} must come from a vault_* variable, not a literal"


@pytest.fixture(scope="module")
def rendered(ansible_env, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """host -> destination path -> {content, mode, source, task}, from one check-mode run of site.yml."""
    tmp = tmp_path_factory.mktemp("render")
    extra = {
        "vault_redis_password": NASTY_PASSWORD,
        "vault_mongodb_password": NASTY_PASSWORD,
        "vault_mongodb_admin_password": "mongo-admin-example",
        "vault_flower_password": "flower-example",
        "vault_metrics_password": "metrics-example",
        "vault_s3_access_key_id": "AKIDEXAMPLE",
        "vault_s3_secret_access_key": "s3-secret-example",
        "s3_bucket": "megaflow-artifacts",
        "megaflow_s3_endpoint_url": "http://minio.example.internal:9000",
        "megaflow_manage_services": False,
        "megaflow_diff_secrets": True,
        "ansible_connection": "local",
        "ansible_become": False,  # no sudo: check mode reads as the test user
        "ansible_python_interpreter": sys.executable,
    }
    (tmp / "extra.json").write_text(json.dumps(extra))
    proc = _run(
        ansible_env,
        "ansible-playbook",
        "-i",
        str(INVENTORY),
        "site.yml",
        "--check",
        "--diff",
        "--tags",
        "config",
        "--limit",
        ",".join(h + DOMAIN for h in RENDER_HOSTS),
        "-e",
        f"@{tmp / 'extra.json'}",
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out: dict[str, dict[str, dict]] = {}
    for line in Path(ansible_env["MEGAFLOW_COLLECT"]).read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["host"].removesuffix(DOMAIN), {})[rec["dest"]] = {
            "content": rec["after"],
            "mode": rec["mode"],
            "source": rec["source"],
            "task": rec["task"],
        }
    return out


def parse_env_file(text: str) -> dict[str, str]:
    """The subset of systemd's EnvironmentFile= syntax the template writes: KEY="value" with \\-escapes."""
    env = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
        assert value.startswith('"') and value.endswith('"'), line
        env[key] = re.sub(r'\\(["\\$`])', r"\1", value[1:-1])
    return env


def test_every_template_is_rendered(rendered):
    sources = {f["source"] for files in rendered.values() for f in files.values()}
    templates = {p.name for p in ANSIBLE_DIR.glob("roles/*/templates/*.j2")}
    assert templates - sources == set(), f"templates never rendered: {templates - sources}"


def test_env_file_holds_only_real_settings_and_loads(rendered, monkeypatch):
    megaflow_hosts = [h for h in RENDER_HOSTS if h not in ("redis-1", "mongo-1")]
    fields = set(Settings.model_fields)
    limits = set()
    for host in megaflow_hosts:
        f = rendered[host]["/etc/megaflow/megaflow.env"]
        assert f["mode"] == "0600", f"{host}: megaflow.env mode {f['mode']}"
        env = parse_env_file(f["content"])
        unknown = [k for k in env if k.startswith("MEGAFLOW_") and k[len("MEGAFLOW_") :].lower() not in fields]
        assert not unknown, f"{host}: not Settings fields: {unknown}"
        for key in [k for k in os.environ if k.startswith("MEGAFLOW_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings.load()
        assert settings.host_name == host + DOMAIN
        import redis.connection

        parsed = redis.connection.parse_url(settings.redis_url)
        assert parsed["password"] == NASTY_PASSWORD and parsed["host"] == "redis-1" + DOMAIN
        assert settings.metadata_url.startswith("mongodb://megaflow:") and "@mongo-1" + DOMAIN in settings.metadata_url
        assert settings.artifacts_url == "s3://megaflow-artifacts/megaflow"
        assert settings.flower_password.get_secret_value() == "flower-example"
        assert env["AWS_SECRET_ACCESS_KEY"] == "s3-secret-example"
        limits.add(settings.global_limit)
    assert len(limits) == 1, f"fleet-wide global_limit differs between hosts: {limits}"
    assert limits == {8 + 16 + 8}, "global_limit is the sum of the env hosts' capacities"
    assert (
        parse_env_file(rendered["env-2"]["/etc/megaflow/megaflow.env"]["content"])["MEGAFLOW_ENV_CONCURRENCY"] == "16"
    )


def test_env_file_reads_the_same_in_a_shell(rendered, tmp_path):
    """systemd and `set -a; . megaflow.env` (the wrapper, the image tasks) must see the same values."""
    text = rendered["env-2"]["/etc/megaflow/megaflow.env"]["content"]
    path = tmp_path / "megaflow.env"
    path.write_text(text)
    proc = subprocess.run(
        ["env", "-i", "bash", "-c", f"set -a; . {path}; env -0"], capture_output=True, timeout=10, check=False
    )
    assert proc.returncode == 0, proc.stderr
    shell = dict(kv.split("=", 1) for kv in proc.stdout.decode().split("\0") if "=" in kv)
    for key, value in parse_env_file(text).items():
        assert shell[key] == value, key


def _unit(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_worker_units_stop_warmly_and_read_the_env_file(rendered):
    longest_step = Settings(redis_url="redis://x:1/0").step_time_limit_s
    where = {
        "megaflow-worker-model.service": "gpu-1",
        "megaflow-worker-agent.service": "agent-1",
        "megaflow-worker-env.service": "env-2",
    }
    for name in WORKER_UNITS:
        unit = _unit(rendered[where[name]][f"/etc/systemd/system/{name}"]["content"])
        assert unit["EnvironmentFile"] == ["/etc/megaflow/megaflow.env"], name
        assert unit["Restart"] == ["always"] and unit["KillSignal"] == ["SIGTERM"], name
        assert unit["KillMode"] == ["mixed"], name  # SIGTERM to Celery's main process: warm shutdown
        assert int(unit["TimeoutStopSec"][0]) > longest_step, name
        assert int(unit["LimitNOFILE"][0]) >= 65536, name
        assert unit["ExecStart"][0].startswith("/opt/megaflow/venv/bin/megaflow worker "), name
    env_exec = _unit(rendered["env-2"]["/etc/systemd/system/megaflow-worker-env.service"]["content"])["ExecStart"][0]
    assert "worker env --host env-2.example.internal" in env_exec
    assert "--concurrency 16" in env_exec


def test_services_land_on_their_groups(rendered):
    def units(host):
        return {Path(d).name for d in rendered.get(host, {}) if d.startswith("/etc/systemd/system/")}

    assert units("agent-1") == {"megaflow-worker-agent.service", "megaflow-control.service"}
    assert units("agent-2") == {"megaflow-worker-agent.service"}, "control runs on the first agent host only"
    assert units("env-2") == {"megaflow-worker-env.service"}
    assert units("ops-1") == {"megaflow-flower.service"}
    assert units("gpu-1") == {"megaflow-vllm@.service", "megaflow-worker-model.service"}
    assert units("redis-1") == units("mongo-1") == set()
    flower = _unit(rendered["ops-1"]["/etc/systemd/system/megaflow-flower.service"]["content"])
    assert flower["ExecStart"][0].endswith("megaflow flower --loglevel INFO")


def test_vllm_instance(rendered):
    unit = _unit(rendered["gpu-1"]["/etc/systemd/system/megaflow-vllm@.service"]["content"])
    assert "/etc/megaflow/vllm/%i.env" in unit["EnvironmentFile"]
    assert " model serve ${VLLM_MODEL} --port ${VLLM_PORT}" in unit["ExecStart"][0]
    inst = rendered["gpu-1"]["/etc/megaflow/vllm/main.env"]
    assert inst["mode"] == "0600"
    env = parse_env_file(inst["content"])
    assert env["VLLM_MODEL"] == "Qwen/Qwen2.5-7B-Instruct"
    assert env["VLLM_ADVERTISE_URL"] == "http://gpu-1.example.internal:8000/v1"


def test_redis_conf(rendered):
    conf = rendered["redis-1"]["/etc/redis/redis.conf"]["content"]
    lines = {
        line.split(None, 1)[0]: line.split(None, 1)[1]
        for line in conf.splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert lines["maxmemory-policy"] == "noeviction"
    assert lines["appendonly"] == "yes"
    assert lines["bind"].startswith("127.0.0.1")
    escaped = NASTY_PASSWORD.replace("\\", "\\\\").replace('"', '\\"')
    assert lines["requirepass"] == f'"{escaped}"'
    mongod = yaml.safe_load(rendered["mongo-1"]["/etc/mongod.conf"]["content"])
    assert mongod["security"]["authorization"] == "enabled"


def test_code_archive_is_reproducible(tmp_path):
    src = tmp_path / "src"
    (src / "megaflow").mkdir(parents=True)
    (src / "megaflow" / "__init__.py").write_text("x = 1\n")
    for junk in (".git/config", ".venv/bin/python", "megaflow/__pycache__/a.pyc", "deploy/ansible/inventory.ini"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_text("junk")
    script = ANSIBLE_DIR / "roles/common/files/make_archive.py"
    outs = []
    for i in range(2):
        out = tmp_path / f"a{i}.tar.gz"
        subprocess.run([sys.executable, str(script), str(src), str(out)], check=True, timeout=30)
        os.utime(src / "megaflow" / "__init__.py")  # a new mtime must not change the archive
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(outs[0]))) as tar:
        assert tar.getnames() == ["megaflow/__init__.py"]


def test_rendered_redis_conf_runs_and_the_env_url_logs_in(rendered, tmp_path):
    """A real redis-server on loopback with the rendered redis.conf; the rendered MEGAFLOW_REDIS_URL gets in."""
    import redis

    from tests.conftest import free_port

    exe = shutil.which("redis-server")
    if not exe:
        pytest.fail("redis-server is not installed; run `make test`, which installs it")
    port = free_port()
    local = {
        "bind": "127.0.0.1",
        "port": str(port),
        "dir": str(tmp_path),
        "pidfile": str(tmp_path / "redis.pid"),
        "logfile": '""',
        "maxmemory": "64mb",
    }
    lines = []
    for line in rendered["redis-1"]["/etc/redis/redis.conf"]["content"].splitlines():
        key = line.split(None, 1)[0] if line.strip() and not line.startswith("#") else ""
        lines.append(f"{key} {local[key]}" if key in local else line)
    (tmp_path / "redis.conf").write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([exe, str(tmp_path / "redis.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env = parse_env_file(rendered["agent-1"]["/etc/megaflow/megaflow.env"]["content"])
    url = env["MEGAFLOW_REDIS_URL"].replace("@redis-1.example.internal:6379/", f"@127.0.0.1:{port}/")
    client = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def test_units_pass_systemd_analyze_verify(rendered, tmp_path):
    """`systemd-analyze verify` on each rendered unit (offline: binaries swapped for /bin/true)."""
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze is not installed")
    units = {
        Path(dest).name: f["content"]
        for files in rendered.values()
        for dest, f in files.items()
        if dest.startswith("/etc/systemd/system/")
    }
    assert len(units) == 6, sorted(units)
    paths = []
    for name, text in units.items():
        text = text.replace("/opt/megaflow/venv/bin/megaflow", "/bin/true")
        text = re.sub(r"^(User|Group)=.*$", r"\1=root", text, flags=re.MULTILINE)
        path = tmp_path / name.replace("@.service", "@main.service")
        path.write_text(text)
        paths.append(str(path))
    proc = subprocess.run([tool, "verify", *paths], capture_output=True, text=True, timeout=60, check=False)
    bad = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if re.search(r"Unknown (key|section)|[Ii]nvalid|[Ff]ailed to parse|bad-setting|Missing", line)
    ]
    assert not bad, "\n".join(bad)


def test_drain_play_syntax_check_and_refuses_no_host(ansible_env):
    proc = _run(
        ansible_env,
        "ansible-playbook",
        "--syntax-check",
        "-i",
        str(INVENTORY),
        "drain.yml",
        "-e",
        "host=env-1.example.internal",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _run(ansible_env, "ansible-playbook", "-i", str(INVENTORY), "drain.yml")
    assert proc.returncode != 0 and "-e host=NAME" in proc.stdout + proc.stderr


def test_test_host_inventory_has_every_group_and_its_own_ports(ansible_env, tmp_path):
    """scripts/testhosts.py's inventory: groups, docker connection, distinct free ports, group choices."""
    from scripts.testhosts import write_inventory

    path = write_inventory(tmp_path / "inv", "mf-x", ["env1", "env2"])
    proc = _run(ansible_env, "ansible-inventory", "-i", str(path), "--list")
    assert proc.returncode == 0, proc.stderr
    inv = json.loads(proc.stdout)
    for group in ("redis", "flower", "model_hosts", "agent_hosts", "control"):
        assert inv[group]["hosts"] == ["th-ctl"], group
    assert inv["env_hosts"]["hosts"] == ["th-env1", "th-env2"]
    assert not inv.get("mongodb", {}).get("hosts"), "records go to SQLite: no MongoDB host"
    hv = inv["_meta"]["hostvars"]
    assert hv["th-env1"]["ansible_connection"] == "community.docker.docker"
    assert hv["th-env1"]["ansible_host"] == "mf-x-env1" and hv["th-env1"]["env_hosts_docker"] == "socket"
    assert hv["th-ctl"]["megaflow_model_backend"] == "scripted" and "env_hosts_docker" not in hv["th-ctl"]
    ports = [hv["th-ctl"][k] for k in ("redis_port", "megaflow_flower_port", "megaflow_metrics_port")]
    assert len(set(ports)) == 3 and 6379 not in ports
