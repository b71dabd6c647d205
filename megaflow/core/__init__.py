"""The core layer: settings, errors, Redis key names, states, the task spec and the wire contract.

It imports nothing of MegaFlow above it (checked by import-linter, see pyproject.toml).
"""
