"""The workers layer: the Celery app, thin tasks, role workers.

Stock Celery works on this package: ``celery -A megaflow.workers worker -Q agent``,
``celery -A megaflow.workers inspect ping``, ``celery -A megaflow.workers flower``.
"""

from megaflow.workers import signals, tasks  # noqa: F401  (register the tasks and signal handlers)
from megaflow.workers.celery_app import app

__all__ = ["app"]
