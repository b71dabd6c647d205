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

from time import time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from megaflow.engine import delivery

# KEYS: unacked index (zset), unacked (hash); ARGV: delivery tag, time, [message, exchange, routing key] JSON
APPEND_LUA = "redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) return 1"
# KEYS: unacked index, unacked; ARGV: delivery tag
REMOVE_LUA = "redis.call('ZREM', KEYS[1], ARGV[1]) redis.call('HDEL', KEYS[2], ARGV[1]) return 1"


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation with one script call per delivery and per ack (not a pipeline)."""

    def _keys(self) -> tuple[str, str]:
        prefix = getattr(self.channel, "global_keyprefix", "") or ""  # EVAL's keys are not prefixed for us
        return prefix + self.unacked_index_key, prefix + self.unacked_key

    def _eval(self, script: str, keys: tuple[str, str], *args: Any) -> None:
        with self.channel.conn_or_acquire() as client:
            client.execute_command("EVAL", script, len(keys), *keys, *args)

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self._eval(APPEND_LUA, self._keys(), delivery_tag, time(), record)
        kombu_redis.virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if not delivery.settled(delivery_tag):  # else the step's advance script removed it already
            self._eval(REMOVE_LUA, self._keys(), delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if delivery.settled(delivery_tag):
            pass  # the step advanced: its message is acknowledged, there is nothing to requeue
        elif requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:
            self._eval(REMOVE_LUA, self._keys(), delivery_tag)
        kombu_redis.virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    """A Redis channel that reuses its synchronous client while its connection pool lives."""

    QoS = QoS
    _mf_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._mf_client
        if client is None or client.connection_pool is not pool:
            client = self._mf_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with MegaFlow's Channel (``broker_transport`` of every MegaFlow app)."""

    Channel = Channel


TRANSPORT = f"{__name__}:Transport"


def install() -> None:
    """Make ``redis://`` broker URLs use this transport in this process (``rediss://`` and
    ``redis+socket://`` keep kombu's). Done through kombu's alias table rather than Celery's
    ``broker_transport``, so the connection's URL keeps its ``redis`` scheme: Flower chooses its
    queue-length reader from that scheme."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES["redis"] = TRANSPORT
