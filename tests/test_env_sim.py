"""The sim backend: draws from its config, rules with if_ran, many sandboxes, and the demo graded as with Docker."""

from __future__ import annotations

import re
import sys
import threading
import types

import pytest

from megaflow.core.settings import Settings
from megaflow.core.spec import TaskSpec
from megaflow.demo_tasks import demo_specs
from megaflow.env_hosts.errors import ContainerLostError
from megaflow.env_hosts.sim import SimHost

pytestmark = pytest.mark.unit


@pytest.fixture
def settings(tmp_path):
    return Settings.load(state_dir=str(tmp_path))


def test_sim_never_imports_docker(tmp_path):
    import subprocess

    code = (
        "import sys; from megaflow.core.settings import Settings; from megaflow.env_hosts import load_env_host;"
        "h = load_env_host(Settings.load(env_backend={'type': 'sim'}), name='x'); h.create('e', 'i');"
        "print('docker' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_draws_are_seeded_per_episode(settings):
    config = {
        "type": "sim",
        "seed": 3,
        "time_scale": 0,
        "rules": [{"match": "roll", "exit_code": {"dist": "choice", "values": [0, 1, 2, 3, 4, 5, 6, 7]}}],
    }
    a, b = SimHost(config, settings, name="a"), SimHost(config, settings, name="b")
    box_a, box_b = a.create("e1", "img"), b.create("e1", "img")
    rolls_a = [a.execute(box_a, "roll").exit_code for _ in range(20)]
    rolls_b = [b.execute(box_b, "roll").exit_code for _ in range(20)]
    assert rolls_a == rolls_b and len(set(rolls_a)) > 1  # same seed and episode: same draws, whatever the host


def test_if_ran_and_unless_ran(settings):
    config = {
        "type": "sim",
        "rules": [
            {"match": "^make test$", "if_ran": "^make build$", "output": "built and tested\n"},
            {"match": "^make test$", "exit_code": 2, "output": "nothing built\n"},
            {"match": "^deploy$", "unless_ran": "^make test$", "exit_code": 9},
        ],
    }
    h = SimHost(config, settings, name="h")
    box = h.create("ep", "img")
    assert h.execute(box, "deploy").exit_code == 9
    assert (h.execute(box, "make test").exit_code, h.execute(box, "make test").output) == (2, "nothing built\n")
    h.execute(box, "make build")
    assert h.execute(box, "make test").output == "built and tested\n"
    assert h.execute(box, "deploy").exit_code == 0  # the default rule


def test_thousands_of_sandboxes_few_threads(settings):
    h = SimHost(
        {"type": "sim", "boot_latency_s": {"dist": "exponential", "mean": 0.001, "max": 0.01}}, settings, name="h"
    )
    threads_before = threading.active_count()
    boxes = [h.create(f"ep-{i}", "img") for i in range(3000)]
    assert h.report()["sandboxes"] == 3000 and threading.active_count() == threads_before
    assert h.execute(boxes[-1], "echo hi").output == "hi\n"
    reaped = h.maintain(lambda ep: int(ep.split("-")[1]) % 2 == 0)["reaped"]
    assert len(reaped) == 1500 and h.report()["sandboxes"] == 1500
    with pytest.raises(ContainerLostError):
        h.execute(boxes[1], "true")
    h.shutdown()
    assert h.report()["sandboxes"] == 0


def test_shutdown_wakes_a_waiting_command(settings):
    h = SimHost({"type": "sim", "rules": [{"match": "slow", "latency_s": 30}]}, settings, name="h")
    box = h.create("ep", "img")
    errors = []

    def run():
        try:
            h.execute(box, "slow", timeout=60)
        except ContainerLostError as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    h.shutdown()
    t.join(10)
    assert not t.is_alive() and errors


def _episode(host, raw: dict, settings) -> int:
    """One demo episode the way the env and agent services drive it: set-up, agent commands, evaluation."""
    from megaflow.services.sandbox import setup

    spec = TaskSpec.model_validate(raw)
    rt = types.SimpleNamespace(env_host=host, settings=settings)
    handle = host.create("ep-" + spec.task_id, "megaflow-sandbox:latest")
    setup(rt, handle, spec)
    for reply in spec.model.replies:
        m = re.search(r"```bash\n(.*?)\n```", reply, re.DOTALL)
        if m:
            assert host.execute(handle, m[1], workdir=spec.workdir).exit_code == 0
    host.put_files(handle, spec.eval.files)
    return host.execute(handle, spec.eval.command, workdir=spec.workdir).exit_code


@pytest.mark.parametrize("kind", ["fix", "noop"])
def test_demo_batch_grades_as_with_docker(settings, kind):
    """The demo preset answers the demo's tests as real containers would: fix passes, noop fails."""
    host = SimHost({"type": "sim", "preset": "demo", "time_scale": 0}, settings, name="h")
    codes = [_episode(host, raw, settings) for raw in demo_specs(kind, grading="exit_code")]
    assert codes == [0 if kind == "fix" else 1] * len(codes)


@pytest.mark.redis
def test_a_maintenance_pass_asks_redis_once_per_thousand_episodes(settings, redis_client):
    """The env worker's liveness check (``LiveEpisodes``) answers a host's whole reaper pass in one
    script call per 1,000 episodes, not one HMGET round trip per sandbox; a closed episode's sandboxes
    go by its index."""
    from megaflow.core.keys import Keys
    from megaflow.workers.process import LiveEpisodes

    keys = Keys(settings.key_prefix)
    root = types.SimpleNamespace(redis=redis_client, keys=keys, host="h")
    for i in range(2500):
        state, host = ("RUNNING", "h") if i % 3 else ("SUCCEEDED", "h")
        if i % 5 == 0:
            host = "other-host"  # moved to another host: not ours any more
        redis_client.hset(keys.episode(f"ep-{i}"), mapping={"state": state, "host": host})
    live = LiveEpisodes(root)
    assert live("ep-1") and not live("ep-3") and not live("ep-5") and not live("ep-missing")
    h = SimHost({"type": "sim"}, settings, name="h")
    for i in range(2500):
        h.create(f"ep-{i}", "img")
    h.create("ep-missing", "img")
    assert live.many({"ep-1", "ep-3"}) == {"ep-1"}  # (and the script is loaded: one EVALSHA per call from now)
    stats = redis_client.info("commandstats")
    hmget, evalsha = stats["cmdstat_hmget"]["calls"], stats.get("cmdstat_evalsha", {}).get("calls", 0)
    reaped = h.maintain(live)["reaped"]
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_hmget"]["calls"] - hmget == 2501  # every episode, once (inside the script)
    assert stats["cmdstat_evalsha"]["calls"] - evalsha == 3  # 2,501 episodes in three round trips
    expected_live = {f"ep-{i}" for i in range(2500) if i % 3 and i % 5}
    assert h.report()["sandboxes"] == len(expected_live) and len(reaped) == 2501 - len(expected_live)
    assert h.close_episode("ep-1") and h.close_episode("ep-1") == []
    h.shutdown()
