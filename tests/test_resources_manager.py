"""ResourceManager against a real Redis: FIFO admission, host choice, leases, drain, sweep, boot limiter, CLI."""

from __future__ import annotations

import time

import pytest

from megaflow.core.errors import NotFoundError, QuotaError, SpecError
from megaflow.core.keys import Keys
from megaflow.engine.resources import ResourceManager
from tests.helpers import let_lapse, wait_until

RENEW_EVERY_S = 0.3  # a holder's renewal period in these tests (leases of 1.5 s)


@pytest.fixture
def make(redis_client, settings):
    """Build a manager with settings overrides (limits, short leases)."""

    def _make(**overrides) -> ResourceManager:
        s = settings.model_copy(update=overrides)
        return ResourceManager(redis_client, s, Keys(s.key_prefix))

    return _make


def eps(*specs: str, image: str = "img") -> list[dict]:
    """'A1' -> episode A1 of user A."""
    return [{"episode_id": e, "user": e[0], "image": image} for e in specs]


def ids(admissions) -> list[str]:
    return [a.episode_id for a in admissions]


def alive(m: ResourceManager, name: str) -> bool:
    return any(h["name"] == name and h["alive"] for h in m.hosts())


def test_fifo_in_submission_order_and_user_at_limit_does_not_block(make):
    m = make(global_limit=10, user_limit=5)
    m.register_host("h", capacity=10, images=[], warm={}, disk_free_gb=1)
    m.set_quota("A", 1)
    m.enqueue(eps("A1", "A2", "B1", "A3", "C1", "B2", "C2"))
    assert ids(m.admit()) == ["A1", "B1", "C1", "B2", "C2"]
    assert m.queue_length() == 2
    assert m.admit() == []
    m.release("A1")
    assert ids(m.admit()) == ["A2"]
    m.set_quota("A", 5)  # a raised quota lets the parked user in at once
    assert ids(m.admit()) == ["A3"]


def test_global_and_host_limits_stop_admission_then_oldest_goes_first(make):
    m = make(global_limit=2, user_limit=5)
    m.register_host("h", capacity=5, images=[], warm={}, disk_free_gb=1)
    m.enqueue(eps("A1", "B1", "A2", "B2"))
    assert ids(m.admit()) == ["A1", "B1"]
    assert m.release("B1") == 2  # what still waits in the FIFO: admission has work
    assert m.release("B1") == 2  # idempotent: frees nothing more
    assert ids(m.admit()) == ["A2"]
    m2 = make(global_limit=10, user_limit=5)
    m2.release("A1")
    m2.release("A2")
    m2.register_host("h", capacity=1, images=[], warm={}, disk_free_gb=1)
    assert ids(m2.admit()) == ["B2"]  # host h now holds 1 of 1


def test_admission_results_carry_placement(make):
    m = make()
    m.register_host("h", capacity=2, images=[], warm={}, disk_free_gb=1)
    m.enqueue([{"episode_id": "e1", "user": "alice", "image": "python:3.12"}])
    (a,) = m.admit()
    assert (a.episode_id, a.user, a.host, a.image) == ("e1", "alice", "h", "python:3.12")
    assert m.placement("e1")["host"] == "h"
    assert m.enqueue(eps("e1")) == 0  # already held: a retried submit is skipped


def test_host_choice_prefers_warm_then_image_then_least_loaded(make):
    m = make(global_limit=50, user_limit=50)
    m.register_host("cached", capacity=4, images=["img-a", "img-w"], warm={}, disk_free_gb=1)
    m.register_host("warm", capacity=4, images=["img-w"], warm={"img-w": 1}, disk_free_gb=1)
    m.register_host("empty", capacity=4, images=[], warm={}, disk_free_gb=1)
    m.enqueue(
        [
            {"episode_id": "w1", "user": "u", "image": "img-w"},
            {"episode_id": "w2", "user": "u", "image": "img-w"},
            {"episode_id": "a1", "user": "u", "image": "img-a"},
            {"episode_id": "x1", "user": "u", "image": "img-x"},
            {"episode_id": "x2", "user": "u", "image": "img-x"},
        ]
    )
    placed = {a.episode_id: a.host for a in m.admit()}
    assert placed["w1"] == "warm"  # the warm container
    assert placed["w2"] == "cached"  # warm one taken; image present on both, cached less loaded
    assert placed["a1"] == "cached"
    assert placed["x1"] == "empty"  # nobody has it: least loaded
    assert placed["x2"] in {"empty", "warm"}
    assert (
        m.redis.hget(m.keys.res("hwarm", "warm"), "img-w") is None
        or int(m.redis.hget(m.keys.res("hwarm", "warm"), "img-w")) == 0
    )


def test_image_index_follows_heartbeats(make, redis_client):
    m = make(global_limit=50, user_limit=50, host_ttl_s=0.5)
    idx = m.keys.res("imghosts", "img-a")
    m.register_host("h1", capacity=4, images=["img-a"], warm={"img-a": 2}, disk_free_gb=1)
    m.register_host("h2", capacity=4, images=[], warm={}, disk_free_gb=1)
    assert redis_client.hgetall(idx) == {"h1": "2"}
    m.enqueue([{"episode_id": "a1", "user": "u", "image": "img-a"}])
    assert [a.host for a in m.admit()] == ["h1"]
    assert redis_client.hgetall(idx) == {"h1": "1"}  # one warm container taken
    m.register_host("h1", capacity=4, images=["img-b"], warm={}, disk_free_gb=1)  # evicted img-a
    assert redis_client.hgetall(idx) == {}
    m.register_host("h2", capacity=4, images=["img-a"], warm={}, disk_free_gb=1)
    assert m.acquire("x1", "v", "h2") == m.acquire("x2", "v", "h2") == "ok"  # h2: 2 of 4, h1: 1 of 4
    m.enqueue([{"episode_id": "a2", "user": "u", "image": "img-a"}])
    assert [a.host for a in m.admit()] == ["h2"]  # image present beats less loaded
    wait_until(lambda: not alive(m, "h2"), 10, "h2's heartbeat (TTL 0.5 s) to go stale")
    m.register_host("h1", capacity=4, images=["img-b"], warm={}, disk_free_gb=1)
    assert m.sweep()["hosts_removed"] == 1
    assert redis_client.hgetall(idx) == {}  # h2 gone, and out of the index


def test_drained_and_stale_hosts_get_no_admissions(make):
    m = make(host_ttl_s=0.4)
    m.register_host("old", capacity=5, images=[], warm={}, disk_free_gb=1)
    wait_until(lambda: not alive(m, "old"), 10, "old's heartbeat (TTL 0.4 s) to go stale")
    assert m.register_host("new", capacity=5, images=[], warm={}, disk_free_gb=1) is True
    assert m.register_host("new", capacity=5, images=[], warm={}, disk_free_gb=1) is False
    m.drain_host("new")
    m.enqueue(eps("A1"))
    assert m.admit() == []
    m.drain_host("new", drain=False)
    assert [a.host for a in m.admit()] == ["new"]
    with pytest.raises(NotFoundError):
        m.drain_host("no-such-host")
    m.register_host("new", capacity=5, images=[], warm={}, disk_free_gb=1)
    fixed = m.sweep()
    assert fixed["hosts_removed"] == 1
    assert [h["name"] for h in m.hosts()] == ["new"]


def test_drain_survives_re_registration(make):
    m = make()
    m.register_host("h", capacity=5, images=[], warm={}, disk_free_gb=1)
    m.drain_host("h")
    m.register_host("h", capacity=5, images=[], warm={}, disk_free_gb=1)
    assert m.hosts()[0]["drained"] is True


def test_release_of_a_queued_episode_removes_it(make):
    m = make()
    m.enqueue(eps("A1", "A2", "B1"))
    assert m.release("A1") == 2
    assert m.release("B1") == 1
    assert m.queue_length() == 1
    m.register_host("h", capacity=5, images=[], warm={}, disk_free_gb=1)
    assert ids(m.admit()) == ["A2"]
    assert m.capacity()["queue"]["length"] == 0
    assert m.release("A2") == 0  # nothing waits: a release needs no admission pass after it


def test_enqueue_is_all_or_nothing_on_bad_items(make):
    m = make()
    with pytest.raises(SpecError, match="user"):
        m.enqueue(eps("A1") + [{"episode_id": "x", "image": "img"}])
    with pytest.raises(SpecError, match="twice"):
        m.enqueue(eps("A1", "A1"))
    assert m.queue_length() == 0


def test_renew_keeps_slots_and_lapse_frees_them(make):
    m = make(lease_s=1.5, global_limit=1, host_ttl_s=30)
    m.register_host("h", capacity=5, images=[], warm={}, disk_free_gb=1)
    m.enqueue(eps("A1", "B1"))
    assert ids(m.admit()) == ["A1"]
    started = time.monotonic()
    while time.monotonic() - started < 2.0:  # renewed every RENEW_EVERY_S: held past its first lease
        time.sleep(RENEW_EVERY_S)
        assert m.renew_host("h") == 1
    assert m.admit() == []  # still held after more than one lease thanks to renewals
    assert m.renew("A1")
    let_lapse(1.5)  # nobody renews: the lease lapses
    assert not m.renew("A1")
    assert ids(m.admit()) == ["B1"]


def test_sweep_reclaims_lapsed_and_requeues_never_started(make):
    m = make(lease_s=30, admit_start_timeout_s=1.0)
    m.register_host("h", capacity=5, images=[], warm={}, disk_free_gb=1)
    m.enqueue(eps("A1", "A2", "A3"))
    assert ids(m.admit(2)) == ["A1", "A2"]
    assert m.mark_started("A2")
    let_lapse(1.0)  # admit_start_timeout_s: A1 was admitted and never started
    fixed = m.sweep()
    assert fixed["requeued"] == 1 and fixed["leases_reclaimed"] == 0
    assert not m.mark_started("A1")  # it no longer holds slots: its late provision must not run
    assert m.queue_length() == 2
    assert ids(m.admit()) == ["A1", "A3"]  # back at its place, ahead of later submissions

    short = make(lease_s=0.2)
    short.acquire("X1", "X", "h")
    let_lapse(0.2)
    assert short.sweep()["leases_reclaimed"] == 1
    assert short.placement("X1") is None


def test_lapsed_lease_of_a_never_started_episode_puts_it_back_in_the_fifo(make):
    m = make(lease_s=1.0)
    m.register_host("dead", capacity=5, images=[], warm={}, disk_free_gb=1)
    m.enqueue(eps("A1", "A2", "B1"))
    assert ids(m.admit()) == ["A1", "A2", "B1"]
    assert m.mark_started("A2")
    let_lapse(1.0)  # the host died: nobody renews
    fixed = m.sweep()
    assert (fixed["requeued"], fixed["leases_reclaimed"]) == (2, 1)  # A1, B1 back; A2 had started
    assert m.placement("A2") is None and m.queue_length() == 2
    m.drain_host("dead")
    m.register_host("alive", capacity=5, images=[], warm={}, disk_free_gb=1)
    assert [(a.episode_id, a.host) for a in m.admit()] == [("A1", "alive"), ("B1", "alive")]
    let_lapse(1.0)
    assert m.renew_host("alive") == 0  # the heartbeat came too late: same repair on that path
    assert m.queue_length() == 2


def test_acquire_three_tiers_all_or_nothing(make):
    m = make(global_limit=3, user_limit=2)
    m.register_host("h1", capacity=1, images=[], warm={}, disk_free_gb=1)
    m.register_host("h2", capacity=5, images=[], warm={}, disk_free_gb=1)
    assert m.acquire("e1", "u", "h1") == "ok"
    assert m.acquire("e1", "u", "h1") == "ok"  # idempotent
    assert m.acquire("e1", "u", "h2") == "elsewhere"
    assert m.acquire("e2", "v", "h1") == "host"
    assert m.acquire("e2", "u", "h2") == "ok"
    assert m.acquire("e3", "u", "h2") == "user"
    assert m.acquire("e3", "v", "h2") == "ok"
    assert m.acquire("e4", "w", "h2") == "global"
    assert m.acquire("e4", "w", "nowhere") == "unknown_host"
    cap = m.capacity()
    # refused attempts took nothing anywhere
    assert cap["global"]["used"] == 3
    assert {u["user"]: u["used"] for u in cap["users"]} == {"u": 2, "v": 1}
    assert {h["name"]: h["used"] for h in cap["hosts"]} == {"h1": 1, "h2": 2}


def test_boot_limiter_cap_and_rate(make):
    m = make(boot_concurrency=2)
    assert m.acquire_boot("h", "a") and m.acquire_boot("h", "b")
    assert m.acquire_boot("h", "a")  # idempotent
    assert not m.acquire_boot("h", "c")
    assert m.acquire_boot("other-host", "c")  # per host
    m.release_boot("h", "a")
    m.release_boot("h", "a")
    assert m.acquire_boot("h", "c")

    r = make(boot_concurrency=10, boot_rate_per_s=4.0)
    got = [r.acquire_boot("r", f"x{i}") for i in range(6)]
    assert got == [True] * 4 + [False] * 2  # a burst of one second's worth, then the rate
    let_lapse(1 / 4.0)  # one token of the 4/s rate comes back
    assert r.acquire_boot("r", "y")


def test_start_boot_marks_started_and_takes_a_boot_slot_in_one_call(make):
    m = make(boot_concurrency=1, admit_start_timeout_s=1.0)
    m.register_host("h", capacity=5, images=[], warm={}, disk_free_gb=1)
    m.enqueue(eps("A1", "A2", "A3"))
    assert ids(m.admit()) == ["A1", "A2", "A3"]
    assert m.start_boot("h", "A1") == "ok"
    assert m.start_boot("h", "A1") == "ok"  # a redelivered provision renews its own slot
    assert m.start_boot("h", "A2") == "busy"  # started (the sweep leaves it), but the one boot slot is A1's
    assert not m.acquire_boot("h", "X")  # A2 took no slot
    m.release_boot("h", "A1")
    let_lapse(1.0)  # admit_start_timeout_s: A3 never started; A1 and A2 did
    assert m.sweep()["requeued"] == 1
    assert m.start_boot("h", "A3") == "requeued"  # it no longer holds slots: no boot slot taken either
    assert m.acquire_boot("h", "A2")  # the slot A3 did not take


def test_quota_and_capacity_view(make):
    m = make(user_limit=3)
    m.set_quota("alice", 1)
    assert m.quota("alice") == 1 and m.quota("bob") == 3
    with pytest.raises(QuotaError):
        m.set_quota("alice", -1)
    m.register_host("h", capacity=4, images=["img"], warm={"img": 2}, disk_free_gb=7.5)
    m.enqueue(eps("alice-1", "alice-2", "bob-1"))  # users 'a' and 'b'
    m.set_quota("a", 1)
    m.admit()
    cap = m.capacity()
    assert cap["global"] == {"used": 2, "limit": m.settings.global_limit}
    a = next(u for u in cap["users"] if u["user"] == "a")
    assert (a["used"], a["limit"], a["queued"], a["at_limit"], a["override"]) == (1, 1, 1, True, True)
    assert cap["queue"]["length"] == 1 and cap["queue"]["oldest"]["episode_id"] == "alice-2"
    assert cap["queue"]["oldest_wait_s"] >= 0
    (h,) = cap["hosts"]
    assert (h["used"], h["capacity"], h["images"], h["disk_free_gb"], h["alive"]) == (2, 4, 1, 7.5, True)
    m.set_quota("a", None)
    assert m.quota("a") == 3


def test_cli_commands(make, redis_server, monkeypatch):
    from typer.testing import CliRunner

    from megaflow.cli.resources import app

    monkeypatch.setenv("MEGAFLOW_REDIS_URL", redis_server.url)
    m = make()
    m.register_host("h1", capacity=3, images=[], warm={}, disk_free_gb=1)
    m.enqueue(eps("A1", "B1"))
    m.admit(1)
    runner = CliRunner()
    out = runner.invoke(app, ["capacity"], env={"COLUMNS": "150"})
    assert out.exit_code == 0, out.output
    assert "h1" in out.output and "Users" in out.output and "queued" in out.output
    out = runner.invoke(app, ["quota", "set", "carol", "7"])
    assert out.exit_code == 0 and m.quota("carol") == 7
    out = runner.invoke(app, ["host", "drain", "h1"])
    assert out.exit_code == 0 and m.hosts()[0]["drained"]
    assert runner.invoke(app, ["host", "drain", "h9"]).exit_code == 1
    assert runner.invoke(app, ["host", "drain", "h1", "--undo"]).exit_code == 0
    assert not m.hosts()[0]["drained"]
    out = runner.invoke(app, ["capacity", "--json"])
    assert out.exit_code == 0 and '"length": 1' in out.output
