"""The elastic decisions on plain numbers, and the mode choice from a real queue in Redis."""

from __future__ import annotations

import pytest

from megaflow.core.errors import ConfigError
from megaflow.core.keys import Keys
from megaflow.elastic.config import ElasticConfig
from megaflow.elastic.modes import apply_modes, auto_modes, image_demand, publish_pools
from megaflow.elastic.policy import FleetState, choose_mode, desired_hosts
from megaflow.engine.resources import ResourceManager

CFG = ElasticConfig(
    min_hosts=1,
    max_hosts=10,
    target_wait_s=60,
    episode_s=30,
    boot_s=20,
    lag_threshold_s=30,
    persistent_min_demand=4,
    max_pool=3,
)


def state(**kw) -> FleetState:
    base = {
        "queued": 0,
        "oldest_wait_s": 0.0,
        "live": 0,
        "hosts": 1,
        "pending": 0,
        "capacity_per_host": 4,
        "episode_s": 30.0,
    }
    return FleetState(**{**base, **kw})


def test_backlog_sizes_the_fleet_within_bounds():
    d = desired_hosts(state(queued=40, live=4), CFG)  # 44 episodes, 2 waves allowed in 60 s at 4 per host
    assert d.target == 6 and d.delta == 5
    assert desired_hosts(state(queued=1000, live=4), CFG).target == 10  # clamped at max
    assert "clamped" in desired_hosts(state(queued=1000, live=4), CFG).reason
    assert desired_hosts(state(), CFG).target == 1 and desired_hosts(state(hosts=3), CFG).delta == -2


def test_pending_hosts_count_and_short_backlogs_do_not_scale():
    assert desired_hosts(state(queued=40, live=4, pending=5), CFG).delta == 0
    one_wave = CFG.model_copy(update={"target_wait_s": 30})
    assert desired_hosts(state(queued=2, live=4), one_wave.model_copy(update={"boot_s": 5})).delta == 1
    d = desired_hosts(state(queued=2, live=4), one_wave)  # drains on the current host before a new one boots
    assert d.delta == 0 and "before a new host" in d.reason


def test_admission_lag_adds_one_host():
    d = desired_hosts(state(queued=2, live=4, oldest_wait_s=45.0), CFG)
    assert d.delta == 1 and "lag" in d.reason


def test_mode_choice():
    assert choose_mode("a", 0, 2, 2, CFG).mode == "ephemeral"
    hot = choose_mode("a", 10, 6, 2, CFG)
    assert hot.mode == "persistent" and 1 <= hot.pool_per_host <= 3
    assert choose_mode("a", 100, 0, 1, CFG).pool_per_host == 3  # max_pool
    assert choose_mode("a", 100, 0, 1, CFG, forced="ephemeral").mode == "ephemeral"
    assert choose_mode("a", 0, 0, 1, CFG, forced="persistent").mode == "persistent"
    assert choose_mode("a", 100, 0, 1, CFG.model_copy(update={"auto_mode": False})).mode == "ephemeral"


def test_bad_config_names_the_field(settings):
    with pytest.raises(ConfigError, match=r"elastic\.min_hosts"):
        ElasticConfig.from_settings(settings.model_copy(update={"elastic": {"min_hosts": 5, "max_hosts": 2}}))
    with pytest.raises(ConfigError, match=r"elastic\.provider"):
        ElasticConfig.from_settings(settings.model_copy(update={"elastic": {"provider": {"type": "gce"}}}))


def test_auto_modes_from_the_queue(settings, redis_client):
    keys = Keys(settings.key_prefix)
    res = ResourceManager(redis_client, settings, keys)
    res.enqueue(
        [{"episode_id": f"h{i}", "user": "u", "image": "hot"} for i in range(5)]
        + [{"episode_id": "c1", "user": "u", "image": "cold"}]
    )
    waiting, arrived = image_demand(redis_client, keys, 300)
    assert waiting == {"hot": 5, "cold": 1} and arrived == waiting
    specs = [
        {"task_id": "1", "image": "hot"},
        {"task_id": "2", "image": "cold"},
        {"task_id": "3", "image": "new", "mode": "persistent"},
    ]
    choices = auto_modes(redis_client, keys, settings, specs, hosts=2, cfg=CFG)
    assert {k: v.mode for k, v in choices.items()} == {"hot": "persistent", "cold": "ephemeral", "new": "persistent"}
    assert [s["mode"] for s in apply_modes(specs, choices, settings.default_image)] == [
        "persistent",
        "ephemeral",
        "persistent",
    ]
    publish_pools(redis_client, settings.key_prefix, choices)
    assert redis_client.hgetall(f"{settings.key_prefix}:elastic:pools") == {
        "hot": str(choices["hot"].pool_per_host),
        "new": str(choices["new"].pool_per_host),
    }
