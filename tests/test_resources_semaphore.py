"""LeaseSemaphore against a real Redis: limit, idempotence, renewal, lapse."""

from __future__ import annotations

import time

from megaflow.engine.resources import LeaseSemaphore
from tests.helpers import wait_until


def test_limit_and_idempotent_acquire(redis_client):
    sem = LeaseSemaphore(redis_client, "mf:test:sem", limit=2, lease_s=5)
    assert sem.acquire("a") and sem.acquire("b")
    assert not sem.acquire("c")
    assert sem.acquire("a")  # already in: renews, takes no second slot
    assert sem.count() == 2
    assert sorted(sem.holders()) == ["a", "b"]


def test_release_is_idempotent(redis_client):
    sem = LeaseSemaphore(redis_client, "mf:test:sem", limit=1, lease_s=5)
    assert sem.acquire("a")
    sem.release("a")
    sem.release("a")
    sem.release("never-held")
    assert sem.count() == 0
    assert sem.acquire("b")


def test_lapsed_lease_is_reclaimed_and_renew_reports_loss(redis_client):
    sem = LeaseSemaphore(redis_client, "mf:test:sem", limit=1, lease_s=2.0)
    assert sem.acquire("a")
    time.sleep(1.2)
    assert sem.renew("a")  # pushes the expiry out
    time.sleep(1.2)  # past the first lease: held thanks to the renewal
    assert sem.count() == 1 and not sem.acquire("b")
    wait_until(lambda: sem.count() == 0, 10, "the renewed lease to lapse")
    assert sem.acquire("b")  # lapsed slot taken without any release
    assert not sem.renew("a")
    assert not sem.renew("nobody")


def test_key_expires_once_every_lease_lapsed(redis_client):
    sem = LeaseSemaphore(redis_client, "mf:test:sem", limit=3, lease_s=0.2)
    sem.acquire("a")
    assert 0 < redis_client.pttl("mf:test:sem") <= 200
    wait_until(lambda: not redis_client.exists("mf:test:sem"), 10, "the key's 0.2 s expiry")
