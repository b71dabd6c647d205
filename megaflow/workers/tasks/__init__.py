"""Thin Celery tasks: check the arguments, then call the service step. Registered per app."""

from __future__ import annotations

from celery import Celery

from megaflow.workers.tasks import agent, env, model


def register(app: Celery) -> None:
    """Register every MegaFlow task on ``app``."""
    for module in (agent, env, model):
        module.register(app)
