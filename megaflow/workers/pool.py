"""Celery's threads pool without a ``Future`` per task (``--pool threads`` of every MegaFlow worker).

Celery's ``threads`` pool hands each task to a ``concurrent.futures.ThreadPoolExecutor``: every task
builds a ``Future`` (a ``Condition`` and its lock) that nobody reads, since the task's outcome goes
to the request's callbacks, and its worker thread then settles that future under the condition's
lock. At thousands of tasks a second that is ~10% of a worker's consumer loop (py-spy, env worker
at N=10,000). This pool keeps the executor's behaviour (a thread per task up to the pool's limit,
started only when no thread is idle; a warm shutdown waits for running tasks and drops queued ones,
whose messages stay unacknowledged and are redelivered) with one ``SimpleQueue`` item per task.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from queue import Empty, SimpleQueue
from typing import Any

from celery.concurrency.base import BasePool, apply_target
from celery.concurrency.thread import TaskPool as CeleryThreadPool

log = logging.getLogger(__name__)

POOL = f"{__name__}:TaskPool"
_STOP = None  # the item that ends a worker thread


class TaskPool(CeleryThreadPool):
    """Threads pool: tasks go on one queue, taken by up to ``limit`` threads started on demand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        BasePool.__init__(self, *args, **kwargs)  # not Celery's: it would start a ThreadPoolExecutor
        self._work: SimpleQueue = SimpleQueue()
        self._idle: deque = deque()  # one token per idle thread (deque's append and pop are atomic)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = False

    def on_apply(
        self,
        target: Any,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Any = None,
        accept_callback: Any = None,
        **_: Any,
    ) -> None:
        if self._stopping:
            raise RuntimeError("cannot run a task: the pool is shutting down")
        self._work.put((target, args, kwargs, callback, accept_callback))
        try:
            self._idle.pop()  # an idle thread takes it
        except IndexError:
            self._grow()
        # no result object: the request's callbacks carry the outcome, and threads cannot be terminated

    def _grow(self) -> None:
        with self._lock:
            if len(self._threads) < self.limit and not self._stopping:
                t = threading.Thread(target=self._run, name=f"megaflow-task-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def _run(self) -> None:
        get, idle = self._work.get, self._idle
        while True:
            item = get()
            if item is _STOP:
                return
            try:
                apply_target(*item)
            except BaseException:  # apply_target reports a task's outcome itself; this is a pool bug
                log.exception("a task raised past Celery's tracer")
            del item
            idle.append(1)

    def on_stop(self) -> None:
        """Drop the tasks no thread has started, then wait for the running ones (a warm shutdown)."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
        dropped = 0
        while True:
            try:
                item = self._work.get_nowait()
            except Empty:
                break
            dropped += item is not _STOP
        if dropped:
            log.info("pool stopping: %d queued tasks not started (their messages are redelivered)", dropped)
        for _ in threads:
            self._work.put(_STOP)
        for t in threads:
            t.join()
        BasePool.on_stop(self)

    def _get_info(self) -> dict[str, Any]:
        info = BasePool._get_info(self)
        info.update({"max-concurrency": self.limit, "threads": len(self._threads)})
        return info
