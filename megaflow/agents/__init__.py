"""Agents: stepped plug-ins that decide an episode's next move (see megaflow.agents.base).

Built-in types: ``bash`` (megaflow.agents.bash) and ``mini_swe_agent`` (alias ``mini``:
mini-swe-agent's own DefaultAgent, stepped, megaflow.agents.mini_stepped); any other type is a
dotted path to a user's class. ``validate_agent_section`` checks a task's agent section at submit.
"""

from __future__ import annotations

from megaflow.agents.base import (
    REGISTRY,
    Agent,
    AgentBase,
    Decision,
    StepContext,
    agent_class,
    make_agent,
    validate_agent_section,
)
from megaflow.agents.conversation import build_request, chat_messages

__all__ = [
    "REGISTRY",
    "Agent",
    "AgentBase",
    "Decision",
    "StepContext",
    "agent_class",
    "build_request",
    "chat_messages",
    "make_agent",
    "validate_agent_section",
]
