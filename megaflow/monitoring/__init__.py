"""Monitoring: Flower for live task and worker state, Prometheus metrics of MegaFlow's own state.

Nothing here is imported by the workers except ``flower.task_argsrepr`` (the short form of a
task's arguments that Flower shows); Flower and Tornado load only in ``megaflow flower``.
"""
