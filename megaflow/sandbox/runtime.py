"""The Python entry: ``Sandbox`` (sync), and SWE-ReX's ``AbstractRuntime`` / ``AbstractDeployment`` shapes.

All three talk through a ``Transport``: ``HttpTransport`` (megaflow.sandbox.http, to ``megaflow sandbox
serve``) or the in-process ``SandboxService`` (megaflow.services.sandbox_api). Method names, requests
and responses are SWE-ReX's, so code written against ``swerex.runtime.remote.RemoteRuntime`` or a
SWE-ReX deployment runs on a MegaFlow sandbox unchanged.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from megaflow.sandbox import models as M

MAX_UPLOAD_BYTES = 64 * 1024 * 1024


class Transport(Protocol):
    """What a sandbox client needs: create, one operation, close."""

    def create(self, *, user: str, image: str | None = None, workdir: str | None = None, wait_s: float = 0.0) -> dict:
        """Open a sandbox; returns {id, token, host, user, image, workdir}."""
        ...

    def call(self, sandbox_id: str, token: str, op: str, request: dict, *, timeout: float | None = None) -> dict:
        """Run one operation (a SWE-ReX route name) on the sandbox; returns the response's dict."""
        ...

    def close(self, sandbox_id: str, token: str) -> None:
        """Remove the sandbox and free its slot (idempotent)."""
        ...


def _dump(request: Any) -> dict:
    if isinstance(request, BaseModel):
        return request.model_dump()
    if isinstance(request, dict):
        return dict(request)
    raise TypeError(f"a request must be a pydantic model or a dict, got {type(request).__name__}")


def read_upload(source_path: str | Path) -> dict[str, str]:
    """Local file or directory -> {relative path ("" for a file): base64}, at most MAX_UPLOAD_BYTES."""
    source = Path(source_path).resolve()
    if source.is_file():
        items = [("", source)]
    elif source.is_dir():
        items = [(p.relative_to(source).as_posix(), p) for p in sorted(source.rglob("*")) if p.is_file()]
    else:
        raise ValueError(f"Source path {source} is not a file or directory")
    total, out = 0, {}
    for rel, p in items:
        data = p.read_bytes()
        total += len(data)
        if total > MAX_UPLOAD_BYTES:
            raise ValueError(f"upload of {source} is over {MAX_UPLOAD_BYTES} bytes")
        out[rel] = base64.b64encode(data).decode()
    return out


class Sandbox:
    """One MegaFlow sandbox, driven with SWE-ReX's operations (synchronous).

    ``Sandbox.open(transport, user=...)`` creates one (admitted through the resource manager);
    ``close()`` removes it and frees its slot. A context manager.
    """

    def __init__(self, transport: Transport, info: dict):
        self.transport = transport
        self.info = info
        self.id: str = info["id"]
        self.token: str = info["token"]
        self.closed = False

    @classmethod
    def open(
        cls,
        transport: Transport,
        *,
        user: str,
        image: str | None = None,
        workdir: str | None = None,
        wait_s: float = 0.0,
    ) -> Sandbox:
        return cls(transport, transport.create(user=user, image=image, workdir=workdir, wait_s=wait_s))

    def call(self, op: str, request: Any, response: type[BaseModel], timeout: float | None = None) -> Any:
        return response.model_validate(self.transport.call(self.id, self.token, op, _dump(request), timeout=timeout))

    def is_alive(self) -> M.IsAliveResponse:
        return M.IsAliveResponse.model_validate(self.transport.call(self.id, self.token, "is_alive", {}))

    def create_session(self, request: Any = None) -> M.CreateBashSessionResponse:
        return self.call("create_session", request or M.CreateBashSessionRequest(), M.CreateBashSessionResponse)

    def run_in_session(self, action: Any) -> M.BashObservation:
        timeout = (_dump(action).get("timeout") or 0) or None
        return self.call("run_in_session", action, M.BashObservation, timeout)

    def close_session(self, request: Any = None) -> M.CloseBashSessionResponse:
        return self.call("close_session", request or M.CloseBashSessionRequest(), M.CloseBashSessionResponse)

    def execute(self, command: Any) -> M.CommandResponse:
        if isinstance(command, (str, list)):
            command = M.Command(command=command, shell=isinstance(command, str))
        return self.call("execute", command, M.CommandResponse, (_dump(command).get("timeout") or 0) or None)

    def read_file(self, request: Any) -> M.ReadFileResponse:
        return self.call("read_file", request, M.ReadFileResponse)

    def write_file(self, request: Any) -> M.WriteFileResponse:
        return self.call("write_file", request, M.WriteFileResponse)

    def upload(self, request: Any) -> M.UploadResponse:
        req = _dump(request)
        payload = {"target_path": req["target_path"], "files": read_upload(req["source_path"])}
        return self.call("upload", payload, M.UploadResponse)

    def close(self) -> M.CloseResponse:
        if not self.closed:
            self.transport.close(self.id, self.token)
            self.closed = True
        return M.CloseResponse()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MegaflowRuntime:
    """SWE-ReX's ``AbstractRuntime`` (async methods of the same names) on a MegaFlow sandbox."""

    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox

    async def is_alive(self, *, timeout: float | None = None) -> M.IsAliveResponse:
        try:
            return await asyncio.to_thread(self.sandbox.is_alive)
        except Exception as exc:
            return M.IsAliveResponse(is_alive=False, message=str(exc))

    async def create_session(self, request: Any) -> M.CreateBashSessionResponse:
        return await asyncio.to_thread(self.sandbox.create_session, request)

    async def run_in_session(self, action: Any) -> M.BashObservation:
        return await asyncio.to_thread(self.sandbox.run_in_session, action)

    async def close_session(self, request: Any) -> M.CloseBashSessionResponse:
        return await asyncio.to_thread(self.sandbox.close_session, request)

    async def execute(self, command: Any) -> M.CommandResponse:
        return await asyncio.to_thread(self.sandbox.execute, command)

    async def read_file(self, request: Any) -> M.ReadFileResponse:
        return await asyncio.to_thread(self.sandbox.read_file, request)

    async def write_file(self, request: Any) -> M.WriteFileResponse:
        return await asyncio.to_thread(self.sandbox.write_file, request)

    async def upload(self, request: Any) -> M.UploadResponse:
        return await asyncio.to_thread(self.sandbox.upload, request)

    async def close(self) -> M.CloseResponse:
        return await asyncio.to_thread(self.sandbox.close)


class MegaflowDeployment:
    """SWE-ReX's ``AbstractDeployment``: ``start()`` opens a sandbox on the fleet, ``stop()`` closes it."""

    def __init__(
        self,
        transport: Transport,
        *,
        user: str,
        image: str | None = None,
        workdir: str | None = None,
        wait_s: float = 0.0,
    ):
        self.transport = transport
        self.options: dict[str, Any] = {"user": user, "image": image, "workdir": workdir, "wait_s": wait_s}
        self.sandbox: Sandbox | None = None
        self._runtime: MegaflowRuntime | None = None
        self.hooks: list[Any] = []

    def add_hook(self, hook: Any) -> None:
        self.hooks.append(hook)

    async def start(self, *args: Any, **kwargs: Any) -> None:
        o = self.options
        sandbox = await asyncio.to_thread(
            lambda: Sandbox.open(
                self.transport, user=o["user"], image=o["image"], workdir=o["workdir"], wait_s=o["wait_s"]
            )
        )
        self.sandbox, self._runtime = sandbox, MegaflowRuntime(sandbox)

    async def stop(self, *args: Any, **kwargs: Any) -> None:
        if self.sandbox is not None:
            await asyncio.to_thread(self.sandbox.close)
        self.sandbox = None
        self._runtime = None

    async def is_alive(self, *, timeout: float | None = None) -> M.IsAliveResponse:
        return await self.runtime.is_alive(timeout=timeout)

    @property
    def runtime(self) -> MegaflowRuntime:
        if self._runtime is None:
            from megaflow.sandbox.errors import SandboxError

            raise SandboxError("the deployment is not started: call `await deployment.start()` first")
        return self._runtime
