"""SWE-ReX operations carried out on an ``EnvHost``: what runs on the env host that owns the sandbox.

Pure translation, no Redis: ``apply`` takes the backend, the sandbox's handle, the operation name
and its SWE-ReX request (a dict), and a ``Sessions`` map from SWE-ReX session names to the
backend's shell-session ids; it returns the SWE-ReX response as a dict or raises a sandbox error.
"""

from __future__ import annotations

import base64
import posixpath
import shlex
from typing import Any, Protocol

from megaflow.core.errors import TaskError
from megaflow.sandbox import errors as E
from megaflow.sandbox import models as M

DEFAULT_TIMEOUT_S = 600.0


class Sessions(Protocol):
    """SWE-ReX session name -> the backend's shell-session id, kept where every worker of the host sees it."""

    def get(self, name: str) -> str | None: ...

    def put(self, name: str, session_id: str) -> bool: ...  # False if the name is taken

    def pop(self, name: str) -> str | None: ...


def resolve(path: str, workdir: str) -> str:
    """An absolute, normalised path (a relative one is taken from the sandbox's work dir)."""
    if not isinstance(path, str) or not path:
        raise ValueError("path must be a non-empty string")
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(workdir, path))


def apply(env_host: Any, handle: dict, op: str, request: dict, sessions: Sessions, *, workdir: str = "/") -> dict:
    """Carry out one SWE-ReX operation on the sandbox ``handle``; returns the response's dict."""
    fn = _OPS.get(op)
    if fn is None:
        raise E.SandboxError(f"unknown sandbox operation {op!r}; known: {', '.join(sorted(_OPS))}")
    if op in M.OPERATIONS:
        request = M.OPERATIONS[op][0].model_validate(request).model_dump()
    return fn(env_host, handle, request, sessions, workdir)


def _create_session(env_host, handle, req, sessions, workdir) -> dict:
    name = req["session"]
    if sessions.get(name):
        raise E.SessionExistsError(f"session {name!r} already exists")
    sid = env_host.open_session(handle, workdir=workdir)
    if not sessions.put(name, sid):
        env_host.close_session(handle, sid)
        raise E.SessionExistsError(f"session {name!r} already exists")
    output = ""
    for source in req["startup_source"]:
        res = env_host.run_in_session(
            handle, sid, f"source {shlex.quote(source)}", timeout=max(1.0, req["startup_timeout"]) * 10
        )
        output += res.output
    return M.CreateBashSessionResponse(output=output).model_dump()


def _run_in_session(env_host, handle, req, sessions, workdir) -> dict:
    name = req["session"]
    sid = sessions.get(name)
    if not sid:
        raise E.SessionDoesNotExistError(f"session {name!r} does not exist")
    if req["is_interactive_command"] or req["is_interactive_quit"] or req["expect"]:
        raise E.SandboxError("interactive commands (expect, is_interactive_*) are not supported by MegaFlow sandboxes")
    timeout = req["timeout"] or DEFAULT_TIMEOUT_S
    res = env_host.run_in_session(handle, sid, req["command"], timeout=timeout)
    if res.timed_out:
        raise E.CommandTimeoutError(f"timeout ({timeout:g}s) while running command {req['command']!r}")
    exit_code = None if req["check"] == "ignore" else res.exit_code
    if req["check"] == "raise" and res.exit_code != 0:
        msg = f"Command {req['command']!r} failed with exit code {res.exit_code}. Here is the output:\n{res.output!r}"
        raise E.NonZeroExitCodeError(f"{req['error_msg']}: {msg}" if req["error_msg"] else msg)
    return M.BashObservation(output=res.output.rstrip("\n"), exit_code=exit_code).model_dump()


def _close_session(env_host, handle, req, sessions, workdir) -> dict:
    sid = sessions.pop(req["session"])
    if not sid:
        raise E.SessionDoesNotExistError(f"session {req['session']!r} does not exist")
    env_host.close_session(handle, sid)
    return M.CloseBashSessionResponse().model_dump()


def _execute(env_host, handle, req, sessions, workdir) -> dict:
    command = req["command"]
    if isinstance(command, list):
        command = command[0] if req["shell"] and len(command) == 1 else shlex.join(command)
    timeout = req["timeout"] or DEFAULT_TIMEOUT_S
    res = env_host.execute(handle, command, timeout=timeout, workdir=req["cwd"] or workdir, env=req["env"])
    if res.timed_out:
        raise E.CommandTimeoutError(f"timeout ({timeout:g}s) while running command {command!r}")
    if req["check"] and res.exit_code != 0:
        msg = f"Command {command!r} failed with exit code {res.exit_code}. Output:\n{res.output}"
        raise E.CommandFailedError(f"{req['error_msg']}: {msg}" if req["error_msg"] else msg)
    # the env seam joins stdout and stderr in order: all of it is reported as stdout
    return M.CommandResponse(stdout=res.output, stderr="", exit_code=res.exit_code).model_dump()


def _read_file(env_host, handle, req, sessions, workdir) -> dict:
    path = resolve(req["path"], workdir)
    try:
        data = env_host.get_file(handle, path)
    except TaskError as exc:
        raise E.SandboxFileNotFoundError(f"{path}: {exc}") from None
    return M.ReadFileResponse(content=data.decode(req["encoding"] or "utf-8", req["errors"] or "strict")).model_dump()


def _write_file(env_host, handle, req, sessions, workdir) -> dict:
    env_host.put_files(handle, {resolve(req["path"], workdir): req["content"]})
    return M.WriteFileResponse().model_dump()


def _upload(env_host, handle, req, sessions, workdir) -> dict:
    """``req``: {"target_path": dir or file, "files": {relative path ("" for a single file): base64}}."""
    target = resolve(req["target_path"], workdir)
    files = {}
    for rel, b64 in (req.get("files") or {}).items():
        path = posixpath.normpath(posixpath.join(target, rel)) if rel else target
        if not (path == target or path.startswith(target.rstrip("/") + "/")):
            raise E.SandboxError(f"upload: {rel!r} points outside the target {target}")
        files[path] = base64.b64decode(b64)
    if files:
        env_host.put_files(handle, files)
    return M.UploadResponse().model_dump()


_OPS = {
    "create_session": _create_session,
    "run_in_session": _run_in_session,
    "close_session": _close_session,
    "execute": _execute,
    "read_file": _read_file,
    "write_file": _write_file,
    "upload": _upload,
}
