"""The sandbox API on a real fleet (Docker env hosts, Celery workers): SWE-ReX-shaped calls, limits, tokens.

SWE-ReX's own ``RemoteRuntime`` (from PyPI) drives a MegaFlow sandbox through ``megaflow sandbox``'s
HTTP server: the best proof that frameworks written for SWE-ReX run unchanged.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest

from megaflow.sandbox import HttpTransport, MegaflowDeployment, Sandbox, SandboxHTTPServer
from megaflow.sandbox import errors as E
from megaflow.sandbox import models as M
from megaflow.services.root import Root
from megaflow.services.sandbox_api import SandboxService
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def service(fleet):
    root = Root(fleet, role="client")
    yield SandboxService(root)
    root.close()


@pytest.fixture
def server(service):
    srv = SandboxHTTPServer(service).start()
    yield srv
    srv.stop()


def user() -> str:
    return f"sbx-{uuid.uuid4().hex[:8]}"


def test_sessions_files_and_close_free_the_slot(service, tmp_path):
    u = user()
    with Sandbox.open(service, user=u, workdir="/work") as sb:
        res = service.root.resources
        assert res.placement(sb.id)["user"] == u
        sb.create_session(M.CreateBashSessionRequest(session="main"))
        sb.run_in_session(M.BashAction(command="mkdir -p /tmp/w && cd /tmp/w && export FOO=bar", session="main"))
        obs = sb.run_in_session(M.BashAction(command="pwd; echo $FOO", session="main"))
        assert obs.output.split() == ["/tmp/w", "bar"] and obs.exit_code == 0
        with pytest.raises(E.NonZeroExitCodeError):
            sb.run_in_session(M.BashAction(command="false", session="main"))
        assert sb.run_in_session(M.BashAction(command="exit 3", session="main", check="silent")).exit_code == 3
        out = sb.execute(M.Command(command=["sh", "-c", "echo $0-$PWD", "x"], cwd="/tmp"))
        assert (out.stdout.strip(), out.exit_code) == ("x-/tmp", 0)
        sb.write_file(M.WriteFileRequest(path="notes/a.txt", content="héllo\n"))
        assert sb.read_file(M.ReadFileRequest(path="/work/notes/a.txt")).content == "héllo\n"
        (tmp_path / "pkg").mkdir()
        (tmp_path / "pkg" / "m.py").write_text("X = 1\n")
        sb.upload(M.UploadRequest(source_path=str(tmp_path / "pkg"), target_path="/work/pkg"))
        assert sb.execute("cat /work/pkg/m.py").stdout == "X = 1\n"
        sid, token = sb.id, sb.token
    assert res.placement(sid) is None  # closing freed its slot
    with pytest.raises(E.SandboxNotFoundError):
        service.call(sid, token, "execute", {"command": "true"})


def test_user_at_quota_is_refused_or_waits(service):
    u = user()
    service.root.resources.set_quota(u, 1)
    first = Sandbox.open(service, user=u)
    with pytest.raises(E.SandboxCapacityError, match=f"user '{u}' is at its limit of 1"):
        Sandbox.open(service, user=u)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(Sandbox.open(service, user=u, wait_s=120)))
    waiter.start()
    deadline = time.monotonic() + 30
    while service.root.resources.capacity() and time.monotonic() < deadline and waiter.is_alive():
        if any(r["user"] == u and r["used"] == 1 for r in service.root.resources.capacity()["users"]):
            break
        time.sleep(0.1)
    first.close()
    waiter.join(150)
    assert got and got[0].execute("echo ok").stdout.strip() == "ok"
    got[0].close()


def test_http_token_of_one_sandbox_is_refused_for_another(server):
    t = HttpTransport(server.url)
    a, b = Sandbox.open(t, user=user()), Sandbox.open(t, user=user())
    try:
        with pytest.raises(E.SandboxAuthError):
            t.call(b.id, a.token, "execute", {"command": "true"})
        with pytest.raises(E.SandboxAuthError):
            t.close(b.id, a.token)
        assert a.execute("echo a").stdout == "a\n" and b.execute("echo b").stdout == "b\n"
    finally:
        a.close()
        b.close()


def test_swerex_remote_runtime_drives_a_megaflow_sandbox(server, tmp_path):
    pytest.importorskip("swerex")
    from swerex.exceptions import CommandTimeoutError, NonZeroExitCodeError
    from swerex.runtime.abstract import (
        BashAction,
        Command,
        CreateBashSessionRequest,
        ReadFileRequest,
        UploadRequest,
        WriteFileRequest,
    )
    from swerex.runtime.remote import RemoteRuntime

    sb = Sandbox.open(HttpTransport(server.url), user=user(), workdir="/work")

    async def drive() -> None:
        rt = RemoteRuntime(host=server.url, auth_token=sb.token, timeout=30)
        assert (await rt.is_alive()).is_alive
        await rt.create_session(CreateBashSessionRequest())
        await rt.run_in_session(BashAction(command="cd /tmp && export GREETING=hi"))
        obs = await rt.run_in_session(BashAction(command="echo $GREETING from $(pwd)"))
        assert obs.output.strip() == "hi from /tmp" and obs.exit_code == 0
        with pytest.raises(NonZeroExitCodeError):
            await rt.run_in_session(BashAction(command="ls /no/such/dir"))
        with pytest.raises(CommandTimeoutError):
            await rt.run_in_session(BashAction(command="sleep 5", timeout=1))
        await rt.write_file(WriteFileRequest(path="/work/f.txt", content="data\n"))
        assert (await rt.read_file(ReadFileRequest(path="/work/f.txt"))).content == "data\n"
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "a.txt").write_text("A")
        (tmp_path / "one.txt").write_text("1")
        await rt.upload(UploadRequest(source_path=str(tmp_path / "src"), target_path="/work/src"))
        await rt.upload(UploadRequest(source_path=str(tmp_path / "one.txt"), target_path="/work/one.txt"))
        out = await rt.execute(Command(command="cat /work/src/a.txt /work/one.txt", shell=True))
        assert (out.stdout, out.exit_code) == ("A1", 0)
        bad = RemoteRuntime(host=server.url, auth_token="not-a-token", timeout=10)
        assert not (await bad.is_alive()).is_alive
        await rt.close()  # SWE-ReX's close removes the sandbox

    asyncio.run(drive())
    with pytest.raises(E.SandboxNotFoundError):
        sb.execute("true")


def test_sandbox_outlives_its_env_hosts_reaper_pass(service):
    """The env host's reaper (a pass every 10 s at most) keeps the container of a live sandbox."""
    with Sandbox.open(service, user=user(), workdir="/work") as sb:
        view = service.root.redis.hgetall(service.root.keys.episode(sb.id))
        assert view["state"] == "RUNNING" and view["host"] == service.root.resources.placement(sb.id)["host"]
        time.sleep(12)  # at least one maintenance pass of that host runs meanwhile
        out = sb.execute(M.Command(command="echo still here", shell=True))
        assert (out.stdout.strip(), out.exit_code) == ("still here", 0)


def test_megaflow_deployment_start_stop(server):
    dep = MegaflowDeployment(HttpTransport(server.url), user=user())

    async def drive() -> None:
        await dep.start()
        assert (await dep.is_alive()).is_alive
        r = await dep.runtime.execute(M.Command(command="echo $((6*7))", shell=True))
        assert r.stdout.strip() == "42"
        await dep.stop()

    asyncio.run(drive())
    with pytest.raises(E.SandboxError):
        dep.runtime  # noqa: B018


def test_idle_sandbox_is_closed_by_the_sweep_and_its_slot_freed(fleet):
    root = Root(fleet, role="client")
    svc = SandboxService(root, idle_timeout_s=1.0)
    try:
        sb = Sandbox.open(svc, user=user())
        assert root.resources.placement(sb.id) is not None
        wait_until(lambda: svc.sweep() > 0, 30, "the sweep to close the idle sandbox", 0.2)
        assert root.resources.placement(sb.id) is None
        assert root.redis.hget(root.keys.episode(sb.id), "state") is None  # the reaper may take its container
        with pytest.raises(E.SandboxNotFoundError):
            sb.execute("true")
        with Sandbox.open(svc, user=user()) as other, pytest.raises(E.SandboxRequestError, match="timeout must be"):
            other.execute(M.Command(command="true", timeout=10**9))
    finally:
        root.close()


def test_junk_requests_get_a_4xx_and_the_server_keeps_serving(server):
    """Bodies that are not JSON, wrong shapes, bad or negative lengths, unknown routes: each gets a
    4xx naming the problem within a second (no thread left reading), and the API then works as before."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(server.url)

    def send(method: str, path: str, body: bytes = b"", length: str | None = None, **headers: str):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
        try:
            conn.putrequest(method, path)
            conn.putheader("Content-Length", length if length is not None else str(len(body)))
            for k, v in headers.items():
                conn.putheader(k.replace("_", "-"), v)
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    cases = [
        ("POST", "/sandboxes", b"not json", None),
        ("POST", "/sandboxes", b"[1, 2]", None),
        ("POST", "/sandboxes", b'{"user": "u", "bogus": 1}', None),
        ("POST", "/sandboxes", b"{}", None),
        ("POST", "/sandboxes", b"", "-5"),
        ("POST", "/sandboxes", b"", "many"),
        ("POST", "/sandboxes/no-such/execute", b'{"command": "true"}', None),
        ("POST", "/execute", b'{"command": "true"}', None),
        ("GET", "/a/b/c/d", b"", None),
        ("POST", "/sandboxes/x/" + "y" * 5000, b"{}", None),
    ]
    for method, path, body, length in cases:
        status, reply = send(method, path, body, length)
        assert 400 <= status < 500, (method, path, body, length, status, reply)
        assert b"detail" in reply, reply
    sbx = Sandbox.open(HttpTransport(server.url), user=user())
    try:
        assert sbx.execute("echo still").stdout == "still\n"
    finally:
        sbx.close()
