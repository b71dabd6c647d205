"""MegaFlow: run LLM-agent episodes against software environments on a fleet of Celery workers.

Public API: ``Client``, ``Settings``, ``TaskSpec`` and the error classes. Nothing runs at import.
"""

from megaflow.client import Client, Submission
from megaflow.errors import MegaflowError, SpecError
from megaflow.settings import Settings
from megaflow.spec import TaskSpec

__all__ = ["Client", "MegaflowError", "Settings", "SpecError", "Submission", "TaskSpec"]
__version__ = "0.1.0"
