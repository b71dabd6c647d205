"""Dynamic model endpoints: a model host registers its base URL with a TTL and renews it.

``megaflow model serve`` calls :func:`register_endpoint` every few seconds while its vLLM server
answers, and :func:`deregister_endpoint` on exit; a host that dies simply stops renewing and
drops out after the TTL. The gateway's pool for a model is ``settings.model_endpoints`` (or the
task spec's) plus :func:`registered_endpoints`. Expiry uses Redis time, not the host's clock.

Keys: ``keys.model("endpoints", MODEL)``: sorted set base_url -> expiry (Redis time, seconds);
``keys.model("models")``: set of model names that ever had a registration.
"""

from __future__ import annotations

from typing import Any

from megaflow.core.keys import Keys

# KEYS[1] endpoints zset, KEYS[2] models set; ARGV[1] base_url, ARGV[2] ttl_s, ARGV[3] model name
REGISTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

# KEYS[1] endpoints zset; returns the live members after removing the expired ones
LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def normalize_url(url: str) -> str:
    """``http://h:8000/v1/`` -> ``http://h:8000/v1`` (a bare ``http://h:8000`` gets ``/v1``)."""
    url = url.strip().rstrip("/")
    if not url.endswith("/v1") and "/v1/" not in url + "/" and url.count("/") <= 2:
        url += "/v1"
    return url


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def register_endpoint(redis_client: Any, keys: Keys, model_name: str, base_url: str, ttl: float) -> str:
    """Add (or renew) ``base_url`` in ``model_name``'s pool for ``ttl`` seconds; returns the URL."""
    url = normalize_url(base_url)
    redis_client.eval(
        REGISTER, 2, keys.model("endpoints", model_name), keys.model("models"), url, float(ttl), model_name
    )
    return url


def deregister_endpoint(redis_client: Any, keys: Keys, model_name: str, base_url: str) -> None:
    """Take ``base_url`` out of ``model_name``'s pool now."""
    redis_client.zrem(keys.model("endpoints", model_name), normalize_url(base_url))


def registered_endpoints(redis_client: Any, keys: Keys, model_name: str) -> list[str]:
    """Base URLs registered for ``model_name`` whose TTL has not lapsed."""
    return [_text(m) for m in redis_client.eval(LIVE, 1, keys.model("endpoints", model_name))]


def registered_models(redis_client: Any, keys: Keys) -> list[str]:
    """Model names that have (or had) registered endpoints."""
    return sorted(_text(m) for m in redis_client.smembers(keys.model("models")))
