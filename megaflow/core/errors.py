"""MegaFlow's error hierarchy: one base, a retryable branch, and user mistakes with clear messages."""

from __future__ import annotations


class MegaflowError(Exception):
    """Base of every error MegaFlow raises on purpose."""


class RetryableError(MegaflowError):
    """A transient failure; the step may be retried (Celery ``autoretry_for`` names this)."""


class InfraError(MegaflowError):
    """The fleet failed (Docker daemon, image pull, container boot, model server), not the task."""


class RetryableInfraError(InfraError, RetryableError):
    """An infrastructure failure worth retrying."""


class TaskError(MegaflowError):
    """The task itself failed inside its environment (command failed, evaluation failed)."""


class CommandTimeoutError(TaskError, TimeoutError):
    """A command ran past its time limit inside the container."""


class SpecError(MegaflowError, ValueError):
    """A task spec is invalid; the message names the field and the fix."""

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None):
        self.index = index
        self.field = field
        where = f"spec #{index}: " if index is not None else ""
        super().__init__(where + message)


class QuotaError(MegaflowError):
    """A user asked for more than its quota allows."""


class ConfigError(MegaflowError, ValueError):
    """A setting is missing or wrong; the message names the setting."""


class ServiceUnavailableError(InfraError):
    """A service MegaFlow needs (Redis, Docker engine, a store) cannot be reached."""


class NotFoundError(MegaflowError, KeyError):
    """An episode, batch or host id is unknown."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelError(MegaflowError):
    """A model request failed for good."""


class ContextLengthError(ModelError):
    """The prompt no longer fits the model's context window; the episode ends cleanly."""


class ModelUnavailableError(ModelError, RetryableInfraError):
    """Model endpoints kept failing (429, 5xx, connection errors, time-outs) after every retry."""


class SettingsError(ConfigError):
    """A setting (environment, MEGAFLOW_CONFIG file or override) is unknown or bad; names MEGAFLOW_<NAME>."""

    def __init__(self, message: str, *, setting: str | None = None):
        self.setting = setting
        super().__init__(message)
