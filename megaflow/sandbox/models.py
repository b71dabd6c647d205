"""SWE-ReX-shaped requests and responses (``swerex.runtime.abstract``), so SWE-ReX code talks to MegaFlow unchanged.

Field names and defaults follow SWE-ReX 1.4; the models are copied rather than imported so that
MegaFlow does not need ``swe-rex`` installed. ``extra="ignore"`` on requests: newer SWE-ReX
clients may send fields this version does not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class IsAliveResponse(BaseModel):
    is_alive: bool
    message: str = ""

    def __bool__(self) -> bool:
        return self.is_alive


class CreateBashSessionRequest(_Req):
    startup_source: list[str] = []
    session: str = "default"
    session_type: Literal["bash"] = "bash"
    startup_timeout: float = 1.0


class CreateBashSessionResponse(BaseModel):
    output: str = ""
    session_type: Literal["bash"] = "bash"


class BashAction(_Req):
    command: str
    session: str = "default"
    timeout: float | None = None
    is_interactive_command: bool = False
    is_interactive_quit: bool = False
    check: Literal["silent", "raise", "ignore"] = "raise"
    error_msg: str = ""
    expect: list[str] = []
    action_type: Literal["bash"] = "bash"


class BashObservation(BaseModel):
    output: str = ""
    exit_code: int | None = None
    failure_reason: str = ""
    expect_string: str = ""
    session_type: Literal["bash"] = "bash"


class CloseBashSessionRequest(_Req):
    session: str = "default"
    session_type: Literal["bash"] = "bash"


class CloseBashSessionResponse(BaseModel):
    session_type: Literal["bash"] = "bash"


class Command(_Req):
    command: str | list[str]
    timeout: float | None = None
    shell: bool = False
    check: bool = False
    error_msg: str = ""
    env: dict[str, str] | None = None
    cwd: str | None = None
    merge_output_streams: bool = False


class CommandResponse(BaseModel):
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None


class ReadFileRequest(_Req):
    path: str
    encoding: str | None = None
    errors: str | None = None


class ReadFileResponse(BaseModel):
    content: str = ""


class WriteFileRequest(_Req):
    content: str
    path: str


class WriteFileResponse(BaseModel):
    pass


class UploadRequest(_Req):
    source_path: str
    target_path: str


class UploadResponse(BaseModel):
    pass


class CloseResponse(BaseModel):
    pass


class ExceptionTransfer(BaseModel):
    """An error that crossed a process boundary (SWE-ReX's ``_ExceptionTransfer``)."""

    message: str = ""
    class_path: str = ""
    traceback: str = ""
    extra_info: dict[str, Any] = {}


# operation name -> (request model, response model); the names are SWE-ReX's HTTP routes
OPERATIONS: dict[str, tuple[type[BaseModel], type[BaseModel]]] = {
    "create_session": (CreateBashSessionRequest, CreateBashSessionResponse),
    "run_in_session": (BashAction, BashObservation),
    "close_session": (CloseBashSessionRequest, CloseBashSessionResponse),
    "execute": (Command, CommandResponse),
    "read_file": (ReadFileRequest, ReadFileResponse),
    "write_file": (WriteFileRequest, WriteFileResponse),
}
