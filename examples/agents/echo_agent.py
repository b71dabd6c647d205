"""A user-defined MegaFlow agent: runs the shell commands of its config, then submits their outputs.

Submit it by dotted path (the module must be importable on the agent workers and the submitting
machine):

    {"task_id": "t1", "eval": {"command": "true"},
     "agent": {"type": "examples.agents.echo_agent:EchoAgent", "config": {"commands": ["ls", "pwd"]}}}

Each call of ``decide`` sees the newest history record (``ctx.last``: here a command's raw result,
role ``env``) and the JSON state the previous step returned (``ctx.state``).
"""

from __future__ import annotations

from typing import Any

from megaflow.agents import AgentBase, Decision, StepContext


class EchoAgent(AgentBase):
    """Runs ``config.commands`` one by one (no model call), then submits their outputs."""

    @classmethod
    def validate_section(cls, section: dict[str, Any]) -> dict[str, Any]:
        """Called at submit: reject a bad config with a message naming the key."""
        commands = (section.get("config") or {}).get("commands")
        if not commands or not all(isinstance(c, str) for c in commands):
            raise ValueError("config.commands must be a non-empty list of shell commands")
        return section

    def decide(self, ctx: StepContext) -> Decision:
        commands = self.spec.config["commands"]
        done, outputs = ctx.state.get("done", 0), list(ctx.state.get("outputs", []))
        if ctx.last.get("role") == "env":  # the raw result of the command we asked for
            outputs.append(str(ctx.last.get("output", "")).strip())
            done += 1
        state = {"done": done, "outputs": outputs}
        if done < len(commands):
            return Decision("exec", exec={"command": commands[done]}, state=state)
        note = {"role": "user", "content": f"Ran {done} commands."}
        return Decision("submit", records=[note], state=state, submission="\n".join(outputs))
