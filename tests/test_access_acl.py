"""Redis ACL users per role against a real redis-server (issue 17, Access).

Workers cannot flush or reconfigure Redis; a submitter cannot touch the quotas; a submitter's real
submit path works as its ACL user; a wrong Redis password is one clear error line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import redis

from megaflow.core.keys import Keys
from megaflow.security import acl
from megaflow.security.roles import role_env, role_of

PASSWORDS = {r: f"pw-{r}-0123456789" for r in acl.ROLES}


@pytest.fixture
def acl_users(redis_client):
    """Every role user on the test server (removed afterwards, so other tests see Redis as before)."""
    acl.apply(redis_client, "mf", PASSWORDS)
    yield
    redis_client.execute_command("ACL", "DELUSER", *(acl.user_name("mf", r) for r in acl.ROLES), "alice", "bob")


def as_role(redis_server, role: str) -> redis.Redis:
    url = acl.role_url(redis_server.url, acl.user_name("mf", role), PASSWORDS[role])
    return redis.Redis.from_url(url, decode_responses=True)


def test_rules_are_built_from_the_key_names():
    rules = acl.role_user("mf", "submitter").rules
    assert "%R~mf:res:quotas" in rules and "~mf:res:quotas" not in rules
    assert "~mf:celery:*" in rules and "-@dangerous" in rules and "-@admin" in rules
    assert "~mf:model:*" not in rules and "%R~mf:model:*" in rules  # read-only there
    assert acl.role_user("mf", "flower").rules[2:3] == ("~mf:celery:*",)
    assert all(line.startswith("ACL SETUSER mf-") and "pw-" not in line for line in acl.render("mf", PASSWORDS))
    with pytest.raises(ValueError, match="unknown role"):
        acl.role_user("mf", "root")


@pytest.mark.parametrize("role", ["model", "agent", "env", "control", "submitter", "flower", "metrics"])
def test_no_role_can_flush_or_reconfigure(redis_server, acl_users, role):
    r = as_role(redis_server, role)
    for cmd in (
        ["FLUSHALL"],
        ["FLUSHDB"],
        ["CONFIG", "GET", "maxmemory"],
        ["CONFIG", "SET", "appendonly", "no"],
        ["KEYS", "*"],
        ["ACL", "LIST"],
        ["SHUTDOWN", "NOSAVE"],
        ["CLIENT", "KILL", "ID", "1"],
        ["SAVE"],
        ["REPLICAOF", "NO", "ONE"],
        ["MONITOR"],
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.execute_command(*cmd)
    r.close()


def test_quotas_are_read_only_except_for_control(redis_server, redis_client, acl_users):
    quotas = Keys("mf").res("quotas")
    redis_client.hset(quotas, "alice", 4)
    for role in ("submitter", "model", "agent", "env"):
        r = as_role(redis_server, role)
        assert r.hget(quotas, "alice") == "4"  # admission reads it
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.hset(quotas, "alice", 0)
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.delete(quotas)
        with pytest.raises(redis.exceptions.NoPermissionError):  # not through a script either
            r.eval("return redis.call('HSET', KEYS[1], 'alice', 0)", 1, quotas)
        with pytest.raises(redis.exceptions.ResponseError, match="can't access"):  # key names built in Lua
            r.eval("return redis.call('HSET', ARGV[1], 'alice', 0)", 0, quotas)
        r.close()
    control = as_role(redis_server, "control")
    control.hset(quotas, "alice", 2)
    control.close()
    assert redis_client.hget(quotas, "alice") == "2"


def test_flower_and_metrics_see_only_what_they_show(redis_server, redis_client, acl_users):
    redis_client.hset(Keys("mf").episode("e1"), "state", "RUNNING")
    flower, metrics = as_role(redis_server, "flower"), as_role(redis_server, "metrics")
    with pytest.raises(redis.exceptions.NoPermissionError):
        flower.hgetall(Keys("mf").episode("e1"))  # no episode data, only the broker
    assert flower.llen("mf:celery:agent") == 0
    assert metrics.hget(Keys("mf").episode("e1"), "state") == "RUNNING"
    with pytest.raises(redis.exceptions.NoPermissionError):
        metrics.hset(Keys("mf").episode("e1"), "state", "CANCELLED")
    flower.close()
    metrics.close()


def test_submit_works_as_the_submitter_user(redis_server, settings, acl_users):
    from megaflow.client import Client
    from megaflow.demo_tasks import demo_specs

    url = acl.role_url(redis_server.url, acl.user_name("mf", "submitter"), PASSWORDS["submitter"])
    with Client(settings.model_copy(update={"redis_url": url})) as client:
        sub = client.submit(demo_specs("fix", grading="exit_code")[:2], user="alice")
        assert len(client.rt.engine.batch_ids(sub.batch_id)) == 2
        assert client.status(sub.batch_id)


def test_wrong_redis_password_is_one_clear_line(redis_server, acl_users, tmp_path):
    url = acl.role_url(redis_server.url, acl.user_name("mf", "agent"), "wrong")
    env = {**os.environ, "MEGAFLOW_REDIS_URL": url, "MEGAFLOW_STATE_DIR": str(tmp_path), "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-m", "megaflow", "capacity"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "password" in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert "wrong" not in out.stderr  # the URL is shown without its password


# --- each role gets only its own secrets ---------------------------------------------------------
FULL = {
    "PATH": "/usr/bin",
    "MEGAFLOW_REDIS_URL": "redis://:admin@127.0.0.1:6379/0",
    "MEGAFLOW_MODEL_API_KEY": "sk-model",
    "MEGAFLOW_REGISTRY_USERNAME": "fleet",
    "MEGAFLOW_REGISTRY_PASSWORD": "reg-pw",
    "MEGAFLOW_FLOWER_PASSWORD": "flower-pw",
    "MEGAFLOW_ARTIFACTS_URL": "s3://bucket/x",
    "MEGAFLOW_METADATA_URL": "mongodb://u:mongo-pw@db:27017/megaflow",
    "MEGAFLOW_KEY_PREFIX": "mf",
    "AWS_ACCESS_KEY_ID": "AKIA",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "AWS_REGION": "eu-west-1",
    "OPENAI_API_KEY": "sk-other",
    "HF_TOKEN": "hf-token",
    "MEGAFLOW_MAX_SPEC_TOKENS": "5",  # not a secret setting, whatever its name
}


def secrets_of(env: dict[str, str]) -> set[str]:
    return {
        k
        for k in (
            "MEGAFLOW_MODEL_API_KEY",
            "MEGAFLOW_REGISTRY_PASSWORD",
            "MEGAFLOW_FLOWER_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ACCESS_KEY_ID",
            "MEGAFLOW_METADATA_URL",
            "OPENAI_API_KEY",
            "HF_TOKEN",
        )
        if k in env
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["worker", "model"],
            {"MEGAFLOW_MODEL_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MEGAFLOW_METADATA_URL"},
        ),
        (["worker", "agent"], {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MEGAFLOW_METADATA_URL"}),
        (
            ["worker", "env", "--host", "h1"],
            {"MEGAFLOW_REGISTRY_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MEGAFLOW_METADATA_URL"},
        ),
        (["control"], {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MEGAFLOW_METADATA_URL"}),
        (["flower"], {"MEGAFLOW_FLOWER_PASSWORD"}),
        (["metrics"], set()),
    ],
)
def test_role_env_keeps_only_the_roles_secrets(args, expected):
    env = role_env(role_of(args), FULL)
    assert secrets_of(env) == expected
    assert env["PATH"] == "/usr/bin" and env["AWS_REGION"] == "eu-west-1" and env["MEGAFLOW_KEY_PREFIX"] == "mf"
    assert env["MEGAFLOW_MAX_SPEC_TOKENS"] == "5" and env["MEGAFLOW_REDIS_URL"] == FULL["MEGAFLOW_REDIS_URL"]


def test_role_env_without_s3_drops_aws_and_uses_the_roles_redis_user():
    env = role_env("agent", {**FULL, "MEGAFLOW_ARTIFACTS_URL": "file:///tmp/a"}, passwords=PASSWORDS)
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["MEGAFLOW_REDIS_URL"] == f"redis://mf-agent:{PASSWORDS['agent']}@127.0.0.1:6379/0"


# --- per-person submitters ------------------------------------------------------------------------
def test_a_person_submits_only_under_their_own_name(redis_server, redis_client, settings, acl_users, capsys):
    from megaflow.cli.acl import app as acl_app
    from megaflow.cli.errors import run
    from megaflow.client import Client
    from megaflow.core.errors import ConfigError, ServiceUnavailableError, SpecError
    from megaflow.demo_tasks import demo_specs
    from megaflow.security.identity import add_person, check_submitter, remove_person

    os.environ["MEGAFLOW_REDIS_URL"] = redis_server.url
    try:
        assert run(acl_app, ["add-user", "alice"]) == 0
        assert run(acl_app, ["add-user", "mf-agent"]) != 0  # a role user's name is reserved
    finally:
        del os.environ["MEGAFLOW_REDIS_URL"]
    out = capsys.readouterr()
    alice_url = out.out.strip().splitlines()[0]
    assert alice_url.startswith("redis://alice:") and "reserved" in out.err
    with Client(settings.model_copy(update={"redis_url": alice_url})) as client:
        check_submitter(client.rt.redis, "mf", "alice")
        with pytest.raises(SpecError, match="not the Redis user you authenticated as"):
            check_submitter(client.rt.redis, "mf", "bob")
        client.person_timeout_s = 2  # nobody serves her requests here (tests/test_access_persons.py does)
        with pytest.raises(ServiceUnavailableError, match="control service"):
            client.submit(demo_specs("fix", grading="exit_code")[:1], user="alice")
        with pytest.raises(redis.exceptions.NoPermissionError):  # her user touches only mf:u:alice:*
            client.rt.engine.batch_ids("any")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.rt.redis.hset(Keys("mf").res("quotas"), "alice", 100)
    check_submitter(redis_client, "mf", "anyone")  # the operator's default user
    shared = as_role(redis_server, "submitter")
    check_submitter(shared, "mf", "anyone")  # the shared submitter role: names are not checked
    shared.close()
    bob_pw = add_person(redis_client, "mf", "bob", "bob-pw")
    assert (
        bob_pw == "bob-pw" and remove_person(redis_client, "mf", "bob") and remove_person(redis_client, "mf", "alice")
    )
    with pytest.raises(ConfigError, match="reserved"):
        add_person(redis_client, "mf", "default")


def test_aclfile_loads_in_a_real_redis_server(tmp_path):
    """The aclfile lines (for redis.conf's ``aclfile``, e.g. from Ansible) load, and the users log in."""
    from conftest import free_port

    aclfile = tmp_path / "users.acl"
    aclfile.write_text("\n".join(["user default on nopass ~* &* +@all", *acl.render_aclfile("mf", PASSWORDS)]) + "\n")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--aclfile", str(aclfile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        agent = redis.Redis.from_url(acl.role_url(url, "mf-agent", PASSWORDS["agent"]), decode_responses=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert agent.execute_command("ACL", "WHOAMI") == "mf-agent"
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server refused the aclfile"
                time.sleep(0.05)
        with pytest.raises(redis.exceptions.NoPermissionError):
            agent.flushall()
        agent.close()
    finally:
        proc.terminate()
        proc.wait(10)
