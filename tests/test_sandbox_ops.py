"""SWE-ReX operations on an env host backend (the sim one: no containers), and the error transfer."""

from __future__ import annotations

import base64

import pytest

from megaflow.core.settings import Settings
from megaflow.env_hosts.sim import SimHost
from megaflow.sandbox import errors as E
from megaflow.sandbox import ops


class DictSessions:
    def __init__(self):
        self.d: dict[str, str] = {}

    def get(self, name):
        return self.d.get(name)

    def put(self, name, sid):
        return self.d.setdefault(name, sid) == sid

    def pop(self, name):
        return self.d.pop(name, None)


@pytest.fixture
def box():
    host = SimHost({"builtins": True}, Settings.load(), name="h1")
    handle = host.create("sbx-1", "img", workdir="/work").to_json()
    yield host, handle, DictSessions()
    host.shutdown()


def test_session_keeps_cd_and_exported_variables(box):
    host, handle, sessions = box
    ops.apply(host, handle, "create_session", {"session": "s"}, sessions, workdir="/work")
    ops.apply(host, handle, "run_in_session", {"command": "cd /tmp", "session": "s"}, sessions)
    ops.apply(host, handle, "run_in_session", {"command": "export FOO=bar", "session": "s"}, sessions)
    obs = ops.apply(host, handle, "run_in_session", {"command": "pwd", "session": "s"}, sessions)
    assert obs == {"output": "/tmp", "exit_code": 0, "failure_reason": "", "expect_string": "", "session_type": "bash"}
    assert (
        ops.apply(host, handle, "run_in_session", {"command": "echo $FOO", "session": "s"}, sessions)["output"] == "bar"
    )
    with pytest.raises(E.SessionExistsError):
        ops.apply(host, handle, "create_session", {"session": "s"}, sessions)
    ops.apply(host, handle, "close_session", {"session": "s"}, sessions)
    with pytest.raises(E.SessionDoesNotExistError):
        ops.apply(host, handle, "run_in_session", {"command": "pwd", "session": "s"}, sessions)


def test_files_round_trip_relative_to_workdir(box):
    host, handle, sessions = box
    ops.apply(host, handle, "write_file", {"path": "a/b.txt", "content": "héllo\n"}, sessions, workdir="/work")
    got = ops.apply(host, handle, "read_file", {"path": "/work/a/b.txt"}, sessions, workdir="/work")
    assert got == {"content": "héllo\n"}
    files = {"x.py": base64.b64encode(b"print(1)\n").decode(), "d/y": base64.b64encode(b"\x00\x01").decode()}
    ops.apply(host, handle, "upload", {"target_path": "/up", "files": files}, sessions)
    assert host.get_file(handle, "/up/d/y") == b"\x00\x01"
    with pytest.raises(E.SandboxError, match="outside"):
        ops.apply(host, handle, "upload", {"target_path": "/up", "files": {"../etc/x": ""}}, sessions)
    with pytest.raises(E.SandboxFileNotFoundError):
        ops.apply(host, handle, "read_file", {"path": "/nope"}, sessions)


def test_errors_cross_the_boundary_with_swerex_names():
    exc = E.NonZeroExitCodeError("boom")
    t = E.to_transfer(exc)
    assert t["class_path"] == "megaflow.sandbox.errors.NonZeroExitCodeError"
    assert E.swerex_transfer(t)["class_path"] == "swerex.exceptions.NonZeroExitCodeError"
    back = E.from_transfer(t)
    assert isinstance(back, E.NonZeroExitCodeError) and isinstance(back, RuntimeError) and str(back) == "boom"
    assert isinstance(E.from_transfer({"class_path": "x.Weird", "message": "m"}), E.SandboxError)


def test_unknown_operation_is_named(box):
    host, handle, sessions = box
    with pytest.raises(E.SandboxError, match="unknown sandbox operation 'rm'"):
        ops.apply(host, handle, "rm", {}, sessions)
