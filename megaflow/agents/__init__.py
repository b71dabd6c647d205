"""The agent service: step-based agents that decide an episode's next action from its history.

``make_agent(spec, settings)`` picks the implementation named by ``AgentSpec.type``: ``bash``
(megaflow.agents.bash) or ``mini``, the mini-swe-agent compatible mode (megaflow.agents.mini).
"""

from __future__ import annotations

from typing import Any

from megaflow.agents.bash import Action, BashAgent
from megaflow.core.spec import AgentSpec


def make_agent(spec: AgentSpec, settings: Any = None) -> BashAgent:
    """The agent for ``spec``; limits not set in the spec come from settings."""
    max_steps = getattr(settings, "max_steps", None) or 50
    if spec.type == "mini":
        from megaflow.agents.mini import MiniAgent

        return MiniAgent(spec, max_steps=max_steps)
    return BashAgent(spec, max_steps=max_steps)


__all__ = ["Action", "BashAgent", "make_agent"]
