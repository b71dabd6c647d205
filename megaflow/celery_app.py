"""Celery app factory: JSON only, one queue per service, routing by task name.

No app exists at import time: entry points call ``create_app(settings)``, which binds the broker
and registers the tasks of ``megaflow.tasks`` on that app.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from megaflow.settings import Settings

MODEL_QUEUE = "model"
AGENT_QUEUE = "agent"
ENV_QUEUE = "env"


def env_host_queue(host: str) -> str:
    """The queue of operations on containers living on ``host``."""
    return f"{ENV_QUEUE}.{host}"


def queue(name: str) -> Queue:
    """A queue on its own direct exchange, so no two queues share a binding."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


ROUTES = {
    "megaflow.model.*": {"queue": MODEL_QUEUE},
    "megaflow.agent.*": {"queue": AGENT_QUEUE},
    "megaflow.env.*": {"queue": ENV_QUEUE},  # per-host operations pass queue=env.<host> explicitly
}


def create_app(settings: Settings, *, register_tasks: bool = True) -> Celery:
    """A Celery app bound to ``settings.redis_url`` with MegaFlow's queues and tasks."""
    app = Celery("megaflow", set_as_current=False)
    app.conf.update(
        broker_url=settings.redis_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "global_keyprefix": f"{settings.key_prefix}:celery:",
            # scan for messages of dead workers every 10 s (they are redelivered once older than
            # the visibility timeout), not every 100 s as kombu's default throttle would
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
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
        worker_prefetch_multiplier=1,
        task_send_sent_event=False,  # one Redis publish less per hop; workers still send task events
        worker_send_task_events=True,
        task_default_queue=AGENT_QUEUE,
        task_default_exchange=AGENT_QUEUE,
        task_default_routing_key=AGENT_QUEUE,
        task_queues=[queue(MODEL_QUEUE), queue(AGENT_QUEUE), queue(ENV_QUEUE)],
        task_create_missing_queues=True,
        task_routes=ROUTES,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_time_limit=int(settings.step_time_limit_s),
        timezone="UTC",
    )
    app.megaflow_settings = settings  # type: ignore[attr-defined]
    if register_tasks:
        from megaflow.tasks import register

        register(app)
    return app
