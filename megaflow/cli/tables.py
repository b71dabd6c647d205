"""Tables for people: ids never folded, a line a row when a table cannot fit the terminal."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from megaflow.core import states

RESULT_COLUMNS = (
    ("episode", "episode_id"),
    ("task", "task_id"),
    ("state", "state"),
    ("reward", "reward"),
    ("cause", "cause"),
    ("host", "host"),
    ("steps", "steps"),
    ("fleet", "fleet"),
)
ID_COLUMNS = {"episode", "task", "batch"}


def print_table(
    out: Console,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    ids: Iterable[str] = (),
    title: str | None = None,
) -> None:
    """A table whose id columns are never folded; when it cannot fit, one ``id  key=value ...`` line a row."""
    id_cols = set(ids)
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    if sum(widths) + 3 * len(columns) + 1 <= out.width:
        table = Table(title=title)
        for col in columns:
            table.add_column(col, no_wrap=col in id_cols, overflow="fold")
        for r in cells:
            table.add_row(*r)
        out.print(table)
        return
    if title:
        out.print(title, markup=False)
    for r in cells:
        first = [v for c, v in zip(columns, r) if c in id_cols and v]
        rest = [f"{c}={v}" for c, v in zip(columns, r) if c not in id_cols and v]
        out.print("  ".join(first + rest), markup=False, highlight=False, soft_wrap=True)


def fleet_note(events: Any) -> str:
    """Elastic decisions that touched an episode, short: ``launched el-2`` / ``moved off env-1``."""
    out = []
    for ev in events or []:
        if ev.get("event") == "host_launched":
            out.append(f"launched {ev.get('host', '')}")
        elif ev.get("event") == "moved":
            out.append(f"moved off {ev.get('from_host', '')}")
    return ", ".join(out)


def print_results(out: Any, rows: list[dict[str, Any]], title: str | None = None) -> None:
    """Episode results as a table (one ``EPISODE TASK state=...`` line a row when the table cannot fit)."""
    cells = [
        [
            fleet_note(r.get(k))
            if k == "fleet"
            else ""
            if r.get(k) is None
            else f"{r[k]:g}"
            if isinstance(r.get(k), float)
            else r.get(k)
            for _, k in RESULT_COLUMNS
        ]
        for r in rows
    ]
    print_table(out, [c for c, _ in RESULT_COLUMNS], cells, ids=ID_COLUMNS, title=title)


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{s}={counts[s]}" for s in states.ORDER if counts.get(s))


def render_status(console: Console, data: dict[str, Any], hint: Console | None = None) -> None:
    """Tables for batch_status() or overview(); ``hint`` (stderr) gets advice that is not data."""
    hint = hint or console
    if "episodes" in data:
        keys = ("episode_id", "task_id", "state", "reward", "cause", "host", "steps")
        print_table(
            console,
            ("episode", "task", "state", "reward", "cause", "host", "steps", "fleet"),
            [[*(e.get(k) for k in keys), fleet_note(e.get("fleet"))] for e in data["episodes"]],
            ids=("episode", "task"),
            title=f"batch {data['batch_id']}: {data['finished']}/{data['total']} finished",
        )
        console.print(f"states: {_counts(data['counts'])}")
        console.print(
            f"throughput: {data['throughput_per_min'] or '-'} episodes/min; mean reward: "
            f"{data['mean_reward'] if data['mean_reward'] is not None else '-'}"
        )
        if data["failures_by_cause"]:
            console.print("failures by cause: " + ", ".join(f"{k}={v}" for k, v in data["failures_by_cause"].items()))
        if not data["episodes"]:
            hint.print(
                f"[yellow]{data.get('unrecorded', 0)} episodes in Redis but no records yet: is the control "
                "service (recorder) running? `megaflow up`[/yellow]"
            )
        return
    rows = []
    for b in data["batches"]:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["created_at"])) if b.get("created_at") else ""
        rows.append(
            [
                b["batch_id"],
                b.get("user") or "",
                created,
                f"{b['finished']}/{b['total']}",
                _counts(b["counts"]),
                str(b["throughput_per_min"] or "-"),
                ", ".join(f"{k}={v}" for k, v in b["failures_by_cause"].items()),
            ]
        )
    columns = ("batch", "user", "created", "done", "states", "episodes/min", "failures by cause")
    print_table(console, columns, rows, ids=("batch", "user"), title="recent batches")
    u = Table(title="per user")
    u.add_column("user")
    u.add_column("states")
    for name, counts in data["users"].items():
        u.add_row(name, _counts(counts))
    console.print(u)
