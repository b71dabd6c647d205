"""Credentials go only where an operator configured them (issue 17, Access).

Real HTTP servers on loopback record the Authorization header they receive: the fleet's model key
reaches configured and registered endpoints only; the registry password reaches only
MEGAFLOW_REGISTRY_URL's host, through a real ``docker pull``.
"""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openai_server import OpenAIServer
from pydantic import SecretStr

from megaflow.core.errors import InfraError
from megaflow.core.keys import Keys
from megaflow.env_hosts.images import image_registry, pull_image, registry_auth, registry_host
from megaflow.model_gateway import ModelRequest, load_backend
from megaflow.model_gateway.registry import register_endpoint

KEY = "sk-fleet-secret-0123456789"
PASSWORD = "registry-secret-9876543210"


def backend(settings, redis_client, endpoints):
    update = {
        "model_backend": "openai",
        "model_name": "test-model",
        "model_endpoints": endpoints,
        "model_api_key": SecretStr(KEY),
        "model_max_retries": 0,
        "model_retry_budget_s": 10.0,
    }
    return load_backend("openai", settings.model_copy(update=update), redis_client)


def ask(b, **model):
    msgs = [{"role": "user", "content": "hello"}]
    return b.complete(ModelRequest(messages=msgs, model=model, session_id="ep-1", step=0))


def auth_seen(server: OpenAIServer) -> list[str | None]:
    return [r["headers"].get("authorization") for r in server.requests]


def test_model_key_goes_to_configured_endpoint_only(settings, redis_client):
    with OpenAIServer("ops") as ops, OpenAIServer("user") as user:
        b = backend(settings, redis_client, [ops.base_url])
        try:
            assert ask(b).endpoint.startswith(ops.base_url)
            assert ask(b, endpoints=[user.base_url]).endpoint.startswith(user.base_url)
            assert ask(b, base_url=user.base_url + "/").endpoint.startswith(user.base_url)
        finally:
            b.close()
    assert auth_seen(ops) == [f"Bearer {KEY}"]
    assert auth_seen(user) == [None, None]  # a spec's own endpoint: no key at all


def test_model_key_goes_to_registered_endpoint(settings, redis_client):
    with OpenAIServer("served") as served, OpenAIServer("other") as other:
        register_endpoint(redis_client, Keys(settings.key_prefix), "test-model", served.base_url, ttl=60)
        b = backend(settings, redis_client, [])
        try:
            assert ask(b, endpoints=[served.base_url]).endpoint.startswith(served.base_url)
            # registered for another model name: the spec's model name decides, so no key
            assert ask(b, endpoints=[other.base_url], model_name="x").endpoint.startswith(other.base_url)
        finally:
            b.close()
    assert auth_seen(served) == [f"Bearer {KEY}"]
    assert auth_seen(other) == [None]


def test_unconfigured_endpoint_refusal_names_the_fix(settings, redis_client):
    from megaflow.model_gateway.errors import ModelAuthError

    with OpenAIServer("user") as user:
        user.inject("401", 5)
        b = backend(settings, redis_client, [])
        try:
            with pytest.raises(ModelAuthError, match="MEGAFLOW_MODEL_ENDPOINTS"):
                ask(b, endpoints=[user.base_url])
        finally:
            b.close()
    assert auth_seen(user) == [None]


# --- the registry -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image", "host"),
    [
        ("python:3.12", "docker.io"),
        ("org/app:1", "docker.io"),
        ("reg.example.com/a/b:1", "reg.example.com"),
        ("127.0.0.1:5000/x", "127.0.0.1:5000"),
        ("localhost/x", "localhost"),
        ("index.docker.io/library/x", "docker.io"),
        ("Reg.Example.com:443/x@sha256:ab", "reg.example.com:443"),
    ],
)
def test_image_registry_follows_dockers_rule(image, host):
    assert image_registry(image) == host


def test_registry_auth_only_for_the_configured_host(settings):
    s = settings.model_copy(
        update={
            "registry_url": "https://reg.example.com/v2/",
            "registry_username": "u",
            "registry_password": SecretStr(PASSWORD),
        }
    )
    assert registry_host(s.registry_url) == "reg.example.com"
    assert registry_auth("reg.example.com/team/img:1", s)["password"] == PASSWORD
    for other in ("evil.example.net/img:1", "python:3.12", "reg.example.com.evil.net/x", "127.0.0.1:5000/x"):
        assert registry_auth(other, s) is None
    hub = settings.model_copy(update={"registry_username": "u", "registry_password": SecretStr(PASSWORD)})
    assert registry_auth("org/app:1", hub) is not None and registry_auth("ghcr.io/org/app:1", hub) is None


class _Registry(ThreadingHTTPServer):
    """A registry stub on loopback: every request gets 401 (Basic challenge); Authorization headers recorded."""

    daemon_threads = True

    def __init__(self):
        self.auth: list[str | None] = []
        self.paths: list[str] = []
        super().__init__(("127.0.0.1", 0), _RegistryHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _RegistryHandler(BaseHTTPRequestHandler):
    server: _Registry

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.server.paths.append(self.path)
        self.server.auth.append(self.headers.get("Authorization"))
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="stub"')
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET


def test_registry_password_reaches_only_the_configured_registry(docker_client, settings):
    ops, evil = _Registry(), _Registry()
    try:
        s = settings.model_copy(
            update={
                "registry_url": f"http://{ops.host}",
                "registry_username": "fleet",
                "registry_password": SecretStr(PASSWORD),
                "pull_timeout_s": 30,
            }
        )
        for registry in (ops, evil):
            with pytest.raises(InfraError):
                pull_image(docker_client, f"{registry.host}/team/img:1", s)
        assert evil.paths, "the docker engine never reached the stub registry"
        basic = "Basic " + base64.b64encode(f"fleet:{PASSWORD}".encode()).decode()
        assert basic in ops.auth
        assert not any(evil.auth), f"credentials sent to a registry nobody configured: {evil.auth}"
    finally:
        for registry in (ops, evil):
            registry.shutdown()
            registry.server_close()
