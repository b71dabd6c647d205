"""The episode gateway's ``stream: true`` answers (read by the real ``openai`` client over TCP and a Unix
socket) and its cap on calls waiting at once (429 with Retry-After)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from megaflow import Client
from megaflow.sandbox.gateway_http import GatewayHTTPServer, UnixGatewayServer
from megaflow.services.episode_gateway import EpisodeGateway, call_limit
from megaflow.services.root import Root

TOOL_REPLY = {
    "content": "",
    "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "ls -la /work"}'}},
        {"id": "c2", "type": "function", "function": {"name": "submit", "arguments": "{}"}},
    ],
}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("bash", "submit")]
TEXT = 'line one of the answer\nline two, with ünïcode and "quotes" and data: [DONE] inside'


def _episode(client: Client, replies: list) -> str:
    spec = {"task_id": "gw", "workdir": "/work", "eval": {"command": "true"}, "model": {"replies": replies}}
    sub = client.submit([spec], user="gw-stream")
    (res,) = client.results(sub.batch_id)
    return res["episode_id"]


@contextmanager
def model_worker(settings) -> Iterator:
    """A consumer of the model queue in a thread (the LocalRunner: the model service's code, Celery left out)."""
    from megaflow.services.local import LocalRunner

    stop = threading.Event()
    runner = LocalRunner(Root(settings, role="model"), {})

    def loop() -> None:
        while not stop.is_set():
            runner.run_one(0.2)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield runner
    finally:
        stop.set()
        t.join(timeout=30)


def test_a_streamed_answer_is_the_non_streamed_one_and_is_recorded_once(settings, tmp_path):
    openai = pytest.importorskip("openai")
    import httpx

    root = Root(settings, role="client")
    gw = EpisodeGateway(root)
    tcp = GatewayHTTPServer(gw).start()
    unix = UnixGatewayServer(EpisodeGateway(root), str(tmp_path / "gw.sock")).start()
    try:
        with model_worker(settings) as runner, Client(settings) as client:
            eid = _episode(client, [TEXT, TEXT, TOOL_REPLY, TOOL_REPLY, TEXT])
            key = gw.issue_key(eid)
            plain = openai.OpenAI(base_url=tcp.url, api_key=key, max_retries=0)
            over_socket = httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "gw.sock")))
            streaming = openai.OpenAI(base_url="http://gateway/v1", api_key=key, max_retries=0, http_client=over_socket)
            ask = [{"role": "user", "content": "hi"}]

            whole = plain.chat.completions.create(model="m", messages=ask)  # call 1
            chunks = list(
                streaming.chat.completions.create(
                    model="m", messages=ask, stream=True, stream_options={"include_usage": True}
                )
            )  # call 2
            assert whole.choices[0].message.content == TEXT
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
            assert chunks[0].choices[0].delta.role == "assistant"
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
            assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # the usage chunk comes last

            whole_tools = plain.chat.completions.create(model="m", messages=ask, tools=TOOLS)  # call 3
            with streaming.chat.completions.stream(model="m", messages=ask, tools=TOOLS) as events:  # call 4
                final = events.get_final_completion()  # the SDK's own reassembly of the deltas

            def calls(message) -> list:
                return [(c.id, c.type, c.function.name, c.function.arguments) for c in message.tool_calls]

            assert calls(final.choices[0].message) == calls(whole_tools.choices[0].message)
            assert len(calls(final.choices[0].message)) == 2
            assert final.choices[0].finish_reason == whole_tools.choices[0].finish_reason == "tool_calls"

            # without include_usage no chunk carries usage (call 5)
            plain_stream = list(plain.chat.completions.create(model="m", messages=ask, stream=True))
            assert all(c.usage is None for c in plain_stream) and all(c.choices for c in plain_stream)

            log = gw.drain(eid)  # what the env host's watch moves into the trajectory
            assert [r["call"] for r in log] == [1, 2, 3, 4, 5]  # one record per call, streamed or not
            assert [r["request"].get("stream", False) for r in log] == [False, True, False, True, True]
            assert log[1]["reply"]["content"] == TEXT and log[3]["reply"]["tool_calls"][1]["id"] == "c2"
            assert runner.handled.get("megaflow.model.gateway_call") == 5  # one model-service call per request

            for bad, field in (({"stream": "yes"}, "'stream'"), ({"stream_options": {"include_usage": True}}, "only")):
                with pytest.raises(openai.BadRequestError, match=field):
                    plain.chat.completions.create(model="m", messages=ask, extra_body=bad)
            assert gw.records(eid) == []  # refused requests make no call and leave no record
    finally:
        tcp.stop()
        unix.stop()
        root.close()


def _post(url: str, key: str) -> http.client.HTTPResponse:
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "q"}]})
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"})
    return conn.getresponse()


def test_calls_beyond_the_cap_get_429_with_retry_after_until_a_slot_frees(settings):
    openai = pytest.importorskip("openai")
    assert call_limit(settings) == 4 * settings.host_capacity  # the default follows the host's size
    assert call_limit(settings.model_copy(update={"gateway_max_calls": 3})) == 3

    root = Root(settings, role="client")
    gw = EpisodeGateway(root)
    server = GatewayHTTPServer(gw, max_calls=1).start()
    try:
        with Client(settings) as client:
            eid = _episode(client, ["first", "second"])
        key = gw.issue_key(eid)
        first: dict = {}

        def waiting_call() -> None:  # no model worker yet: this call waits on the model queue, holding the slot
            resp = _post(server.url, key)
            first.update(status=resp.status, body=json.loads(resp.read()))

        t = threading.Thread(target=waiting_call, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while server.slots.busy < 1:
            assert time.monotonic() < deadline, "the first call never took its slot"
            time.sleep(0.05)

        refused = _post(server.url, key)
        assert refused.status == 429 and refused.getheader("Retry-After") == "1"
        assert "limit of 1 calls" in json.loads(refused.read())["error"]["message"]
        oa = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
        assert server.slots.refused == 2 and gw.records(eid) == []  # refused calls never reached the model

        with model_worker(settings):  # the worker answers the waiting call; its slot frees
            t.join(timeout=120)
            assert first["status"] == 200, first
            assert first["body"]["choices"][0]["message"]["content"] == "first"
            assert server.slots.busy == 0
            retry = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)
            second = retry.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
            assert second.choices[0].message.content == "second"
        assert [r["call"] for r in gw.drain(eid)] == [1, 2]
    finally:
        server.stop()
        root.close()


def test_litellm_streaming_reassembles_the_reply(settings, monkeypatch):
    """litellm (mini-swe-agent's and OpenHands' client) with stream=True: text and tool calls come back whole."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list at import
    litellm = pytest.importorskip("litellm")

    root = Root(settings, role="client")
    gw = EpisodeGateway(root, in_process=True)  # the backend in the gateway's process: no model worker needed
    server = GatewayHTTPServer(gw).start()
    try:
        with Client(settings) as client:
            eid = _episode(client, [TEXT, TOOL_REPLY])
        key = gw.issue_key(eid)
        ask = [{"role": "user", "content": "hi"}]
        chunks = list(litellm.completion(model="openai/m", api_base=server.url, api_key=key, messages=ask, stream=True))
        assert litellm.stream_chunk_builder(chunks).choices[0].message.content == TEXT
        chunks = list(
            litellm.completion(
                model="openai/m", api_base=server.url, api_key=key, messages=ask, stream=True, tools=TOOLS
            )
        )
        whole = litellm.stream_chunk_builder(chunks).choices[0]
        assert whole.finish_reason == "tool_calls"
        assert [(c.id, c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
            ("c1", "bash", '{"cmd": "ls -la /work"}'),
            ("c2", "submit", "{}"),
        ]
        assert [r["call"] for r in gw.drain(eid)] == [1, 2]
    finally:
        server.stop()
        root.close()


# A program in a no-network container asks for a stream through the loopback relay (standard library only):
# it joins the content deltas, checks that the usage chunk and [DONE] close the stream, and writes what it got.
STREAM_THROUGH_RELAY = r"""
import json, os, urllib.request
body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True,
        "stream_options": {"include_usage": True}}
req = urllib.request.Request(
    os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=json.dumps(body).encode(),
    headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"], "Content-Type": "application/json"},
)
resp = urllib.request.urlopen(req, timeout=60)
kind = resp.headers["Content-Type"]
events = [line[6:] for line in resp.read().decode().split("\n") if line.startswith("data: ")]
chunks = [json.loads(e) for e in events[:-1]]
text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
closed = events[-1] == "[DONE]" and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
open("answer.txt", "w").write(text + "\n" + kind.split(";")[0] + "\n" + str(closed) + "\n")
"""


@pytest.mark.skipif(
    "wait" not in __import__("megaflow.agents.base").agents.base.NEXT_KINDS,
    reason="the agent service offers no 'wait' decision",
)
def test_a_program_in_a_no_network_container_gets_a_stream_through_the_relay(fleet):
    from megaflow.agents import validate_agent_section
    from megaflow.core import states

    section = {
        "type": "megaflow.agents.installed:InstalledAgent",
        "config": {"gateway": True, "poll_s": 0.5, "command": "python3 {workdir}/call.py"},
    }
    spec = {
        "task_id": "gw-stream-relay",
        "workdir": "/work",
        "files": {"/work/call.py": STREAM_THROUGH_RELAY},
        "agent": validate_agent_section(section),
        "eval": {"command": "printf 'streamed through the relay\\ntext/event-stream\\nTrue\\n' | cmp - answer.txt"},
        "model": {"replies": ["streamed through the relay"]},
    }
    with Client(fleet) as client:
        sub = client.submit([spec], user="gw-stream-relay")
        client.wait(sub.batch_id, timeout=120)
        (res,) = client.results(sub.batch_id)
        traj = client.trajectory(res["episode_id"])
    assert (res["state"], res["reward"]) == (states.SUCCEEDED, 1.0), (res, traj["messages"][-3:])
    calls = [m for m in traj["messages"] if m.get("kind") == "model_call"]
    assert len(calls) == 1 and calls[0]["request"]["stream"] is True  # recorded once, as the program sent it
    assert calls[0]["reply"]["content"] == "streamed through the relay"


def test_a_stream_whose_call_waits_is_kept_alive_then_answered(settings):
    """A stream call that waits longer than the heartbeat opens at once (chunked) with keep-alive comments,
    so a client with a short idle-read time-out keeps waiting; the answer follows on the same stream."""
    openai = pytest.importorskip("openai")

    root = Root(settings, role="client")
    gw = EpisodeGateway(root, heartbeat_s=0.3)
    server = GatewayHTTPServer(gw).start()
    try:
        with Client(settings) as client:
            eid = _episode(client, [TEXT, TEXT])
        key = gw.issue_key(eid)
        host, port = server.server_address[:2]
        beats = threading.Event()
        raw: dict = {"lines": []}
        sdk: dict = {}

        def raw_client() -> None:  # reads the stream line by line as it comes
            conn = http.client.HTTPConnection(host, port, timeout=120)
            body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True}
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()  # the headers come with the first keep-alive, before any answer
            raw.update(status=resp.status, encoding=resp.getheader("Transfer-Encoding"))
            while line := resp.readline():
                raw["lines"].append(line.decode().rstrip("\n"))
                if sum(x == ": keep-alive" for x in raw["lines"]) >= 25:
                    beats.set()
            conn.close()

        def sdk_client() -> None:  # gives up if nothing arrives for 5 s
            # the SDK's own Timeout type: newer openai releases are built on httpx2 and refuse httpx's
            timeout = openai.Timeout(60, read=5.0)
            oa = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=timeout)
            stream = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], stream=True)
            sdk["text"] = "".join(c.choices[0].delta.content or "" for c in stream)

        threads = [threading.Thread(target=f, daemon=True) for f in (sdk_client, raw_client)]
        for t in threads:
            t.start()
        assert beats.wait(120), raw  # >= 7.5 s of waiting, past the SDK's 5 s idle-read limit
        assert (raw["status"], raw["encoding"]) == (200, "chunked") and gw.records(eid) == []
        with model_worker(settings):
            for t in threads:
                t.join(timeout=120)
        assert sdk.get("text") == TEXT
        events = [x[6:] for x in raw["lines"] if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == TEXT
        assert [r["request"]["stream"] for r in gw.drain(eid)] == [True, True]  # each call recorded once
    finally:
        server.stop()
        root.close()


def test_a_failure_after_the_stream_opened_is_an_error_event(settings):
    """The episode ends while its streamed call waits: the model worker refuses the call and the open
    stream carries an ``error`` event, which the openai client raises as an APIError."""
    openai = pytest.importorskip("openai")

    root = Root(settings, role="client")
    gw = EpisodeGateway(root, heartbeat_s=0.3)
    server = GatewayHTTPServer(gw).start()
    try:
        with Client(settings) as client:
            eid = _episode(client, [TEXT, TEXT])
        key = gw.issue_key(eid)
        host, port = server.server_address[:2]
        opened = threading.Event()
        lines: list[str] = []
        sdk: dict = {}

        def raw_client() -> None:
            conn = http.client.HTTPConnection(host, port, timeout=120)
            body = {"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": True}
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            while line := resp.readline():
                lines.append(line.decode().rstrip("\n"))
                if lines.count(": keep-alive") >= 3:
                    opened.set()
            conn.close()

        def sdk_client() -> None:
            oa = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0)
            try:
                list(oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}], stream=True))
            except openai.APIError as exc:
                sdk["error"] = exc

        threads = [threading.Thread(target=f, daemon=True) for f in (sdk_client, raw_client)]
        for t in threads:
            t.start()
        assert opened.wait(120), lines
        root.redis.hset(root.keys.episode(eid), "state", "CANCELLED")
        with model_worker(settings):
            for t in threads:
                t.join(timeout=120)
        (event,) = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]  # no chunks, no [DONE]
        assert event["error"]["type"] == "authentication_error" and "finished" in event["error"]["message"]
        assert "finished" in str(sdk.get("error")), sdk
        assert gw.records(eid) == []  # a refused call leaves no record
    finally:
        server.stop()
        root.close()


def test_an_idle_kept_alive_connection_is_closed_and_its_thread_ends(settings):
    root = Root(settings, role="client")
    server = GatewayHTTPServer(EpisodeGateway(root), idle_timeout_s=0.5).start()
    try:
        before = threading.active_count()
        host, port = server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["data"][0]["id"] == "megaflow"
        assert not resp.will_close and threading.active_count() >= before + 1  # kept alive
        assert conn.sock.recv(1) == b""  # the server hangs up once the connection idles past 0.5 s
        conn.close()
        deadline = time.monotonic() + 60
        while threading.active_count() > before:
            assert time.monotonic() < deadline, "the connection's thread never ended"
            time.sleep(0.05)
    finally:
        server.stop()
        root.close()


def test_reasoning_and_a_null_content_come_back_as_without_streaming(settings):
    """A reply like vLLM's with a reasoning parser and tools: reasoning_content, content null, tool calls."""
    openai = pytest.importorskip("openai")

    reply = {"content": None, "reasoning_content": "first think, then list", **{"tool_calls": TOOL_REPLY["tool_calls"]}}
    root = Root(settings, role="client")
    gw = EpisodeGateway(root, in_process=True)
    server = GatewayHTTPServer(gw).start()
    try:
        with Client(settings) as client:
            eid = _episode(client, [reply, reply])
        oa = openai.OpenAI(base_url=server.url, api_key=gw.issue_key(eid), max_retries=0)
        ask = [{"role": "user", "content": "hi"}]
        whole = oa.chat.completions.create(model="m", messages=ask, tools=TOOLS).choices[0].message
        with oa.chat.completions.stream(model="m", messages=ask, tools=TOOLS) as events:
            streamed = events.get_final_completion().choices[0].message
        assert whole.content is None and streamed.content is None
        assert getattr(streamed, "reasoning_content", None) == whole.reasoning_content == "first think, then list"
        assert [c.function.arguments for c in streamed.tool_calls] == [c.function.arguments for c in whole.tool_calls]
    finally:
        server.stop()
        root.close()


def test_junk_requests_get_a_4xx_and_the_gateway_keeps_serving(settings):
    """Bodies that are not JSON or not objects, bad or negative lengths, unknown routes and keys: each
    gets a 4xx in the OpenAI error shape within a second, and the gateway answers /v1/models after."""
    root = Root(settings, role="client")
    server = GatewayHTTPServer(EpisodeGateway(root)).start()
    host, port = server.server_address[:2]

    def send(path: str, body: bytes, length: str | None = None, auth: str = "Bearer nope"):
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.putrequest("POST", path)
            conn.putheader("Content-Length", length if length is not None else str(len(body)))
            conn.putheader("Authorization", auth)
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    try:
        chat = "/v1/chat/completions"
        cases = [
            (chat, b"not json", None, "Bearer nope"),
            (chat, b"[1, 2]", None, "Bearer nope"),
            (chat, b"\xff\xfe", None, "Bearer nope"),
            (chat, b"", "-3", "Bearer nope"),
            (chat, b"", "lots", "Bearer nope"),
            (chat, b'{"messages": "x"}', None, "Bearer nope"),
            (chat, b'{"messages": []}', None, ""),
            ("/v1/other", b"{}", None, "Bearer nope"),
        ]
        for path, body, length, auth in cases:
            status, reply = send(path, body, length, auth)
            assert 400 <= status < 500, (path, body, length, auth, status, reply)
            assert reply["error"]["message"], reply
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        server.stop()
        root.close()
