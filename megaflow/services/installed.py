"""The env host's watch over an installed agent: poll its end with a countdown, holding no worker slot.

An installed agent (megaflow.agents.installed) that decides ``wait`` leaves a check command in the
episode's ``pending`` field; the ``megaflow.env.watch`` task runs it (one short exec) and, while the
program still runs, the episode is not cancelled and its deadline is ahead, asks to be sent again
after ``poll_s``; otherwise it records the check's result and hands the episode back to its agent.

With ``gateway: true`` the first poll starts the program itself, with a fresh key naming the episode
(``OPENAI_API_KEY``) and ``OPENAI_BASE_URL``; for a loopback base URL it first starts the relay of
megaflow.env_hosts.gateway_socket in the container, which forwards to this env host's gateway socket
(:func:`serve_gateway_socket`, started by the env worker): the container keeps no network.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from megaflow.agents.installed import RUN_DIR
from megaflow.core.errors import InfraError
from megaflow.engine.episodes import to_agent
from megaflow.env_hosts.gateway_socket import host_socket, relay_port, relay_start_script
from megaflow.services.episode_gateway import EpisodeGateway, call_limit

if TYPE_CHECKING:
    from megaflow.services.root import Root

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 30.0
AGAIN = "again:"  # prefix of the result that asks for another poll: "again:<countdown seconds>"


class InstalledWatch:
    """Polls installed agents' ends on this env host."""

    def __init__(self, root: Root):
        self.root = root

    def poll(self, episode_id: str, step: int) -> str:
        """One check; returns ``again:<s>`` (send me again after s seconds), ``ok`` or ``dropped``."""
        rt = self.root
        ep = rt.engine.claim(episode_id, step)
        if ep is None:
            return "dropped"
        if not ep.container:
            raise InfraError(f"episode {ep.id} has no sandbox at step {ep.step} (state {ep.state})")
        pending = ep.pending or {}
        if pending.get("start") and ep.fields.get("installed_started") != "1":
            return self._start(ep, pending)
        command = pending.get("command") or ""
        res = rt.env_host.execute(ep.container, command, timeout=CHECK_TIMEOUT_S, workdir=ep.spec.workdir)
        running = res.exit_code == 0 and "MF_STATUS running" in res.output
        ahead = time.time() < float(pending.get("deadline") or 0)
        if running and ahead and ep.fields.get("cancel") != "1":
            return f"{AGAIN}{float(pending.get('poll_s') or 2.0):g}"
        record = res.history_record(command)
        gateway = EpisodeGateway(rt)
        calls = gateway.records(ep.id)  # the program's model calls through its gateway, in order
        if (
            rt.engine.advance(
                ep,
                history=[*calls, record],
                fields={"pending": ""},
                next_task=to_agent(),
                incr={"model_calls": len(calls)} if calls else None,
            )
            and calls
        ):
            gateway.forget(ep.id, len(calls))
        return "ok"

    def _start(self, ep, pending: dict) -> str:
        """Start the program with a gateway key naming the episode; a failed start goes back to the agent."""
        rt = self.root
        key = EpisodeGateway(rt).issue_key(ep.id)
        base_url = str(pending.get("gateway_base_url") or "")
        env = {"OPENAI_API_KEY": key, "OPENAI_BASE_URL": base_url}
        port = relay_port(base_url)
        start = (relay_start_script(port, RUN_DIR) if port else "") + pending["start"]
        res = rt.env_host.execute(ep.container, start, timeout=CHECK_TIMEOUT_S, env=env)
        if res.exit_code == 0 and not res.timed_out:
            rt.engine.advance(ep, keep_step=True, fields={"installed_started": "1"})
            return f"{AGAIN}{float(pending.get('poll_s') or 2.0):g}"
        record = {
            "role": "env",
            "kind": "installed_start",
            "exit_code": res.exit_code,
            "output": res.output,
            "timed_out": res.timed_out,
        }
        rt.engine.advance(ep, history=[record], fields={"pending": ""}, next_task=to_agent())
        return "ok"


def serve_gateway_socket(root: Root):
    """Serve the episode gateway on this env host's Unix socket (mounted into its containers).

    Returns the running server (``stop()`` it at shutdown), or None when the socket is off or the
    env backend has no containers to mount it into.
    """
    from megaflow.sandbox.gateway_http import UnixGatewayServer

    if getattr(root.env_host, "backend", "") != "docker":
        return None
    path = host_socket(root.settings, root.host)
    if path is None:
        return None
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    limit = call_limit(root.settings)
    server = UnixGatewayServer(EpisodeGateway(root), path, max_calls=limit).start()
    log.info("episode gateway on unix socket %s (at /run/megaflow in containers; %d calls at once)", path, limit)
    return server
