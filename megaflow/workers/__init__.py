"""The workers layer: the Celery app (``celery -A megaflow.workers.app``), thin tasks, role workers."""
