"""The ``model`` section of the ``openai`` backend and the request body built from it.

Every field of the OpenAI chat-completions request that a caller may set is a typed field here
(sent only when set), plus vLLM's sampling and output extensions; anything else a server
accepts goes in ``extra_body``, merged into the body last. Gateway-only fields (``model_name``,
``endpoints``/``base_url``, ``policy_version``, ``stream``) are not sent as they are.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from megaflow.model_gateway.base import BackendConfig

GATEWAY_FIELDS = frozenset(
    {"backend", "model_name", "endpoints", "base_url", "policy_version", "stream", "extra_body", "replies"}
)


class OpenAIConfig(BackendConfig):
    """The ``model`` section of the openai backend (any OpenAI-compatible /v1/chat/completions)."""

    backend: Literal["openai"] = Field("openai", description="Any OpenAI-compatible chat-completions server.")
    # --- gateway ----------------------------------------------------------------------------------
    model_name: str | None = Field(
        None,
        min_length=1,
        description="Model name sent to the server (and the endpoint pool's name); default settings.model_name.",
    )
    endpoints: list[str] | None = Field(
        None,
        description="Base URLs such as http://gpu1:8000/v1; default "
        "settings.model_endpoints plus registered model hosts.",
    )
    base_url: str | None = Field(None, description="One base URL (shorthand for endpoints: [base_url]).")
    policy_version: str | None = Field(
        None,
        description="Version tag sent and recorded; default the task's policy_version, then settings.policy_version.",
    )
    stream: bool | None = Field(
        None,
        description="Stream the reply (SSE) and reassemble it, so a long "
        "generation is not cut by a read time-out; default settings.model_stream.",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Merged into the request body last (server extensions; {metadata: null} drops the metadata field).",
    )
    replies: list[Any] | None = Field(
        None, description="Ignored here (the scripted backend's), so one spec runs on either backend."
    )
    # --- OpenAI chat-completions request fields -----------------------------------------------------
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int | None = Field(None, ge=1, description="Completion token limit (legacy name).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Completion token limit.")
    stop: str | list[str] | None = Field(None, description="Stop sequence(s).")
    seed: int | None = Field(None, description="Sampling seed.")
    n: int | None = Field(
        None, ge=1, description="Choices to generate; the first is the episode's reply, all are recorded."
    )
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Presence penalty.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Frequency penalty.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias.")
    logprobs: bool | None = Field(None, description="Return per-token logprobs (recorded per call).")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token (needs logprobs).")
    tools: list[dict[str, Any]] | None = Field(
        None, description="Tools the model may call ([{type: function, function: {name, description, parameters}}])."
    )
    tool_choice: str | dict[str, Any] | None = Field(None, description="none, auto, required or a named tool.")
    parallel_tool_calls: bool | None = Field(None, description="Allow several tool calls in one reply.")
    response_format: dict[str, Any] | None = Field(
        None, description="{type: json_object} or {type: json_schema, json_schema: {...}}."
    )
    reasoning_effort: str | None = Field(None, description="Reasoning models: low, medium, high.")
    user: str | None = Field(None, description="End-user id.")
    service_tier: str | None = Field(None, description="Hosted APIs' service tier.")
    metadata: dict[str, str] | None = Field(
        None, description="Sent as metadata, over MegaFlow's own (session_id, step, policy_version)."
    )
    stream_options: dict[str, Any] | None = Field(
        None, description="Streaming options (include_usage is always asked for when streaming)."
    )
    # --- vLLM / SGLang / llama.cpp extensions -------------------------------------------------------
    top_k: int | None = Field(None, description="Top-k sampling (vLLM, SGLang, llama.cpp).")
    min_p: float | None = Field(None, ge=0, le=1, description="Min-p sampling.")
    repetition_penalty: float | None = Field(None, gt=0, description="Repetition penalty.")
    min_tokens: int | None = Field(None, ge=0, description="Generate at least this many tokens (vLLM).")
    ignore_eos: bool | None = Field(None, description="Keep generating past end-of-sequence (vLLM).")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that stop generation (vLLM).")
    skip_special_tokens: bool | None = Field(None, description="Drop special tokens from the text (vLLM).")
    include_stop_str_in_output: bool | None = Field(None, description="Keep the stop string (vLLM).")
    return_tokens_as_token_ids: bool | None = Field(
        None, description="Logprob tokens as 'token_id:N' (vLLM): recorded as completion token ids."
    )
    return_token_ids: bool | None = Field(None, description="Return prompt and completion token ids (vLLM).")
    prompt_logprobs: int | None = Field(None, ge=0, description="Logprobs of prompt tokens (vLLM).")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Passed to the chat template (vLLM, SGLang), e.g. {enable_thinking: false}."
    )

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not all(isinstance(e, str) and e.startswith(("http://", "https://")) for e in v):
            raise ValueError("must be a list of http(s) base URLs, e.g. http://gpu1:8000/v1")
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) base URL, e.g. http://gpu1:8000/v1")
        return v

    def request_fields(self) -> dict[str, Any]:
        """The OpenAI (and extension) fields this section sets, as sent (unset ones are left out)."""
        return {k: v for k, v in self.model_dump(exclude_none=True).items() if k not in GATEWAY_FIELDS}

    def endpoint_list(self, default: list[str]) -> list[str]:
        if self.endpoints is not None:
            return list(self.endpoints)
        if self.base_url is not None:
            return [self.base_url]
        return list(default)
