"""MegaFlow's kombu transport keeps kombu's ``acks_late`` bookkeeping exactly, with one script per step.

A delivered, unacknowledged message is recorded in the unacked index and hash (under the broker's
global key prefix); an ack removes it; a message never acknowledged is restored to its queue by
kombu's own restore (at channel close and after the visibility timeout), as with stock kombu.
"""

from __future__ import annotations

import json
import time

from kombu import Connection

from megaflow.workers import transport

PREFIX = "mfx:celery:"


def connection(url: str, **options) -> Connection:
    transport.install()
    return Connection(url, transport_options={"global_keyprefix": PREFIX, **options})


def test_a_delivery_is_recorded_until_acked(redis_server, redis_client):
    with connection(redis_server.url) as conn:
        assert isinstance(conn.default_channel, transport.Channel)
        q = conn.SimpleQueue("tq-ack")
        q.put({"n": 1})
        msg = q.get(timeout=5)
        tag = msg.delivery_tag
        assert redis_client.zscore(PREFIX + "unacked_index", tag) is not None
        assert tag in redis_client.hkeys(PREFIX + "unacked")
        # kombu's record, [envelope, exchange, routing key], made from the queue item's own text
        envelope, exchange, routing_key = json.loads(redis_client.hget(PREFIX + "unacked", tag))
        assert envelope["properties"]["delivery_tag"] == tag and (exchange, routing_key) == ("tq-ack", "tq-ack")
        assert json.loads(msg.body) == {"n": 1}
        msg.ack()
        assert redis_client.zscore(PREFIX + "unacked_index", tag) is None
        assert tag not in redis_client.hkeys(PREFIX + "unacked")
        q.close()


def test_a_rejected_message_is_dropped_or_requeued(redis_server, redis_client):
    with connection(redis_server.url) as conn:
        q = conn.SimpleQueue("tq-reject")
        q.put({"n": 1})
        msg = q.get(timeout=5)
        msg.reject(requeue=True)
        again = q.get(timeout=5)
        assert again.payload == {"n": 1}
        again.reject()
        assert redis_client.hlen(PREFIX + "unacked") == 0
        assert redis_client.llen(PREFIX + "tq-reject") == 0
        q.close()


def test_an_unacked_message_comes_back_after_the_visibility_timeout(redis_server, redis_client):
    with connection(redis_server.url, visibility_timeout=1) as conn:
        q = conn.SimpleQueue("tq-lost")
        q.put({"n": 7})
        msg = q.get(timeout=5)
        assert msg.payload == {"n": 7}
        # the consumer "dies": its delivery is neither acked nor restored at close
        conn.default_channel.qos._delivered.clear()
        conn.default_channel.qos.restore_at_shutdown = False
    time.sleep(1.5)
    with connection(redis_server.url, visibility_timeout=1) as conn:
        conn.default_channel.qos.restore_visible(num=100, interval=1)
        q = conn.SimpleQueue("tq-lost")
        back = q.get(timeout=5)
        assert back.payload == {"n": 7}
        back.ack()
        assert redis_client.hlen(PREFIX + "unacked") == 0
        q.close()


def test_items_that_are_not_messages_are_dropped_and_kept_aside(redis_server, redis_client):
    """Bytes that are not a kombu envelope would end a worker inside kombu; they are skipped and kept."""
    import redis

    raw = redis.Redis.from_url(redis_server.url)
    junk = [b"\x00\xff not json", b"[1, 2]", b"{}", b'{"properties": {"delivery_tag": "t"}}', b'{"body": 5}']
    with connection(redis_server.url) as conn:
        q = conn.SimpleQueue("tq-junk")
        for read in (lambda: q.get(timeout=5), q.get_nowait):  # the consumer's BRPOP, then basic_get
            q.put({"n": 1})
            raw.rpush(PREFIX + "tq-junk", *junk)  # at the list's consuming end: read before the message
            msg = read()
            assert msg.payload == {"n": 1}
            msg.ack()
            assert raw.lrange(PREFIX + transport.UNDELIVERABLE, 0, len(junk) - 1) == junk
        assert raw.llen(PREFIX + transport.UNDELIVERABLE) == 2 * len(junk)
        assert redis_client.hlen(PREFIX + "unacked") == 0
        q.close()


def test_envelope_problem_names_what_is_missing():
    good = {"body": "e30=", "properties": {"delivery_tag": "t", "delivery_info": {}, "body_encoding": "base64"}}
    assert transport.envelope_problem(good) is None
    assert transport.envelope_problem([]) == "not a JSON object"
    assert "delivery_tag" in transport.envelope_problem({"properties": {}})
    assert "delivery_info" in transport.envelope_problem({"properties": {"delivery_tag": "t"}})
    assert "base64" in transport.envelope_problem({**good, "body": "@@"})
    bad_encoding = {**good, "properties": {**good["properties"], "body_encoding": "zip"}}
    assert "body_encoding" in transport.envelope_problem(bad_encoding)
    assert "headers" in transport.envelope_problem({**good, "headers": [1]})


def test_the_brpop_read_is_kombus_command_packed_once_per_order_of_the_queues(redis_server, redis_client):
    """The consumer's BRPOP names every queue at every priority step under the prefix, with kombu's
    timeout; it is packed once for each order the queue cycle gives and then reused."""
    from kombu import Exchange, Queue

    queues = [Queue(n, Exchange(n, type="direct"), routing_key=n) for n in ("tq-pa", "tq-pb")]
    with connection(redis_server.url) as conn:
        channel = conn.default_channel
        got: list[dict] = []
        with conn.Producer() as producer:
            for i in range(6):
                q = queues[i % 2]
                producer.publish({"n": i}, exchange=q.exchange, routing_key=q.routing_key, declare=[q], priority=i)
        with conn.Consumer(queues, callbacks=[lambda body, m: (got.append(body), m.ack())]):
            deadline = time.monotonic() + 10
            while len(got) < 6 and time.monotonic() < deadline:
                conn.drain_events(timeout=2)
        assert sorted(b["n"] for b in got) == list(range(6))
        connection_, packed = channel._mf_brpop
        assert 1 <= len(packed) <= 2  # the two orders of two queues at most
        for key, command in packed.items():
            *order, timeout = key
            keys = [PREFIX + q + (f"{channel.sep}{pri}" if pri else "") for pri in (0, 3, 6, 9) for q in order]
            assert command == connection_.pack_command("BRPOP", *keys, timeout)
            assert set(order) == {"tq-pa", "tq-pb"} and timeout == channel.brpop_timeout
        # the same order sends the very same packed command again
        before = {k: id(v) for k, v in packed.items()}
        with conn.Producer() as producer:
            producer.publish({"n": 6}, exchange=queues[0].exchange, routing_key="tq-pa")
        with conn.Consumer(queues, callbacks=[lambda body, m: (got.append(body), m.ack())]):
            conn.drain_events(timeout=5)
        assert got[-1] == {"n": 6}
        assert all(id(channel._mf_brpop[1][k]) == v for k, v in before.items() if k in channel._mf_brpop[1])
    assert redis_client.hlen(PREFIX + "unacked") == 0


def test_message_bodies_decode_as_with_kombus_json():
    """The shared decoder gives what kombu's own json loads gives, its type hook included."""
    import datetime
    import uuid

    from kombu.serialization import dumps, loads
    from kombu.utils import json as kombu_json

    transport.install()
    value = {"when": datetime.datetime(2026, 12, 5, 10, 0), "id": uuid.UUID(int=7), "n": [1, 2.5, None, "x"]}
    _ctype, _enc, body = dumps(value, serializer="json")
    assert loads(body, "application/json", "utf-8") == kombu_json.loads(body) == value
    for raw in (body.encode(), bytearray(body.encode()), memoryview(body.encode())):
        assert transport.loads(raw) == value


def test_the_event_loop_hands_a_socket_to_the_hub_once_and_the_new_one_after_a_reconnection(redis_server, redis_client):
    """kombu hands its sockets to the hub on every turn of the worker's event loop (a failing
    ``epoll_ctl`` each); this transport hands a socket over once, and again when a reconnection
    replaced it, and messages keep coming in both cases."""
    from kombu import Exchange, Queue
    from kombu.asynchronous import Hub

    q = Queue("tq-hub", Exchange("tq-hub", type="direct"), routing_key="tq-hub")
    got: list[int] = []
    handed: list[int] = []
    hub = Hub()
    add_reader = hub.add_reader
    hub.add_reader = lambda fd, *args: (handed.append(fd), add_reader(fd, *args))[1]  # type: ignore[method-assign]

    def publish(*ns: int) -> None:
        with connection(redis_server.url) as pub, pub.Producer() as producer:
            for n in ns:
                producer.publish({"n": n}, exchange=q.exchange, routing_key=q.routing_key, declare=[q])

    def turn_until(count: int) -> int:
        turns, deadline = 0, time.monotonic() + 15
        while len(got) < count and time.monotonic() < deadline:
            hub.run_once()
            turns += 1
        assert len(got) == count, f"{len(got)} of {count} messages after {turns} turns"
        return turns

    try:
        with connection(redis_server.url) as conn:
            conn.transport.register_with_event_loop(conn.connection, hub)
            with conn.Consumer([q], callbacks=[lambda body, m: (got.append(body["n"]), m.ack())]):
                publish(*range(5))
                turns = turn_until(5)
                assert turns >= 5 and len(handed) == 1, (turns, handed)  # kombu's own: once per turn
                channel = conn.default_channel
                first = channel.client.connection._sock
                channel.client.connection.disconnect()  # as a failed BRPOP read does
                publish(5, 6)
                turn_until(7)
                assert channel.client.connection._sock is not first
                assert len(handed) == 2 and handed[1] == channel.client.connection._sock.fileno()
                assert sorted(got) == list(range(7))
    finally:
        hub.close()
    assert redis_client.hlen(PREFIX + "unacked") == 0
