"""The sandbox API: SWE-ReX-compatible sandboxes on MegaFlow's env fleet, for frameworks with their own loop.

``Sandbox`` (sync) and ``MegaflowDeployment`` / ``MegaflowRuntime`` (SWE-ReX's async shapes) over a
``Transport``: ``HttpTransport`` to ``megaflow sandbox serve``, or in-process
``megaflow.services.sandbox_api.SandboxService``.
"""

from megaflow.sandbox.errors import SandboxError
from megaflow.sandbox.http import HttpTransport, SandboxHTTPServer
from megaflow.sandbox.runtime import MegaflowDeployment, MegaflowRuntime, Sandbox, Transport

__all__ = [
    "HttpTransport",
    "MegaflowDeployment",
    "MegaflowRuntime",
    "Sandbox",
    "SandboxError",
    "SandboxHTTPServer",
    "Transport",
]
