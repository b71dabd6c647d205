"""The wire contract: queue names, task names, routing, Flower's argument strings, broker messages.

Every process agrees on these names; nothing here imports Celery. ``encode_message`` writes the
message ``Celery.send_task`` would put on the Redis broker, in compact form (kombu's Redis wire
format: a JSON envelope around a JSON body with Celery protocol-2 headers), so the engine can
enqueue the next task inside its compare-and-set script and a sender needs no Celery app at all.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

# --- queues --------------------------------------------------------------------------------------
MODEL_QUEUE = "model"
AGENT_QUEUE = "agent"
ENV_QUEUE = "env"  # host-agnostic env work (image prefetch); container work goes to env.<host>
QUEUES = (MODEL_QUEUE, AGENT_QUEUE, ENV_QUEUE)


def env_host_queue(host: str) -> str:
    """The queue of operations on containers living on ``host``."""
    return f"{ENV_QUEUE}.{host}"


def host_of_queue(queue: str) -> str | None:
    """The env host a queue belongs to (``env.h1`` -> ``h1``), else None."""
    return queue.split(".", 1)[1] if queue.startswith(ENV_QUEUE + ".") else None


def node_name(role: str, host: str) -> str:
    """The Celery node name of a role's worker on ``host`` (unique per fleet), e.g. env@env-1; its
    health report is ``Keys.worker_health(role, node_name(role, host))``."""
    return f"{role}@{host}"


# --- task names ----------------------------------------------------------------------------------
AGENT_STEP = "megaflow.agent.step"
MODEL_COMPLETE = "megaflow.model.complete"
MODEL_GATEWAY_CALL = "megaflow.model.gateway_call"  # one call of an installed agent's gateway: (episode id, call id)
ENV_PROVISION = "megaflow.env.provision"
ENV_EXEC = "megaflow.env.exec"
ENV_EVALUATE = "megaflow.env.evaluate"
ENV_CLOSE = "megaflow.env.close"
ENV_PREFETCH = "megaflow.env.prefetch"
ENV_SANDBOX_OP = "megaflow.env.sandbox_op"  # one sandbox-API operation, sent to env.<host>: (sandbox id, op id)
ENV_WATCH = "megaflow.env.watch"  # poll an installed agent's end (re-sent with a countdown while it runs)
TASK_NAMES = (
    AGENT_STEP,
    MODEL_COMPLETE,
    MODEL_GATEWAY_CALL,
    ENV_PROVISION,
    ENV_EXEC,
    ENV_EVALUATE,
    ENV_CLOSE,
    ENV_PREFETCH,
    ENV_SANDBOX_OP,
    ENV_WATCH,
)

# Celery routes by task name; per-host operations pass queue=env.<host> explicitly.
ROUTES = {
    "megaflow.model.*": {"queue": MODEL_QUEUE},
    "megaflow.agent.*": {"queue": AGENT_QUEUE},
    "megaflow.env.*": {"queue": ENV_QUEUE},
}


def broker_prefix(key_prefix: str) -> str:
    """The prefix of every broker key (kombu's ``global_keyprefix``)."""
    return f"{key_prefix}:celery:"


def broker_queue_key(key_prefix: str, queue: str, priority: int = 0) -> str:
    """The Redis list a queue's messages of ``priority`` live in (kombu's layout: priority 0 in the plain
    list, step N in ``<queue>\\x06\\x16N``; a worker BRPOPs step 0 first, so 0 is the most urgent)."""
    step = priority_step(priority)
    return broker_prefix(key_prefix) + queue + (f"{PRIORITY_SEP}{step}" if step else "")


# --- priorities (kombu's Redis transport) ----------------------------------------------------------
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's default priority_steps: the lists every worker consumes
PRIORITY_SEP = "\x06\x16"


def priority_step(priority: int) -> int:
    """The step kombu files ``priority`` under (the largest step not above it, clamped to 0..9)."""
    p = max(0, min(9, int(priority)))
    return max(s for s in PRIORITY_STEPS if s <= p)


def trajectory_priority(completed_calls: int) -> int:
    """Trajectory-level priority (Heddle): the more model calls an episode has done, the more urgent
    its next one (9 for the first call, 6, 3, then 0 from the fourth on)."""
    return max(0, 9 - 3 * max(0, int(completed_calls)))


# --- Flower --------------------------------------------------------------------------------------
_ARGS_MAX = 160


def task_argsrepr(name: str, args: list[Any], queue: str) -> str:
    """Short, readable arguments of a MegaFlow task for Flower: ``ep=<id> step=<k> host=<host>``."""
    host = host_of_queue(queue)
    try:
        if len(args) == 2 and isinstance(args[0], str):
            eid, second = args
            if isinstance(second, dict):  # megaflow.env.close: (episode id, env handle)
                parts = [f"ep={eid}"]
                host = second.get("host") or host
                sid = second.get("id") or second.get("container_id")
                if sid:
                    parts.append(f"env={str(sid)[:12]}")
            else:
                parts = [f"ep={eid}", f"step={second}"]
            if host:
                parts.append(f"host={host}")
            return " ".join(parts)[:_ARGS_MAX]
    except Exception:  # never let a display string break a send
        pass
    return repr(args)[:_ARGS_MAX]


# --- broker messages -----------------------------------------------------------------------------
_HOSTNAME = socket.gethostname()


def dumps(obj: Any) -> str:
    """Compact JSON (no spaces after separators): what MegaFlow writes to Redis and the broker."""
    return json.dumps(obj, separators=(",", ":"))


def encode_message(key_prefix: str, name: str, args: list[Any], queue: str, priority: int = 0) -> tuple[str, str]:
    """(broker list key, message) that ``send_task(name, args, queue=queue, priority=priority)`` would LPUSH.

    The body and headers are Celery's task protocol 2 in JSON; the envelope is kombu's Redis
    transport format. JSON only: no binary serializer is ever on the wire. Headers at Celery's
    default (``eta``, ``expires``, ``group``, ``shadow``, ``timelimit``, ``stamps``, ...: None or
    empty) are left out and the body is plain JSON, not base64: a worker reads the same request,
    and a message waiting in a queue or in kombu's unacked hash takes ~30% less Redis memory.
    """
    task_id = str(uuid.uuid4())
    body = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    headers: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "retries": 0,
        "root_id": task_id,
        "argsrepr": task_argsrepr(name, args, queue),
        "kwargsrepr": "{}",
        "origin": f"{os.getpid()}@{_HOSTNAME}",
        "ignore_result": True,  # as task_ignore_result: no result backend
    }
    properties = {
        "correlation_id": task_id,
        "reply_to": "",
        "delivery_mode": 2,
        "priority": priority_step(priority),
        "delivery_info": {"exchange": "", "routing_key": queue},
        "delivery_tag": str(uuid.uuid4()),
    }
    envelope = {
        "body": dumps(body),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }
    return broker_queue_key(key_prefix, queue, priority), dumps(envelope)


def decode_message(message: str) -> tuple[str, list[Any]]:
    """(task name, args) of a broker message written by ``encode_message`` or Celery (JSON only)."""
    envelope = json.loads(message)
    if envelope.get("content-type") != "application/json":
        raise ValueError(f"refusing a non-JSON broker message ({envelope.get('content-type')})")
    raw = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        raw = base64.b64decode(raw).decode()
    args, _kwargs, _embed = json.loads(raw)
    return envelope["headers"]["task"], list(args)
