"""Model service: forwards chat-completion requests to a backend (scripted, OpenAI-compatible)."""

from megaflow.model_gateway.base import BACKENDS, ModelBackend, ModelReply, ModelRequest, load_backend

__all__ = ["BACKENDS", "ModelBackend", "ModelReply", "ModelRequest", "load_backend"]
