"""The Celery app: ``celery -A megaflow.workers worker|inspect|flower`` works, as does ``megaflow worker``.

The app object exists at import (stock Celery needs one) but binds nothing then: its configuration
is computed from Settings on first use (``add_defaults`` is lazy), so importing this module opens no
connection and reads no file. JSON only, one queue per service, routing by task name.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from megaflow.core import wire
from megaflow.core.settings import Settings
from megaflow.workers import transport

transport.install()  # redis:// brokers use one Redis client per channel (megaflow.workers.transport)

_settings: Settings | None = None


def queue(name: str) -> Queue:
    """A queue on its own direct exchange, so no two queues share a binding."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings of a MegaFlow app bound to ``settings.redis_url``."""
    return dict(
        broker_url=settings.redis_url,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a Redis restart is waited out, never fatal to a worker
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "global_keyprefix": wire.broker_prefix(settings.key_prefix),
            # scan for messages of dead workers every 10 s (they are redelivered once older than
            # the visibility timeout), not every 100 s as kombu's default throttle would
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # the lock around that scan: a worker killed while holding it (kill -9 of a whole fleet)
            # left it for kombu's default 300 s, and no worker redelivered anything until it expired
            "unacked_mutex_expire": 30,
        },
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # a task that raised past the never-strand guard could not reach Redis: leave its message
        # unacknowledged so it is redelivered, never lost
        task_acks_on_failure_or_timeout=False,
        worker_prefetch_multiplier=1,
        task_send_sent_event=False,  # one Redis publish less per hop; workers still send task events
        worker_send_task_events=settings.task_events,
        task_default_queue=wire.AGENT_QUEUE,
        task_default_exchange=wire.AGENT_QUEUE,
        task_default_routing_key=wire.AGENT_QUEUE,
        task_queues=[queue(q) for q in wire.QUEUES],
        task_create_missing_queues=True,
        task_routes=wire.ROUTES,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_time_limit=int(settings.step_time_limit_s),
        timezone="UTC",
    )


def create_app(settings: Settings) -> Celery:
    """A Celery app for ``settings`` without tasks (for senders, inspection and Flower)."""
    app = Celery("megaflow", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def configure(settings: Settings) -> None:
    """Use ``settings`` for the module app (call before the app's configuration is first read)."""
    global _settings
    _settings = settings


def settings() -> Settings:
    """The settings of this process (from the environment unless ``configure`` set them)."""
    global _settings
    if _settings is None:
        _settings = Settings.load()
    return _settings


app = Celery("megaflow", set_as_current=False)
app.add_defaults(lambda: celery_config(settings()))
