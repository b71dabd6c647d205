"""Model errors by class, each with the episode cause it ends in.

- :class:`ModelRequestError`: 400 / 404 / 422 (any non-retryable 4xx), a bad model section ->
  ``model_request``; the endpoint's health is untouched.
- :class:`ContextLengthError` (core): the prompt does not fit the context window -> ``context_length``;
  untouched.
- :class:`ModelAuthError`: 401 / 403 on every endpoint left to the batch -> ``model_auth``; the
  endpoint is not used again by the batch.
- :class:`ModelUnavailableError` (core): 429 / 5xx / connection errors / time-outs past the retry
  budget -> ``infra``; counted against the endpoint's health.
- :class:`ModelError` (core): any other failure of a backend (e.g. scripted replies exhausted) ->
  ``model_error``.
"""

from __future__ import annotations

from megaflow.core.errors import ContextLengthError, ModelError, ModelUnavailableError
from megaflow.core.states import CAUSE_CONTEXT, CAUSE_INFRA, CAUSE_MODEL, CAUSE_MODEL_AUTH, CAUSE_MODEL_REQUEST


class ModelRequestError(ModelError, ValueError):
    """The server rejected the request itself (400 / 404 / 422): retrying cannot help."""

    def __init__(self, message: str, *, status: int | None = None, endpoint: str | None = None):
        self.status = status
        self.endpoint = endpoint
        super().__init__(message)


class ModelAuthError(ModelError, PermissionError):
    """An endpoint refused the credentials (401 / 403); the batch stops using it."""

    def __init__(self, message: str, *, status: int | None = None, endpoint: str | None = None):
        self.status = status
        self.endpoint = endpoint
        super().__init__(message)


def cause_of(exc: BaseException) -> str:
    """The episode cause a model error ends in (see the table above)."""
    if isinstance(exc, ContextLengthError):
        return CAUSE_CONTEXT
    if isinstance(exc, ModelAuthError):
        return CAUSE_MODEL_AUTH
    if isinstance(exc, ModelRequestError):
        return CAUSE_MODEL_REQUEST
    if isinstance(exc, ModelUnavailableError):
        return CAUSE_INFRA
    return CAUSE_MODEL


__all__ = [
    "CAUSE_CONTEXT",
    "CAUSE_INFRA",
    "CAUSE_MODEL",
    "CAUSE_MODEL_AUTH",
    "CAUSE_MODEL_REQUEST",
    "ContextLengthError",
    "ModelAuthError",
    "ModelError",
    "ModelRequestError",
    "ModelUnavailableError",
    "cause_of",
]
