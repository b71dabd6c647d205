"""kombu's Redis transport, cheaper per task: one redis-py client per channel, one script per ack.

Stock kombu builds a new ``redis.Redis`` object (its own callback tables, then the shared
connection pool) for every ``QoS.append`` (a delivery with ``acks_late``), every ack and every
publish. With redis-py 8 that construction was the largest single CPU cost of a worker's
consumer: ~35% of the agent worker's GIL samples at 300 episodes in flight (py-spy). A
``redis.Redis`` object is thread-safe (each command borrows a connection from the pool), so the
channel keeps one for its synchronous work and makes a new one only when kombu replaced its pool
(after a lost connection). The asynchronous client (BRPOP, publish) is kombu's own, as before.

Then the unacked bookkeeping of ``acks_late``: kombu records every delivery (ZADD to the unacked
index, HSET of the message) and removes it on ack (ZREM, HDEL), each as a MULTI/EXEC pipeline;
redis-py's transaction pipeline made those two the next largest costs (~30-45% of an env or
model worker's GIL samples at 1,000 episodes, py-spy). Here each is one ``EVAL`` of a two-line
script: the same keys and values, as atomic as the transaction, and what kombu's restore
(``restore_visible``, ``restore_unacked``) reads is unchanged. And a step task's message is
usually acknowledged by its episode's advance script already (``megaflow.engine.delivery``): its
ack then skips Redis altogether.
"""

from __future__ import annotations

import binascii
import json
import logging
from base64 import b64decode
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu import serialization
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps

from megaflow.core import wire
from megaflow.engine import delivery

log = logging.getLogger(__name__)

# Tasks whose first Redis call reads their episode (megaflow.workers.tasks._guarded): their delivery's
# unacked record can wait for that read (megaflow.engine.delivery.defer_appends)
STEP_TASKS = frozenset({wire.AGENT_STEP, wire.MODEL_COMPLETE, wire.ENV_PROVISION, wire.ENV_EXEC, wire.ENV_EVALUATE})

# Broker list (under the global key prefix) that keeps the last UNDELIVERABLE_KEEP items dropped from a
# queue because they were not a message kombu can deliver (see ``Channel._decode_item``).
UNDELIVERABLE = "undeliverable"
UNDELIVERABLE_KEEP = 1000

# KEYS: unacked index (zset), unacked (hash); ARGV: delivery tag, time, [message, exchange, routing key] JSON
APPEND_LUA = "redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) return 1"
# KEYS: unacked index, unacked; ARGV: delivery tag
REMOVE_LUA = "redis.call('ZREM', KEYS[1], ARGV[1]) redis.call('HDEL', KEYS[2], ARGV[1]) return 1"


# kombu's JSON decoding (its object hook turns {"__type__", "__value__"} objects back into dates, UUIDs
# and the like) with one decoder for the process: kombu's ``loads`` passes the hook to ``json.loads``,
# which builds a new decoder and scanner for every call (~35% of each decode, twice per message)
_DECODER = json.JSONDecoder(object_hook=kombu_json.object_hook)


def loads(s: str | bytes | bytearray | memoryview) -> Any:
    """What ``kombu.utils.json.loads`` returns for ``s``, decoded by the shared decoder."""
    if isinstance(s, memoryview):
        s = s.tobytes()
    if isinstance(s, (bytes, bytearray)):
        s = s.decode("utf-8")
    return _DECODER.decode(s)


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation with one script call per delivery and per ack (not a pipeline)."""

    def _keys(self) -> tuple[str, str]:
        prefix = getattr(self.channel, "global_keyprefix", "") or ""  # EVAL's keys are not prefixed for us
        return prefix + self.unacked_index_key, prefix + self.unacked_key

    def _eval(self, script: str, keys: tuple[str, str], *args: Any) -> None:
        with self.channel.conn_or_acquire() as client:
            client.execute_command("EVAL", script, len(keys), *keys, *args)

    def append(self, message: Any, delivery_tag: str) -> None:
        info = message.delivery_info or {}
        text = self.channel.item_text(message._raw)
        if text is None:
            record = dumps([message._raw, info.get("exchange", ""), info.get("routing_key", "")])
        else:  # the queue item as read is the envelope's JSON: no need to encode it again
            record = f"[{text}, {dumps(info.get('exchange', ''))}, {dumps(info.get('routing_key', ''))}]"
        headers = message.headers or {}
        if delivery.defer_appends and headers.get("task") in STEP_TASKS and headers.get("eta") is None:
            delivery.hold(delivery_tag, record)  # the step's first read of its episode writes it
        else:
            self._eval(APPEND_LUA, self._keys(), delivery_tag, time(), record)
        kombu_redis.virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        held = delivery.drop_record(delivery_tag)  # never written: its step never read its episode
        settled = delivery.settled(delivery_tag)  # the step's advance removed it
        if held is None and not settled:
            self._eval(REMOVE_LUA, self._keys(), delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        held = delivery.drop_record(delivery_tag)
        if delivery.settled(delivery_tag):
            pass  # the step advanced: its message is acknowledged, there is nothing to requeue
        elif requeue and held is not None:
            self._restore_held(held, leftmost=True)
        elif requeue:
            super().restore_by_tag(delivery_tag, leftmost=True)
        elif held is None:
            self._eval(REMOVE_LUA, self._keys(), delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        held = delivery.drop_record(tag)
        if held is None:  # written (or never held): kombu's restore from the unacked hash
            super().restore_by_tag(tag, client, leftmost)
        else:
            self._restore_held(held, client=client, leftmost=leftmost)

    def _restore_held(self, record: str, client: Any = None, leftmost: bool = False) -> None:
        """Put a delivery whose record was never written back on its queue (as kombu's restore would)."""
        message, exchange, routing_key = loads(record)
        with self.channel.conn_or_acquire(client) as c, c.pipeline() as pipe:
            self.channel._do_restore_message(message, exchange, routing_key, pipe, leftmost)
            pipe.execute()


def envelope_problem(payload: Any) -> str | None:
    """Why a decoded queue item is not a message kombu's Redis transport can deliver, or None.

    kombu builds a message from the item without checking it: an item that is not a JSON object with
    a ``properties`` object holding a ``delivery_tag`` raises inside the worker's consumer loop, and
    Celery ends the worker ("Unrecoverable error"); so does a body it cannot decode. What Celery can
    judge from a well-formed envelope (the content type, an unknown task, wrong arguments) it judges
    itself: it rejects such a message and logs it.
    """
    if not isinstance(payload, dict):
        return "not a JSON object"
    props = payload.get("properties")
    if not isinstance(props, dict):
        return "no 'properties' object"
    if not isinstance(props.get("delivery_tag"), str) or not props["delivery_tag"]:
        return "no 'properties.delivery_tag' string"
    if not isinstance(props.get("delivery_info"), dict):
        return "no 'properties.delivery_info' object"
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        return "'body' is not a string"
    encoding = props.get("body_encoding")
    if encoding == "base64":
        try:
            b64decode(body or "", validate=True)
        except (binascii.Error, ValueError):
            return "'body' is not base64"
    elif encoding is not None:
        return f"unknown 'properties.body_encoding' {encoding!r}"
    if not isinstance(payload.get("headers") or {}, dict):
        return "'headers' is not an object"
    for name in ("content-type", "content-encoding"):
        if not isinstance(payload.get(name) or "", str):
            return f"'{name}' is not a string"
    return None


class Channel(kombu_redis.Channel):
    """A Redis channel that reuses its synchronous client while its connection pool lives, and drops
    queue items that are not messages instead of letting them end the worker."""

    QoS = QoS
    _mf_client: Any = None
    _mf_item: tuple[Any, str] | None = None  # the envelope being delivered and its queue item's text
    _mf_brpop: tuple[Any, dict] | None = None  # (connection, packed BRPOP by order of queues and timeout)

    def item_text(self, payload: Any) -> str | None:
        """The JSON text of the queue item ``payload`` was decoded from, while it is being delivered (kombu
        appends a delivery to the unacked hash within the read that decoded it)."""
        item = self._mf_item
        return item[1] if item is not None and item[0] is payload else None

    def _decode_item(self, queue: str, item: Any) -> dict | None:
        """The envelope of a queue item, or None when it is not one (logged and kept aside)."""
        problem: str | None
        self._mf_item = None
        try:
            text = bytes_to_str(item)
            payload = loads(text)
        except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem = f"not JSON ({exc})"
        else:
            problem = envelope_problem(payload)
            if problem is None:
                self._mf_item = (payload, text)
                return payload
        log.error(
            "dropped an item from queue %s that is not a broker message (%s): %.300r; the last %d such "
            "items are kept in the Redis list %s",
            queue,
            problem,
            item,
            UNDELIVERABLE_KEEP,
            self.global_keyprefix + UNDELIVERABLE,
        )
        try:
            with self.conn_or_acquire() as client:
                client.lpush(UNDELIVERABLE, item)  # kombu's client prefixes LPUSH's key itself, not LTRIM's
                client.ltrim(self.global_keyprefix + UNDELIVERABLE, 0, UNDELIVERABLE_KEEP - 1)
        except redis.RedisError as exc:
            log.warning("could not keep the dropped item aside: %s", exc)
        return None

    def _brpop_start(self, timeout: float | None = None) -> None:
        # kombu's _brpop_start (kombu 5.7.0), with the packed command kept per order of the queues: the
        # keys (every queue at every priority step, prefixed) are the same for each read but the cycle's
        # rotation, and kombu built and packed them anew for every message
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        connection = self.client.connection
        cache = self._mf_brpop
        if cache is None or cache[0] is not connection:  # a new connection may speak another protocol
            cache = self._mf_brpop = (connection, {})
        key = (*queues, timeout)
        packed = cache[1].get(key)
        if packed is None:
            keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
            args = ["BRPOP", *keys, timeout or 0]
            if self.global_keyprefix:
                args = self.client._prefix_args(args)
            if len(cache[1]) >= 64:  # queues added and cancelled over time: keep only recent orders
                cache[1].clear()
            packed = cache[1][key] = connection.pack_command(*args)
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu annotates it by its None default
        connection.send_packed_command(packed)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's _brpop_read (kombu 5.7.0), with the item checked before it is delivered
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._decode_item(dest, item)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._mf_item = None
            self._in_poll = None  # type: ignore[assignment]  # kombu's own reset (its annotation says bool)
            self._flush_brpop_reauth()

    def _get(self, queue: str, timeout: float | None = None) -> dict:
        # kombu's _get (basic_get, a consumer without the event loop), skipping items that are not messages
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                while item := client.rpop(self._q_for_pri(queue, pri)):
                    self._maybe_update_queues_expire(client, queue)
                    payload = self._decode_item(queue, item)
                    if payload is not None:
                        return payload
            self._maybe_update_queues_expire(client, queue)
            raise Empty()

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._mf_client
        if client is None or client.connection_pool is not pool:
            client = self._mf_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with MegaFlow's Channel (``broker_transport`` of every MegaFlow app).

    And without two failing system calls per turn of the worker's event loop: kombu hands each of
    its sockets to the hub again on every turn (``add_reader``: an ``epoll_ctl`` that fails with
    EEXIST, raised and caught), to be sure a socket that replaced another is polled. That is one
    turn per message under load, and each call lets go of the GIL in the consumer thread, which
    then waits among the task threads to take it back. Here a socket is handed to the hub when its
    descriptor is not among the hub's readers, or is now another socket object than the one handed
    over last (a reconnection); kombu's own registration of a new socket is unchanged.
    """

    Channel = Channel

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        before = set(loop.on_tick)
        super().register_with_event_loop(connection, loop)
        added = [f for f in loop.on_tick if f not in before and getattr(f, "__name__", "") == "on_poll_start"]
        if len(added) != 1:  # another kombu than the one this was written against: keep its own
            return
        loop.on_tick.discard(added[0])
        loop.on_tick.add(self._on_poll_start(loop))

    def _on_poll_start(self, loop: Any) -> Any:
        cycle: Any = self.cycle  # kombu creates it with the transport (annotated as None)
        on_readable = self.on_readable
        handed: dict[int, Any] = {}  # descriptor -> the socket it was last handed to the hub for

        def on_poll_start() -> None:
            cycle.on_poll_start()
            socks = {}
            for sock in cycle._chan_to_sock.values():
                try:
                    socks[sock.fileno()] = sock
                except (AttributeError, OSError):  # not a socket object: let the hub decide, as kombu does
                    pass
            for fd in cycle.fds:
                sock = socks.get(fd)
                if sock is not None and fd in loop.readers and handed.get(fd) is sock:
                    continue
                loop.add_reader(fd, on_readable, fd)
                handed[fd] = sock

        return on_poll_start


TRANSPORT = f"{__name__}:Transport"


def install() -> None:
    """Make ``redis://`` broker URLs use this transport in this process (``rediss://`` and
    ``redis+socket://`` keep kombu's). Done through kombu's alias table rather than Celery's
    ``broker_transport``, so the connection's URL keeps its ``redis`` scheme: Flower chooses its
    queue-length reader from that scheme."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES["redis"] = TRANSPORT
    # message bodies: the same decoding as kombu's json serializer, with the shared decoder
    serialization.register("json", kombu_json.dumps, loads, content_type="application/json", content_encoding="utf-8")
