"""Elastic records in Redis: scaling events, per-host utilisation samples, host-hours and cost.

Compact by design: one stream of decisions, one capped list of samples per host, one list of
finished hosts. ``fleet_summary`` turns them into what the batch report shows.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from megaflow.core.keys import Keys
from megaflow.elastic.config import ElasticConfig
from megaflow.engine.host_usage import env_host_usage


class ElasticKeys:
    """Every Redis key of the elastic package (``E`` = ``<prefix>:elastic``).

    ``E:events`` stream of decisions {kind, ts, ...}; ``E:hosts`` hash of managed hosts;
    ``E:done`` list of finished hosts (JSON); ``E:samples:<host>`` capped list of samples;
    ``E:fleet`` capped list of fleet samples {t, hosts, pending, queued, live, target};
    ``E:leader`` the id of the one autoscaler allowed to act (a lease, renewed every tick);
    ``E:pools`` hash image -> warm containers per host, published by the automatic mode choice and
    applied by every env worker's heartbeat.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.base = f"{prefix}:elastic"
        self.events = f"{self.base}:events"
        self.hosts = f"{self.base}:hosts"
        self.done = f"{self.base}:done"
        self.fleet = f"{self.base}:fleet"
        self.leader = f"{self.base}:leader"
        self.pools = f"{self.base}:pools"

    def samples(self, host: str) -> str:
        return f"{self.base}:samples:{host}"


def record_event(r, keys: ElasticKeys, kind: str, *, now: float | None = None, **data: Any) -> None:
    """Append one decision or host change to the elastic event stream (capped)."""
    ev = {"kind": kind, "ts": time.time() if now is None else now, **data}
    r.xadd(keys.events, {"e": json.dumps(ev)}, maxlen=100_000, approximate=True)


def events(r, keys: ElasticKeys, since: float = 0.0) -> list[dict]:
    """Every recorded event at or after ``since``, oldest first."""
    out = []
    for _, fields in r.xrange(keys.events, "-", "+"):
        ev = json.loads(fields["e"])
        if ev["ts"] >= since:
            out.append(ev)
    return out


def sample(
    r,
    keys: ElasticKeys,
    registered: dict[str, dict],
    provider: Any,
    managed: dict[str, dict],
    st: Any,
    decision: Any,
    now: float,
    *,
    keep: int,
) -> None:
    """One utilisation sample per registered host and one of the fleet, each list capped at ``keep``.

    A host's row has its slots, disk and warm pool, what its env worker last reported about its
    machine (process CPU and memory, load, memory available), and the provider's own figures where
    it has them (the local provider reads /proc).
    """
    reported = env_host_usage(r, Keys(keys.prefix), list(registered))
    pipe = r.pipeline(transaction=False)
    for name, h in registered.items():
        row = {
            "t": now,
            "used": h["used"],
            "capacity": h["capacity"],
            "booting": h["booting"],
            "disk_free_gb": h["disk_free_gb"],
            "warm": sum(h["warm"].values()),
            "drained": h["drained"],
            **reported.get(name, {}),
        }
        rec = managed.get(name)
        if rec is not None and hasattr(provider, "usage"):
            from megaflow.elastic.providers import HostHandle

            row.update(provider.usage(HostHandle(name, rec["ref"], rec["instance_type"], rec["launched_at"])))
        pipe.rpush(keys.samples(name), json.dumps(row))
        pipe.ltrim(keys.samples(name), -keep, -1)
    pipe.rpush(
        keys.fleet,
        json.dumps(
            {
                "t": now,
                "hosts": st.hosts,
                "pending": st.pending,
                "queued": st.queued,
                "live": st.live,
                "target": decision.target,
                "slots": sum(h["capacity"] for h in registered.values()),
            }
        ),
    )
    pipe.ltrim(keys.fleet, -keep, -1)
    pipe.execute()


def launch_note(r, prefix: str, host: str, queued_at: float) -> dict | None:
    """The fleet event for an episode placed on ``host``, when the autoscaler launched that host after
    the episode was queued (it waited for a host launched for the backlog); else None. One HGET."""
    raw = r.hget(ElasticKeys(prefix).hosts, host)
    if not raw:
        return None
    rec = json.loads(raw)
    if rec["launched_at"] <= queued_at:
        return None
    return {
        "event": "host_launched",
        "host": host,
        "launched_at": round(rec["launched_at"], 3),
        "reason": rec.get("reason", ""),
        "waited_s": round(time.time() - queued_at, 3),
    }


def archive_host(r, keys: ElasticKeys, rec: dict) -> None:
    """Keep a removed host's record (launch and stop times, instance type) for host-hours."""
    r.rpush(keys.done, json.dumps(rec))


def host_records(r, keys: ElasticKeys) -> list[dict]:
    """Every host the autoscaler started: finished ones and those it still manages."""
    out = [json.loads(x) for x in r.lrange(keys.done, 0, -1)]
    return out + [json.loads(v) for v in r.hgetall(keys.hosts).values()]


def fleet_gauges(r, prefix: str, cfg: ElasticConfig, *, now: float | None = None) -> dict[str, Any]:
    """The fleet right now, for Prometheus: managed hosts by state, the last target and fleet sample,
    published warm pools, and host-hours and cost by instance type since the records began.

    Reads ``E:hosts``, ``E:done``, the last entry of ``E:fleet`` and ``E:pools``; writes nothing.
    """
    keys = ElasticKeys(prefix)
    now = time.time() if now is None else now
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(keys.hosts)
    pipe.lrange(keys.done, 0, -1)
    pipe.lindex(keys.fleet, -1)
    pipe.hgetall(keys.pools)
    managed_raw, done_raw, last_raw, pools = pipe.execute()
    managed = [json.loads(v) for v in managed_raw.values()]
    by_state = dict.fromkeys(("launching", "active", "draining", "removed"), 0)
    for rec in managed:
        by_state[rec["state"]] = by_state.get(rec["state"], 0) + 1
    hours: dict[str, float] = {}
    for rec in [json.loads(x) for x in done_raw] + managed:
        stop = rec.get("stopped_at") or now
        hours[rec["instance_type"]] = hours.get(rec["instance_type"], 0.0) + max(0.0, stop - rec["launched_at"]) / 3600
    last = json.loads(last_raw) if last_raw else None
    return {
        "hosts_by_state": by_state,
        "instance_types": {rec["name"]: rec["instance_type"] for rec in managed},
        "last_sample": last,
        "host_hours": hours,
        "cost": {t: h * cfg.price(t) for t, h in hours.items()},
        "pools": {image: int(n) for image, n in pools.items()},
    }


def fleet_summary(r, prefix: str, cfg: ElasticConfig, *, since: float = 0.0, until: float | None = None) -> dict:
    """Events, per-host utilisation, host-hours and cost in ``[since, until]`` (for the report)."""
    keys = ElasticKeys(prefix)
    until = time.time() if until is None else until
    hosts: dict[str, dict] = {}
    for rec in host_records(r, keys):
        start = max(since, rec["launched_at"])
        stop = min(until, rec.get("stopped_at") or until)
        if stop <= start:
            continue
        hours = (stop - start) / 3600
        price = cfg.price(rec["instance_type"])
        hosts[rec["name"]] = {"instance_type": rec["instance_type"], "host_hours": hours, "cost": hours * price}
    names = {k.rsplit(":", 1)[1] for k in r.scan_iter(f"{keys.base}:samples:*")}
    for name in sorted(names):
        rows = [json.loads(x) for x in r.lrange(keys.samples(name), 0, -1)]
        rows = [x for x in rows if since <= x["t"] <= until]
        if not rows:
            continue
        h = hosts.setdefault(
            name, {"instance_type": "static", "cost": 0.0, "host_hours": (rows[-1]["t"] - rows[0]["t"]) / 3600}
        )
        held = sum(x["capacity"] for x in rows)
        h.update(
            samples=len(rows),
            mean_used=sum(x["used"] for x in rows) / len(rows),
            peak_used=max(x["used"] for x in rows),
            used_share=(sum(x["used"] for x in rows) / held) if held else None,
            disk_free_gb=rows[-1]["disk_free_gb"],
            peak_rss_mb=max((x.get("rss_mb", 0.0) for x in rows), default=0.0),
            series=[(x["t"], x["used"], x["capacity"]) for x in rows],
        )
        cpu = [x["cpu_s"] for x in rows if "cpu_s" in x]
        if len(cpu) > 1 and rows[-1]["t"] > rows[0]["t"]:
            h["cpu_mean"] = (cpu[-1] - cpu[0]) / (rows[-1]["t"] - rows[0]["t"])
    fleet = [json.loads(x) for x in r.lrange(keys.fleet, 0, -1)]
    fleet = [x for x in fleet if since <= x["t"] <= until]
    slot_s = used_s = 0.0
    for a, b in itertools.pairwise(fleet):
        slot_s += a["slots"] * (b["t"] - a["t"])
        used_s += a["live"] * (b["t"] - a["t"])
    return {
        "events": events(r, keys, since),
        "hosts": hosts,
        "host_hours": sum(h["host_hours"] for h in hosts.values()),
        "cost": sum(h["cost"] for h in hosts.values()),
        "used_share": used_s / slot_s if slot_s else None,
        "fleet_series": [(x["t"], x["hosts"], x["live"], x["slots"]) for x in fleet],
    }
