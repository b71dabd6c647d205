"""Sandbox errors: each is a ``MegaflowError`` with the stdlib meaning SWE-ReX gives its twin.

``SWEREX_NAMES`` maps each to the SWE-ReX class of the same meaning, so an error sent over HTTP
is re-raised as SWE-ReX's own exception by SWE-ReX's ``RemoteRuntime``.
"""

from __future__ import annotations

import traceback

from megaflow.core.errors import MegaflowError
from megaflow.sandbox.models import ExceptionTransfer


class SandboxError(MegaflowError):
    """A sandbox operation failed."""


class SandboxRequestError(SandboxError, ValueError):
    """A request names a bad field (the message names it and the rule)."""


class SandboxNotFoundError(SandboxError, LookupError):
    """No open sandbox has this id (closed, expired or never created)."""


class SandboxAuthError(SandboxError, PermissionError):
    """The token does not belong to this sandbox."""


class SandboxCapacityError(SandboxError, RuntimeError):
    """No slot could be had in time (user quota, global limit or every host full)."""


class SandboxLostError(SandboxError, RuntimeError):
    """The sandbox's lease or container was lost; it is closed."""


class SandboxTimeoutError(SandboxError, TimeoutError):
    """The env host did not answer in time."""


class CommandTimeoutError(SandboxError, RuntimeError, TimeoutError):
    """A command ran past its time limit."""


class NonZeroExitCodeError(SandboxError, RuntimeError):
    """A checked command exited non-zero."""


class CommandFailedError(SandboxError, RuntimeError):
    """A checked ``execute`` exited non-zero."""


class SessionExistsError(SandboxError, ValueError):
    """A session of this name is already open."""


class SessionDoesNotExistError(SandboxError, ValueError):
    """No session of this name is open."""


class SandboxFileNotFoundError(SandboxError, FileNotFoundError):
    """The path does not exist in the sandbox."""


SWEREX_NAMES = {
    CommandTimeoutError: "swerex.exceptions.CommandTimeoutError",
    NonZeroExitCodeError: "swerex.exceptions.NonZeroExitCodeError",
    CommandFailedError: "swerex.exceptions.NonZeroExitCodeError",
    SessionExistsError: "swerex.exceptions.SessionExistsError",
    SessionDoesNotExistError: "swerex.exceptions.SessionDoesNotExistError",
    SandboxFileNotFoundError: "builtins.FileNotFoundError",
}
_BY_NAME = {
    cls.__name__: cls
    for cls in (
        SandboxError,
        SandboxRequestError,
        SandboxNotFoundError,
        SandboxAuthError,
        SandboxCapacityError,
        SandboxLostError,
        SandboxTimeoutError,
        CommandTimeoutError,
        NonZeroExitCodeError,
        CommandFailedError,
        SessionExistsError,
        SessionDoesNotExistError,
        SandboxFileNotFoundError,
    )
}


def to_transfer(exc: BaseException) -> dict:
    """JSON form of an error: class path, message and traceback (SWE-ReX's transfer shape)."""
    cls = type(exc)
    return ExceptionTransfer(
        message=str(exc),
        class_path=f"{cls.__module__}.{cls.__qualname__}",
        traceback="".join(traceback.format_exception(exc))[-4000:],
    ).model_dump()


def swerex_transfer(data: dict) -> dict:
    """The transfer with SWE-ReX's class path of the same meaning (for SWE-ReX clients)."""
    cls = _BY_NAME.get(data.get("class_path", "").rpartition(".")[2], SandboxError)
    return {**data, "class_path": SWEREX_NAMES.get(cls, "swerex.exceptions.SwerexException")}


def from_transfer(data: dict) -> Exception:
    """Rebuild a sandbox error from its transfer form (an unknown class becomes ``SandboxError``)."""
    name = data.get("class_path", "").rpartition(".")[2]
    cls = _BY_NAME.get(name, SandboxError)
    return cls(data.get("message", ""))
