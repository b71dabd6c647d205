"""Every Redis key name MegaFlow uses, in one place.

All keys start with the configured prefix (``Settings.key_prefix``, default ``mf``) so several
fleets can share one Redis. Modules that own keys list them in their class docstring.
"""

from __future__ import annotations


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str = "mf"):
        self.prefix = prefix

    # --- episodes (megaflow.engine.episodes) -------------------------------------------------------------
    def episode(self, episode_id: str) -> str:
        """Hash: episode state (JSON fields), step counter, phase timestamps."""
        return f"{self.prefix}:ep:{episode_id}"

    def history(self, episode_id: str) -> str:
        """List: the episode's messages / actions / observations, one JSON record each."""
        return f"{self.prefix}:ep:{episode_id}:hist"

    def batch(self, batch_id: str) -> str:
        """Hash: batch metadata (user, created, size)."""
        return f"{self.prefix}:batch:{batch_id}"

    def batch_episodes(self, batch_id: str) -> str:
        """List: episode ids of a batch in submission order."""
        return f"{self.prefix}:batch:{batch_id}:eps"

    def batch_done(self, batch_id: str) -> str:
        """Set: episode ids of a batch that reached a terminal state."""
        return f"{self.prefix}:batch:{batch_id}:done"

    @property
    def batches(self) -> str:
        """Sorted set: batch id -> creation time."""
        return f"{self.prefix}:batches"

    @property
    def live(self) -> str:
        """Sorted set: live (non-terminal) episode id -> time of its last step (for the sweep)."""
        return f"{self.prefix}:live"

    # --- per-person submitters (megaflow.security.requests) --------------------------------------
    @property
    def persons(self) -> str:
        """Set: names of the per-person Redis users (``megaflow acl add-user``) whose requests control serves."""
        return f"{self.prefix}:persons"

    def user(self, name: str, *parts: str) -> str:
        """A key in person ``name``'s own namespace, the only keys that person's Redis user may touch."""
        return ":".join((self.prefix, "u", name, *parts))

    # --- records (megaflow.records) -------------------------------------------------------------
    @property
    def events(self) -> str:
        """Stream: every state change, consumed by the recorder group."""
        return f"{self.prefix}:events"

    # --- fleet (megaflow.fleet / worker health) -------------------------------------------------
    def worker_health(self, role: str, name: str) -> str:
        """String with TTL: a worker's last health report (JSON)."""
        return f"{self.prefix}:health:{role}:{name}"

    # --- resource manager (megaflow.engine.resources) ------------------------------------------
    def res(self, name: str | None = None, member: str | None = None) -> str:
        """A resource-manager key (one of RESOURCE_KEYS / RESOURCE_KEYS_PER), or its namespace."""
        base = f"{self.prefix}:res"
        if name is None:
            return base
        if member is None:
            if name not in RESOURCE_KEYS:
                raise KeyError(f"not a resource-manager key: {name!r}")
            return f"{base}:{name}"
        if name not in RESOURCE_KEYS_PER:
            raise KeyError(f"not a per-member resource-manager key: {name!r}")
        return f"{base}:{name}:{member}"

    # --- environment hosts (megaflow.env_hosts) -------------------------------------------------
    def env(self, *parts: str) -> str:
        """Namespace for env-host keys (registration, warm pools, image caches)."""
        return ":".join((self.prefix, "env", *parts))

    # --- model gateway (megaflow.model_gateway) -------------------------------------------------
    def model(self, *parts: str) -> str:
        """Namespace for model-gateway keys (endpoint health, stickiness, semaphores)."""
        return ":".join((self.prefix, "model", *parts))

    # --- per-episode gateway of installed agents (megaflow.services.episode_gateway) --------------
    def gateway(self, *parts: str) -> str:
        """Namespace ``<prefix>:gw`` of the per-episode gateway's keys (the ACL patterns use it)."""
        return ":".join((self.prefix, "gw", *parts))

    def gateway_key(self, key_sha256: str) -> str:
        """String with TTL: episode id named by a gateway API key (stored by the key's SHA-256, never the key)."""
        return self.gateway("key", key_sha256)

    def gateway_log(self, episode_id: str) -> str:
        """List: the episode's gateway calls (request and whole reply, JSON) not yet in its trajectory."""
        return self.gateway("log", episode_id)

    def gateway_count(self, episode_id: str) -> str:
        """Counter: the episode's gateway calls so far (numbers each call)."""
        return self.gateway("n", episode_id)

    def gateway_call(self, call_id: str) -> str:
        """String with TTL: a gateway call waiting for a model worker (JSON body and number)."""
        return self.gateway("call", call_id)

    def gateway_reply(self, call_id: str) -> str:
        """List with TTL: the model worker's answer to a gateway call (the gateway BLPOPs it)."""
        return self.gateway("reply", call_id)


# The resource manager's keys under ``<prefix>:res`` (what each holds: ResourceManager's docstring).
# The Lua scripts get their key names from ``resource_lua_prelude()``, built from these tables, so
# every name is spelled once.
RESOURCE_KEYS = (
    "global",
    "held",
    "admitted",
    "seq",
    "queued",
    "heads",
    "ready",
    "parked",
    "quotas",
    "hosts",
    "drained",
    "hostcap",
    "wake",
)
# per-member keys: name -> the Lua helper function that builds ``<res>:<name>:<member>``
RESOURCE_KEYS_PER = {
    "user": "ukey",
    "host": "hkey",
    "q": "qkey",
    "hostinfo": "infokey",
    "himages": "imgkey",
    "hwarm": "warmkey",
    "imghosts": "imgidx",
    "boot": "bootkey",
    "bootrate": "bootratekey",
}


def resource_lua_prelude() -> str:
    """Lua that defines ``K.<name>`` and ``<fn>(member)`` for every resource key, from ARGV[1] (the namespace)."""
    fixed = ", ".join(f"{n} = base .. ':{n}'" for n in RESOURCE_KEYS)
    fns = "\n".join(f"local function {fn}(m) return base .. ':{n}:' .. m end" for n, fn in RESOURCE_KEYS_PER.items())
    return f"local base = ARGV[1]\nlocal K = {{{fixed}}}\n{fns}\n"
