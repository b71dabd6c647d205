"""Monitoring: Flower for live task and worker state, Prometheus metrics of MegaFlow's own state.

Nothing here is imported by the workers (the short task arguments Flower shows come from
``megaflow.core.wire.task_argsrepr``); Flower and Tornado load only in ``megaflow flower``.
"""
