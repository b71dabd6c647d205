"""Batch report: one self-contained HTML page (inline SVG plots, no extra dependencies).

``build_report(store, batch_id, out_dir)`` reads only the batch's task documents from the metadata
store (phase timestamps, host, mode, state, cause, reward) and writes ``index.html`` and
``summary.json``. The numbers come from ``summarize(docs)``; the drawing from ``megaflow.report_svg``.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from megaflow import report_svg as svgplot
from megaflow.core import states
from megaflow.core.errors import NotFoundError
from megaflow.report_svg import percentile
from megaflow.stores.base import MetadataStore

log = logging.getLogger(__name__)

TERMINAL = tuple(s for s in states.ORDER if s in states.TERMINAL)
STATE_ORDER = tuple(states.ORDER)

# (label, from phase, to phase): the latency of each part of an episode.
PHASES = (
    ("queue wait", "submitted", "admitted"),
    ("env start-up", "admitted", "env_ready"),
    ("container boot", "env_starting", "env_ready"),
    ("agent", "env_ready", "evaluating"),
    ("evaluation", "evaluating", "finished"),
    ("total", "submitted", "finished"),
)
STEP_RE = re.compile(r"^step_(\d+)$")


# --- numbers -------------------------------------------------------------------------------------


def _phase(doc: dict[str, Any], name: str) -> float | None:
    value = (doc.get("phases") or {}).get(name)
    if name == "submitted" and value is None:
        value = (doc.get("phases") or {}).get("queued", doc.get("created_at"))
    return float(value) if isinstance(value, (int, float)) else None


def _span(doc: dict[str, Any], start: str, end: str) -> float | None:
    a, b = _phase(doc, start), _phase(doc, end)
    return b - a if a is not None and b is not None and b >= a else None


def step_durations(doc: dict[str, Any]) -> list[float]:
    """Seconds between consecutive agent steps (the first one counted from env_ready)."""
    phases = doc.get("phases") or {}
    steps = sorted(
        (int(m.group(1)), float(t))
        for k, t in phases.items()
        if (m := STEP_RE.match(k)) and isinstance(t, (int, float))
    )
    prev = _phase(doc, "env_ready")
    out = []
    for _, t in steps:
        if prev is not None and t >= prev:
            out.append(t - prev)
        prev = t
    return out


def intervals(docs: Iterable[dict[str, Any]], start: str, end: str, now: float) -> list[tuple[float, float, Any]]:
    """(start, end, doc) per episode that reached ``start``; an episode not yet at ``end`` runs to ``now``."""
    out = []
    for doc in docs:
        a = _phase(doc, start)
        if a is None:
            continue
        b = _phase(doc, end)
        if b is None and doc.get("state") in TERMINAL:
            b = _phase(doc, "finished")
        b = now if b is None else b
        if b >= a:
            out.append((a, b, doc))
    return out


def concurrency(spans: list[tuple[float, float, Any]]) -> list[tuple[float, int]]:
    """Step function [(t, count)] of how many spans are open at each change point."""
    deltas: dict[float, int] = defaultdict(int)
    for a, b, _ in spans:
        deltas[a] += 1
        deltas[b] -= 1
    points, level = [], 0
    for t in sorted(deltas):
        level += deltas[t]
        points.append((t, level))
    return points


def summarize(
    docs: list[dict[str, Any]], *, host_capacity: int | None = None, now: float | None = None
) -> dict[str, Any]:
    """Every number the report shows, as plain JSON-able data."""
    counts = Counter(d.get("state") or "UNKNOWN" for d in docs)
    terminal = sum(counts[s] for s in TERMINAL)
    starts = [t for d in docs if (t := _phase(d, "submitted")) is not None]
    ends = [t for d in docs if (t := _phase(d, "finished")) is not None]
    live = any(d.get("state") not in TERMINAL for d in docs)
    now = time.time() if now is None else now
    t0 = min(starts) if starts else None
    t1 = (now if live else max(ends)) if (ends or live) else None
    if t0 is not None and t1 is not None and t1 < t0:
        t1 = t0
    wall = (t1 - t0) if t0 is not None and t1 is not None else None

    phases: dict[str, dict[str, Any]] = {}
    durations: dict[str, list[float]] = {}
    for label, a, b in PHASES:
        durations[label] = [v for d in docs if (v := _span(d, a, b)) is not None]
    durations["agent step"] = [v for d in docs for v in step_durations(d)]
    for label, values in durations.items():
        phases[label] = {
            "n": len(values),
            "p50": percentile(values, 50),
            "p95": percentile(values, 95),
            "max": max(values) if values else None,
            "mean": sum(values) / len(values) if values else None,
        }

    env_by_mode: dict[str, list[float]] = defaultdict(list)
    for d in docs:
        v = _span(d, "admitted", "env_ready")
        if v is not None:
            env_by_mode[str(d.get("mode") or "unknown")].append(v)

    held = intervals(docs, "admitted", "finished", t1 if t1 is not None else now)
    by_host: dict[str, list[tuple[float, float, Any]]] = defaultdict(list)
    for span in held:
        by_host[str(span[2].get("host") or "unknown")].append(span)
    hosts = {}
    for host, spans in sorted(by_host.items()):
        busy = sum(b - a for a, b, _ in spans)
        mean = busy / wall if wall else None
        hosts[host] = {
            "episodes": len(spans),
            "busy_s": busy,
            "mean_concurrency": mean,
            "peak_concurrency": max((c for _, c in concurrency(spans)), default=0),
            "utilisation": (mean / host_capacity) if mean is not None and host_capacity else None,
        }

    touched: list[dict[str, Any]] = []
    for d in docs:
        for ev in d.get("fleet") or []:
            if isinstance(ev, dict):
                touched.append({"episode_id": d.get("episode_id"), "task_id": d.get("task_id"), **ev})
    touched.sort(key=lambda ev: ev.get("t") or ev.get("launched_at") or 0.0)
    causes = states.failure_causes(docs)
    rewards = [float(d["reward"]) for d in docs if isinstance(d.get("reward"), (int, float))]
    return {
        "episodes": len(docs),
        "states": {s: counts[s] for s in sorted(counts, key=lambda s: (STATE_ORDER + (s,)).index(s))},
        "terminal": terminal,
        "success_rate": counts["SUCCEEDED"] / terminal if terminal else None,
        "start": t0,
        "end": t1,
        "wall_s": wall,
        "live": live,
        "throughput_per_h": len(ends) / wall * 3600 if wall else None,
        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
        "steps_mean": _mean(d.get("steps") for d in docs),
        "prompt_tokens": sum(int(d.get("prompt_tokens") or 0) for d in docs),
        "completion_tokens": sum(int(d.get("completion_tokens") or 0) for d in docs),
        "phases": phases,
        "env_startup_by_mode": {
            m: {"n": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)} for m, v in sorted(env_by_mode.items())
        },
        "hosts": hosts,
        "host_capacity": host_capacity,
        "failure_causes": causes,
        "fleet_episodes": {
            "host_launched": sum(1 for ev in touched if ev.get("event") == "host_launched"),
            "moved": sum(1 for ev in touched if ev.get("event") == "moved"),
            "events": touched[:200],
        },
        "_durations": durations,  # dropped from summary.json; the plots use them
        "_env_by_mode": dict(env_by_mode),
        "_held": held,
        "_waiting": intervals(docs, "submitted", "admitted", t1 if t1 is not None else now),
    }


def _mean(values: Iterable[Any]) -> float | None:
    xs = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(xs) / len(xs) if xs else None


# --- page ----------------------------------------------------------------------------------------


def fmt_s(seconds: float | None) -> str:
    """A duration for people: 850 ms, 12.3 s, 4.5 min, 2.1 h."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(
    batch_id: str, s: dict[str, Any], *, generated: float | None = None, fleet: dict[str, Any] | None = None
) -> str:
    """The report page for summary ``s`` (from summarize)."""
    e = html.escape
    t0 = s["start"] or 0.0
    generated = time.time() if generated is None else generated

    facts = [
        ["episodes", s["episodes"]],
        ["finished", s["terminal"]],
        ["success rate", _pct(s["success_rate"])],
        ["wall time", fmt_s(s["wall_s"]) + (" (still running)" if s["live"] else "")],
        ["throughput", "–" if s["throughput_per_h"] is None else f"{s['throughput_per_h']:.1f} episodes/h"],
        ["mean reward", "–" if s["reward_mean"] is None else f"{s['reward_mean']:.3f}"],
        ["mean steps", "–" if s["steps_mean"] is None else f"{s['steps_mean']:.1f}"],
        ["tokens (prompt / completion)", f"{s['prompt_tokens']:,} / {s['completion_tokens']:,}"],
    ]
    states = [[k, v, _pct(v / s["episodes"]) if s["episodes"] else "–"] for k, v in s["states"].items()]
    phase_rows = [[k, v["n"], fmt_s(v["p50"]), fmt_s(v["p95"]), fmt_s(v["max"])] for k, v in s["phases"].items()]

    conc = svgplot.step_chart(
        [
            ("running (admitted → finished)", [(t - t0, c) for t, c in concurrency(s["_held"])]),
            ("waiting (submitted → admitted)", [(t - t0, c) for t, c in concurrency(s["_waiting"])]),
        ],
        title="Concurrency over time",
        x_label="seconds since the first submit",
        y_label="episodes",
    )
    lat = svgplot.box_chart(
        [(k, v) for k, v in s["_durations"].items()],
        title="Latency per phase",
        x_label="seconds",
        fmt=fmt_s,
    )
    env = svgplot.box_chart(
        [(f"{mode}", v) for mode, v in s["_env_by_mode"].items()],
        title="Env start-up by mode",
        x_label="seconds (admitted → env ready)",
        fmt=fmt_s,
    )
    cap = s["host_capacity"]
    if cap:
        host_bars = [
            (
                h,
                v["utilisation"] or 0.0,
                f"{_pct(v['utilisation'])} · peak {v['peak_concurrency']}/{cap} · {v['episodes']} ep",
            )
            for h, v in s["hosts"].items()
        ]
        host_label = f"mean share of {cap} slots held"
    else:
        host_bars = [
            (
                h,
                v["mean_concurrency"] or 0.0,
                f"mean {v['mean_concurrency'] or 0:.2f} · peak {v['peak_concurrency']} · {v['episodes']} ep",
            )
            for h, v in s["hosts"].items()
        ]
        host_label = "mean episodes held at once (admitted → finished)"
    hosts = svgplot.bar_chart(
        host_bars,
        title="Per-host utilisation",
        x_label=host_label,
        fmt=(lambda v: f"{100 * v:.0f}%") if cap else svgplot.fmt_num,
        xmax=1.0 if cap else None,
    )
    fails = svgplot.bar_chart(
        [(c, float(n), str(n)) for c, n in s["failure_causes"].items()], title="Failure causes", x_label="episodes"
    )
    host_rows = [
        [
            h,
            v["episodes"],
            fmt_s(v["busy_s"]),
            "–" if v["mean_concurrency"] is None else f"{v['mean_concurrency']:.2f}",
            v["peak_concurrency"],
            _pct(v["utilisation"]),
        ]
        for h, v in s["hosts"].items()
    ]

    sections = [
        ("Summary", _table(["", ""], facts) + _table(["state", "episodes", "share"], states)),
        ("Concurrency over time", conc),
        ("Latency per phase", lat + _table(["phase", "n", "p50", "p95", "max"], phase_rows)),
        (
            "Env start-up by mode",
            env
            + _table(
                ["mode", "n", "p50", "p95"],
                [[m, v["n"], fmt_s(v["p50"]), fmt_s(v["p95"])] for m, v in s["env_startup_by_mode"].items()],
            ),
        ),
        (
            "Per-host utilisation",
            hosts + _table(["host", "episodes", "busy", "mean held", "peak", "utilisation"], host_rows),
        ),
        ("Failure causes", fails),
    ]
    if fleet is not None:
        sections.append(("Fleet: scaling, utilisation and cost", fleet_section(fleet, t0)))
    if s["fleet_episodes"]["events"]:
        sections.append(("Episodes touched by fleet decisions", fleet_episodes_section(s["fleet_episodes"], t0)))
    body = "\n".join(f"<section><h2>{e(h)}</h2>\n{content}</section>" for h, content in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(generated))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)) if s["start"] else "–"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>MegaFlow batch {e(batch_id)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: .8em 1.5em .8em 0; display: inline-table; vertical-align: top; }}
td, th {{ padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; }}
th {{ background: #f6f6f6; }} svg {{ max-width: 100%; height: auto; display: block; }}
.meta {{ color: #666; }}
</style></head><body>
<h1>MegaFlow batch <code>{e(batch_id)}</code></h1>
<p class="meta">first submit {started} · report generated {stamp} from the metadata store</p>
{body}
</body></html>
"""


def fleet_section(fleet: dict[str, Any], t0: float) -> str:
    """The elastic fleet over the batch (``megaflow.elastic.usage.fleet_summary``): hosts, decisions, cost."""
    series = fleet.get("fleet_series") or []
    chart = svgplot.step_chart(
        [
            ("env hosts", [(t - t0, h) for t, h, _, _ in series]),
            ("live episodes", [(t - t0, live) for t, _, live, _ in series]),
            ("slots held", [(t - t0, slots) for t, _, _, slots in series]),
        ],
        title="Fleet over time",
        x_label="seconds since the first submit",
        y_label="count",
    )
    facts = [
        ["host-hours", f"{fleet['host_hours']:.3f}"],
        ["estimated cost", f"{fleet['cost']:.4f}"],
        ["used / held capacity", _pct(fleet.get("used_share"))],
    ]
    hosts = [
        [
            h,
            v["instance_type"],
            f"{v['host_hours']:.3f}",
            f"{v['cost']:.4f}",
            "–" if v.get("mean_used") is None else f"{v['mean_used']:.2f}",
            v.get("peak_used", "–"),
            _pct(v.get("used_share")),
            "–" if v.get("cpu_mean") is None else f"{v['cpu_mean']:.2f}",
            f"{v.get('peak_rss_mb', 0):.0f}",
            v.get("disk_free_gb", "–"),
        ]
        for h, v in fleet["hosts"].items()
    ]
    events = [
        [fmt_s(ev["ts"] - t0), ev["kind"], ev.get("host", ""), ev.get("target", ""), ev.get("reason", "")]
        for ev in fleet["events"]
    ]
    strips = svgplot.heat_strips(
        [
            (
                h,
                [
                    (t - t0, used / cap if cap else 0.0, f"{used}/{cap} slots at {fmt_s(t - t0)}")
                    for t, used, cap in v.get("series") or []
                ],
            )
            for h, v in fleet["hosts"].items()
        ],
        title="Per-host utilisation (live episodes / slots, sampled each autoscaler tick)",
        x_label="seconds since the first submit",
    )
    return (
        chart
        + strips
        + _table(["", ""], facts)
        + _table(
            [
                "host",
                "type",
                "host-hours",
                "cost",
                "mean live",
                "peak",
                "used share",
                "cpu cores",
                "peak rss MB",
                "disk free GB",
            ],
            hosts,
        )
        + _table(["at", "decision", "host", "target", "reason"], events)
    )


def fleet_episodes_section(fe: dict[str, Any], t0: float) -> str:
    """Episodes that waited for a host launched for the backlog, or were moved off a lost host."""
    facts = [
        ["episodes placed on a host launched while they waited", fe["host_launched"]],
        ["moves off a lost (or lost while draining) host", fe["moved"]],
    ]
    rows = [
        [
            ev.get("episode_id", ""),
            ev.get("task_id") or "",
            ev.get("event", ""),
            ev.get("host") or ev.get("from_host") or "",
            fmt_s((ev.get("t") or ev.get("launched_at") or t0) - t0),
            "–" if ev.get("waited_s") is None else fmt_s(ev["waited_s"]),
            ev.get("reason", ""),
        ]
        for ev in fe["events"]
    ]
    return _table(["", ""], facts) + _table(["episode", "task", "event", "host", "at", "waited", "reason"], rows)


def fleet_over(settings: Any) -> Callable[[float | None, float | None], dict[str, Any] | None]:
    """The elastic fleet's summary over a batch's time span, read from Redis (None when the fleet
    keeps no records, or Redis cannot be reached: the report is still written, without that section)."""

    def read(start: float | None, end: float | None) -> dict[str, Any] | None:
        import redis

        from megaflow.elastic.config import ElasticConfig
        from megaflow.elastic.usage import ElasticKeys, fleet_summary

        client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10)
        try:
            if not client.exists(ElasticKeys(settings.key_prefix).fleet):
                return None
            return fleet_summary(
                client, settings.key_prefix, ElasticConfig.from_settings(settings), since=start or 0.0, until=end
            )
        except redis.RedisError as exc:
            log.warning("report: no fleet section (Redis: %s)", exc)
            return None
        finally:
            client.close()

    return read


def build_report(
    store: MetadataStore,
    batch_id: str,
    out_dir: str | Path,
    *,
    host_capacity: int | None = None,
    now: float | None = None,
    fleet: dict[str, Any] | Callable[[float | None, float | None], dict[str, Any] | None] | None = None,
) -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/summary.json`` for one batch; return the page's path.

    ``fleet`` is the elastic fleet's summary, or a function of the batch's (start, end) that returns
    it (``fleet_over``), or None for no fleet section.
    """
    docs = store.find_tasks(batch_id=batch_id)
    if not docs:
        raise NotFoundError(f"batch {batch_id!r} has no task documents in the metadata store")
    summary = summarize(docs, host_capacity=host_capacity, now=now)
    if callable(fleet):
        fleet = fleet(summary["start"], summary["end"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    page.write_text(render_html(batch_id, summary, fleet=fleet), encoding="utf-8")
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    if fleet is not None:
        public["fleet"] = {k: v for k, v in fleet.items() if k != "fleet_series"}
    (out / "summary.json").write_text(json.dumps({"batch_id": batch_id, **public}, indent=2), encoding="utf-8")
    return page
