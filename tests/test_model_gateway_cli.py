"""`megaflow model serve`: starts vLLM with the fleet's flags, registers the endpoint, deregisters on exit.

vLLM itself cannot run here (no GPU), so a `vllm` executable on PATH stands in for it: it records
its arguments and runs the loopback OpenAI-compatible server from tests/openai_server.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port
from typer.testing import CliRunner

from megaflow.cli.model import app
from megaflow.core.keys import Keys
from megaflow.model_gateway import ModelRequest, load_backend
from megaflow.model_gateway.registry import registered_endpoints
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_serve_without_vllm_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(app, ["serve", "some/model"])
    assert result.exit_code == 2
    assert "pip install -r requirements-gpu.txt" in result.output


def test_serve_registers_heartbeats_and_deregisters(tmp_path, settings, redis_server, redis_client):
    args_file = tmp_path / "vllm-args"
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(
        f'#!/bin/sh\necho "$@" > {args_file}\nshift\nexec {sys.executable} '
        f'{ROOT / "tests" / "openai_server.py"} --name gpu "$@"\n'
    )
    fake.chmod(0o755)
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "MEGAFLOW_REDIS_URL": redis_server.url,
        "MEGAFLOW_STATE_DIR": str(tmp_path / "state"),
        "MEGAFLOW_MODEL_ENDPOINT_TTL_S": "3",
        "MEGAFLOW_ENDPOINT_CONCURRENCY": "16",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megaflow.cli.model",
            "serve",
            "org/some-model",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            "fleet-model",
            "--",
            "--max-model-len",
            "2048",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:

        def registered() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            return registered_endpoints(redis_client, Keys(), "fleet-model") == [url]

        wait_until(registered, 30, "the endpoint to be registered")
        argv = args_file.read_text().split()
        assert argv[:2] == ["serve", "org/some-model"]
        for flag in (
            "--served-model-name fleet-model",
            "--max-num-seqs 16",
            "--port " + str(port),
            "--max-model-len 2048",
        ):
            assert flag in " ".join(argv)
        assert "--return-tokens-as-token-ids" in argv and "--enable-prefix-caching" in argv
        # the host joined the fleet: a gateway with no static endpoints reaches it
        backend = load_backend("openai", settings.model_copy(update={"model_endpoints": []}), redis_client)
        reply = backend.complete(
            ModelRequest(
                messages=[{"role": "user", "content": "hi"}], model={"model_name": "fleet-model"}, session_id="ep"
            )
        )
        assert reply.endpoint == url and reply.content == "gpu says: hi"
        time.sleep(1.5)  # past one heartbeat (TTL/3): still registered
        assert registered_endpoints(redis_client, Keys(), "fleet-model") == [url]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "registered" in out and "deregistered" in out
    assert registered_endpoints(redis_client, Keys(), "fleet-model") == []


def test_endpoints_lists_health_and_load(settings, redis_server, redis_client, monkeypatch):
    from megaflow.model_gateway.registry import register_endpoint

    monkeypatch.setenv("MEGAFLOW_REDIS_URL", redis_server.url)
    monkeypatch.setenv("MEGAFLOW_MODEL_NAME", "m1")
    monkeypatch.setenv("MEGAFLOW_MODEL_ENDPOINTS", "http://static:8000/v1")
    register_endpoint(redis_client, Keys(), "m1", "http://gpu7:8000/v1", ttl=30)
    redis_client.zadd(Keys().model("down", "m1"), {"http://gpu7:8000/v1": 9e15})
    result = CliRunner().invoke(app, ["endpoints"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("http://static:8000/v1" in line and "healthy" in line and "static" in line for line in lines)
    assert any("http://gpu7:8000/v1" in line and "OUT" in line and "registered" in line for line in lines)
