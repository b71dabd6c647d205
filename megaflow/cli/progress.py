"""Live progress for long commands: a rich bar on a terminal, one plain line per change when piped.

``Progress(label, total)`` is the display; ``follow_batch(client, batch_id)`` drives one from a
batch's live counts by state (``submit --wait``, ``resume --wait``, and any command that waits on
a batch, such as a SWE-bench evaluation). Progress goes to stderr, so stdout stays for results.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from megaflow.core import states


def format_counts(counts: dict[str, int]) -> str:
    """'QUEUED=2 RUNNING=3 SUCCEEDED=1': states in lifecycle order, then anything else sorted."""
    order = [s for s in states.ORDER if counts.get(s)] + sorted(
        k for k in counts if k not in states.ORDER and counts[k]
    )
    return " ".join(f"{k}={counts[k]}" for k in order)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Progress of ``total`` items under ``label``; call ``update(done, counts)`` as often as you like.

    On a terminal (``stream.isatty()``): a rich progress bar with the counts and an ETA, redrawn in
    place. Otherwise: one line ``LABEL: DONE/TOTAL done | COUNTS | elapsed Ns, eta Ns`` each time
    ``done`` or the counts change, so a CI log shows every step and nothing else.
    """

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, live: bool | None = None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.started = time.monotonic()
        self._last: tuple[int, tuple[tuple[str, int], ...]] | None = None
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:  # noqa: PYI034
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, counts="")
        return self

    def eta(self, done: int) -> float | None:
        """Seconds left at the rate so far (None before the first item is done)."""
        if done <= 0 or done >= self.total:
            return None if done <= 0 else 0.0
        return (time.monotonic() - self.started) / done * (self.total - done)

    def update(self, done: int, counts: dict[str, int] | None = None) -> None:
        counts = counts or {}
        key = (done, tuple(sorted((k, v) for k, v in counts.items() if v)))
        if self._bar is not None:
            self._bar.update(self._task, completed=done, counts=format_counts(counts))
            return
        if key == self._last:
            return
        self._last = key
        elapsed = time.monotonic() - self.started
        eta = self.eta(done)
        tail = f"elapsed {_duration(elapsed)}" + (f", eta {_duration(eta)}" if eta is not None else "")
        shown = format_counts(counts)
        self.stream.write(f"{self.label}: {done}/{self.total} done" + (f" | {shown}" if shown else "") + f" | {tail}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def follow_batch(
    client: Any,
    batch_id: str,
    *,
    timeout: float | None = None,
    poll_s: float = 1.0,
    label: str | None = None,
    stream: TextIO | None = None,
    on_status: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Show a batch's progress until every episode is final; return ``client.status()``.

    Raises TimeoutError when ``timeout`` seconds pass first (the batch keeps running).
    """
    status = client.status(batch_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    with Progress(label or f"batch {batch_id}", status["total"], stream=stream) as bar:
        while True:
            bar.update(status["done"], status["counts"])
            if on_status:
                on_status(status)
            if status["done"] >= status["total"]:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"batch {batch_id}: {status['done']}/{status['total']} episodes finished after {timeout:g}s"
                )
            time.sleep(poll_s)
            status = client.status(batch_id)
