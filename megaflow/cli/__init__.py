"""The ``megaflow`` command line."""

from megaflow.cli.main import app, main

__all__ = ["app", "main"]
