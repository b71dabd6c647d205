"""``megaflow model ...``: serve a model with vLLM on a GPU host and join the fleet; list endpoints.

``megaflow model serve MODEL`` starts ``vllm serve MODEL`` with the flags the gateway expects
(``--max-num-seqs`` = ``endpoint_concurrency``, so requests queue in Redis rather than inside
vLLM; prefix caching on, for sticky episodes; completion tokens returned as token ids, for RL;
the API key from ``MEGAFLOW_MODEL_API_KEY`` through ``VLLM_API_KEY``), waits until
``/v1/models`` answers, then registers ``http://HOST:PORT/v1`` under the served model name in
Redis and renews it every few seconds while the server answers. On exit (SIGTERM, Ctrl-C, or vLLM
ending) it deregisters first. A host that dies drops out after ``model_endpoint_ttl_s``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from typing import Annotated, Any

import typer

from megaflow.cli.base import JSON_HELP, App, echo_json, load_settings

app = App(help="Model hosts: serve a model with vLLM and join the fleet.")

GPU_INSTALL = "pip install -r requirements-gpu.txt"


def _settings() -> Any:
    return load_settings()


def vllm_command(
    model: str,
    *,
    host: str,
    port: int,
    gpu_memory_utilization: float,
    served_model_name: str,
    max_num_seqs: int,
    token_ids: bool,
    extra: list[str],
) -> list[str]:
    """The ``vllm serve`` command line the fleet expects."""
    cmd = [
        shutil.which("vllm") or "vllm",
        "serve",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--gpu-memory-utilization",
        str(gpu_memory_utilization),
        "--served-model-name",
        served_model_name,
        "--max-num-seqs",
        str(max_num_seqs),
        "--enable-prefix-caching",
        "--disable-uvicorn-access-log",
    ]
    if token_ids:
        cmd.append("--return-tokens-as-token-ids")
    return cmd + list(extra)


def _answers(url: str, headers: dict[str, str], timeout: float = 5.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/models", headers=headers, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model to serve (a Hugging Face id or a local path).")],
    port: Annotated[int, typer.Option(help="Port of the vLLM server.")] = 8000,
    host: Annotated[str, typer.Option(help="Address the vLLM server binds.")] = "0.0.0.0",
    gpu_memory_utilization: Annotated[float, typer.Option(help="Share of GPU memory vLLM may use.")] = 0.9,
    served_model_name: Annotated[
        str,
        typer.Option(
            help="Name the fleet asks for (task spec model.model_name / MEGAFLOW_MODEL_NAME); default: MODEL."
        ),
    ] = "",
    advertise_url: Annotated[
        str, typer.Option(help="Base URL other hosts reach this server at; default http://HOST_NAME:PORT/v1.")
    ] = "",
    max_num_seqs: Annotated[
        int, typer.Option(help="Sequences vLLM batches at once; default: endpoint_concurrency.")
    ] = 0,
    token_ids: Annotated[bool, typer.Option(help="Return completion tokens as token ids (RL trajectories).")] = True,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for the model to load.")] = 1800.0,
) -> None:
    """Start ``vllm serve MODEL`` and register it as an endpoint; extra vLLM flags go after ``--``."""
    import redis

    from megaflow.core.keys import Keys
    from megaflow.model_gateway.registry import deregister_endpoint, register_endpoint

    if not shutil.which("vllm"):
        typer.echo(f"error: `vllm` is not installed on this host; on a GPU host run: {GPU_INSTALL}", err=True)
        raise typer.Exit(2)
    settings = _settings()
    name = served_model_name or model
    wildcard = host in ("0.0.0.0", "::", "")
    local = f"http://{'127.0.0.1' if wildcard else host}:{port}/v1"
    public = advertise_url or f"http://{settings.host_name if wildcard else host}:{port}/v1"
    env = None
    headers: dict[str, str] = {}
    if settings.model_api_key is not None:
        import os

        key = settings.model_api_key.get_secret_value()
        env = {**os.environ, "VLLM_API_KEY": key}
        headers["Authorization"] = f"Bearer {key}"
    cmd = vllm_command(
        model,
        host=host,
        port=port,
        gpu_memory_utilization=gpu_memory_utilization,
        served_model_name=name,
        max_num_seqs=max_num_seqs or settings.endpoint_concurrency,
        token_ids=token_ids,
        extra=ctx.args,
    )
    typer.echo("starting: " + " ".join(cmd))
    child = subprocess.Popen(cmd, env=env)
    stopping = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    keys = Keys(settings.key_prefix)
    ttl = settings.model_endpoint_ttl_s
    registered = False
    try:
        deadline = time.monotonic() + startup_timeout
        while not stopping and child.poll() is None and not _answers(local, headers, 2.0):
            if time.monotonic() > deadline:
                typer.echo(f"error: vLLM did not answer {local}/models within {startup_timeout:.0f}s", err=True)
                child.terminate()
                break
            time.sleep(1.0 if startup_timeout > 30 else 0.1)
        while not stopping and child.poll() is None:
            if _answers(local, headers):
                register_endpoint(client, keys, name, public, ttl)
                if not registered:
                    typer.echo(f"registered {public} for model {name!r} (TTL {ttl:.0f}s)")
                    registered = True
            sleep_until = time.monotonic() + ttl / 3
            while not stopping and child.poll() is None and time.monotonic() < sleep_until:
                time.sleep(0.1)
    finally:
        deregister_endpoint(client, keys, name, public)
        if registered:
            typer.echo(f"deregistered {public}")
        if child.poll() is None:
            child.terminate()
        try:
            code = child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        client.close()
    raise typer.Exit(0 if stopping else code)


@app.command("endpoints")
def endpoints(
    model_name: Annotated[str, typer.Argument(metavar="MODEL", help="Model name; default: MEGAFLOW_MODEL_NAME.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List a model's endpoints: outstanding requests, failures, health."""
    import redis

    from megaflow.core.keys import Keys
    from megaflow.model_gateway.pool import EndpointPool

    settings = _settings()
    name = model_name or settings.model_name
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    static = settings.model_endpoints if name == settings.model_name else []
    pool = EndpointPool(
        client,
        Keys(settings.key_prefix),
        name,
        static,
        concurrency=settings.endpoint_concurrency,
        lease_s=settings.model_timeout_s + 30,
    )
    try:
        rows = pool.status()
    finally:
        client.close()
    if as_json:
        echo_json({"model": name, "concurrency": settings.endpoint_concurrency, "endpoints": rows})
        return
    if not rows:
        typer.echo(f"model {name!r}: no endpoints")
    for row in rows:
        typer.echo(
            f"{row['endpoint']}  outstanding={row['outstanding']}/{settings.endpoint_concurrency}  "
            f"failures={row['failures']}  {'healthy' if row['healthy'] else 'OUT'}  "
            f"{'static' if row['static'] else 'registered'}"
        )


if __name__ == "__main__":  # python -m megaflow.cli.model serve ...
    from megaflow.cli.errors import run

    sys.exit(run(app))
