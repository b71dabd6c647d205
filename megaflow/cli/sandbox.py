"""``megaflow sandbox serve``: the SWE-ReX-compatible sandbox API over HTTP (loopback by default);
``megaflow sandbox gateway``: the per-episode OpenAI-compatible gateway of installed agents.

Mount in megaflow/cli/main.py with ``app.add_typer(sandbox_app, name="sandbox")``.
"""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from megaflow.cli.base import App, load_settings

app = App(help="Sandboxes for frameworks with their own loop (SWE-ReX compatible).")


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; keep loopback unless a proxy fronts it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8880,
    admin_token: Annotated[
        str | None,
        typer.Option(
            envvar="MEGAFLOW_SANDBOX_ADMIN_TOKEN", help="If set, creating a sandbox needs it in X-Admin-Token."
        ),
    ] = None,
    idle_timeout_s: Annotated[
        float, typer.Option(min=1.0, help="Close a sandbox that saw no operation for this long.")
    ] = 600.0,
) -> None:
    """Serve sandboxes on this fleet's env hosts; each sandbox gets its own token (X-API-Key)."""
    from megaflow.sandbox.http import SandboxHTTPServer
    from megaflow.services.root import Root
    from megaflow.services.sandbox_api import SandboxService

    settings = load_settings()
    root = Root(settings, role="client")
    server = SandboxHTTPServer(
        SandboxService(root, idle_timeout_s=idle_timeout_s), host, port, admin_token=admin_token
    ).start()
    typer.echo(f"sandbox API on {server.url} (SWE-ReX RemoteRuntime: host={server.url}, auth_token=<sandbox token>)")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    root.close()


@app.command("gateway")
def gateway(
    host: Annotated[str, typer.Option(help="Address to bind (loopback: containers reach it through a relay).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8881,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="Call the model backend here, not through the model queue.")
    ] = False,
) -> None:
    """Serve the per-episode OpenAI-compatible gateway (/v1/chat/completions; the key names the episode).

    Env workers already serve it to their containers on a Unix socket; this is for programs elsewhere.
    Each call is a model-queue task (model workers answer) unless ``--in-process``.
    """
    from megaflow.sandbox.gateway_http import GatewayHTTPServer
    from megaflow.services.episode_gateway import EpisodeGateway, call_limit
    from megaflow.services.root import Root

    settings = load_settings()
    root = Root(settings, role="client")
    gw = EpisodeGateway(root, in_process=in_process)
    server = GatewayHTTPServer(gw, host, port, max_calls=call_limit(settings)).start()
    typer.echo(f"episode gateway on {server.url} (OPENAI_BASE_URL={server.url}, OPENAI_API_KEY=<episode key>)")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    root.close()
