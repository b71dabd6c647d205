"""MegaFlow: run LLM-agent episodes against software environments on a fleet of Celery workers.

Public API: ``Client``, ``Settings``, ``TaskSpec`` and the error classes, imported lazily so that
``import megaflow.<module>`` stays cheap and nothing runs at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Client": "megaflow.client",
    "Submission": "megaflow.client",
    "MegaflowError": "megaflow.core.errors",
    "SpecError": "megaflow.core.errors",
    "Settings": "megaflow.core.settings",
    "TaskSpec": "megaflow.core.spec",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megaflow' has no attribute {name!r}")
