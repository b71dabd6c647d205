"""Model service: forwards chat-completion requests to a backend (scripted, OpenAI-compatible, a user's)."""

from megaflow.model_gateway.backends import BACKENDS, backend_class, load_backend, validate_model_section
from megaflow.model_gateway.base import BackendConfig, ModelBackend, ModelReply, ModelRequest, chat_message

__all__ = [
    "BACKENDS",
    "BackendConfig",
    "ModelBackend",
    "ModelReply",
    "ModelRequest",
    "backend_class",
    "chat_message",
    "load_backend",
    "validate_model_section",
]
