"""Celery app factory: JSON only, one queue per service, routing by task name.

No app exists at import time: entry points call ``create_app(settings)``, which binds the broker
and registers the tasks of ``megaflow.workers.tasks`` on that app.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from megaflow.core.settings import Settings

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
        worker_send_task_events=settings.task_events,
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
        from megaflow.workers.tasks import register

        register(app)
    return app


def broker_queue_key(settings: Settings, queue: str) -> str:
    """The Redis list a queue's messages (priority 0) live in, under the broker's key prefix."""
    return f"{settings.key_prefix}:celery:{queue}"


def encode_task_message(app: Celery, settings: Settings, name: str, args: list, queue: str,
                        argsrepr: str | None = None) -> tuple[str, str]:
    """(list key, message) that ``app.send_task(name, args, queue=queue)`` would LPUSH on the Redis broker.

    The engine pushes this message inside its compare-and-set script, so an episode's advance and
    the enqueueing of its next task are one atomic step (and one round trip). The message is
    kombu's Redis wire format (JSON envelope, base64 JSON body, Celery protocol 2 headers).
    """
    import base64
    import json
    import uuid

    task_id = str(uuid.uuid4())
    msg = app.amqp.as_task_v2(task_id, name, args=args, kwargs={}, argsrepr=argsrepr, origin=_origin())
    body = base64.b64encode(json.dumps(msg.body).encode()).decode()
    properties = dict(msg.properties, delivery_mode=2, priority=0, body_encoding="base64",
                      delivery_info={"exchange": "", "routing_key": queue}, delivery_tag=str(uuid.uuid4()))
    envelope = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                "headers": msg.headers, "properties": properties}
    return broker_queue_key(settings, queue), json.dumps(envelope)


def _origin() -> str:
    import os
    import socket

    return f"{os.getpid()}@{socket.gethostname()}"
