"""Episode states and the phase names recorded with them."""

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

SUBMITTED = "SUBMITTED"
QUEUED = "QUEUED"
ADMITTED = "ADMITTED"
ENV_STARTING = "ENV_STARTING"
RUNNING = "RUNNING"
EVALUATING = "EVALUATING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"

ORDER = [SUBMITTED, QUEUED, ADMITTED, ENV_STARTING, RUNNING, EVALUATING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT]
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})
LIVE = frozenset({ADMITTED, ENV_STARTING, RUNNING, EVALUATING})

# Failure causes (the task document's "cause").
CAUSE_INFRA = "infra"
CAUSE_TESTS = "tests_failed"
CAUSE_AGENT_LIMIT = "agent_limit"
CAUSE_FORMAT = "format"
CAUSE_CONTEXT = "context_length"
CAUSE_TIMEOUT = "timeout"
CAUSE_MODEL = "model_error"
CAUSE_CANCELLED = "cancelled"
CAUSE_SETUP = "setup"
CAUSE_AGENT_CONFIG = "agent_config"
CAUSE_AGENT_ERROR = "agent_error"  # the agent's own code failed (a plug-in raised)
CAUSE_MODEL_REQUEST = "model_request"  # the model server refused the request (400/404/422, bad parameter)
CAUSE_MODEL_AUTH = "model_auth"  # the model server refused the credentials (401/403)
CAUSE_INTERNAL = "internal"  # an unexpected exception in a step (a bug or an unforeseen backend error)

# Causes that say nothing about the agent's work: never scored as a result, re-run by resume.
INFRA_CAUSES = frozenset({CAUSE_INFRA, CAUSE_INTERNAL})


def failure_causes(docs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Episodes that ended without success, counted by cause, most common first.

    The one rule ``megaflow status`` and ``megaflow report`` share: every final episode that did not
    succeed counts once, under its cause, else its state in lower case (``cancelled``, ``timed_out``).
    """
    counts: Counter[str] = Counter(
        str(d.get("cause") or str(d.get("state") or "").lower() or "unknown")
        for d in docs
        if d.get("state") in TERMINAL and d.get("state") != SUCCEEDED
    )
    return dict(counts.most_common())
