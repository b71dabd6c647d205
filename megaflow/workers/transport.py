"""kombu's Redis transport with one redis-py client per channel instead of one per operation.

Stock kombu builds a new ``redis.Redis`` object (its own callback tables, then the shared
connection pool) for every ``QoS.append`` (a delivery with ``acks_late``), every ack and every
publish. With redis-py 8 that construction was the largest single CPU cost of a worker's
consumer: ~35% of the agent worker's GIL samples at 300 episodes in flight (py-spy). A
``redis.Redis`` object is thread-safe (each command borrows a connection from the pool), so the
channel keeps one for its synchronous work and makes a new one only when kombu replaced its pool
(after a lost connection). The asynchronous client (BRPOP, publish) is kombu's own, as before.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A Redis channel that reuses its synchronous client while its connection pool lives."""

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
