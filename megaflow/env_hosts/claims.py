"""Claims of warm containers: which episode took which pool container (labels cannot change after create)."""

from __future__ import annotations

import json
import threading


class Claims:
    """Container id -> claim ({episode_id, lease_expiry, labels}) of warm containers handed out.

    Redis key owned: ``keys.env(host, "claims")`` hash container id -> JSON claim; without Redis the
    claims live in this process.
    """

    def __init__(self, redis_client=None, key: str | None = None):
        self.redis = redis_client if key else None
        self.key = key
        self._local: dict[str, dict] = {}
        self._lock = threading.Lock()

    def record(self, cid: str, claim: dict) -> None:
        if self.redis is not None:
            self.redis.hset(self.key, cid, json.dumps(claim))
        else:
            with self._lock:
                self._local[cid] = claim

    def drop(self, cid: str) -> None:
        if self.redis is not None:
            self.redis.hdel(self.key, cid)
        else:
            with self._lock:
                self._local.pop(cid, None)

    def all(self) -> dict[str, dict]:
        if self.redis is not None:
            return {
                k if isinstance(k, str) else k.decode(): json.loads(v) for k, v in self.redis.hgetall(self.key).items()
            }
        with self._lock:
            return dict(self._local)
