"""Store fixtures: every metadata backend and every artifact backend, real where it can run here.

- metadata: "sqlite" (a real file), "mongomock", and "mongo" (a real mongod) only when
  MEGAFLOW_TEST_MONGO_URL is set (no MongoDB server can be installed on the dev machine)
- artifacts: "file" (a real directory) and "s3" (moto in server mode: a real S3-protocol HTTP
  server on loopback, one per test session)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MONGO_URL = os.environ.get("MEGAFLOW_TEST_MONGO_URL")
METADATA_BACKENDS = ["sqlite", "mongomock"] + (["mongo"] if MONGO_URL else [])
ARTIFACT_BACKENDS = ["file", "s3"]

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def make_metadata_store(kind: str, tmp_path: Path, **kwargs):
    """A fresh, empty metadata store of ``kind``; the caller closes it."""
    if kind == "sqlite":
        from megaflow.stores.sqlite import SQLiteMetadataStore

        return SQLiteMetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    from megaflow.stores.mongo import MongoMetadataStore

    if kind == "mongomock":
        import mongomock

        return MongoMetadataStore("mongodb://localhost/mftest", client=mongomock.MongoClient(), **kwargs)
    if kind == "mongo":
        from pymongo import uri_parser

        parsed = uri_parser.parse_uri(MONGO_URL)
        base = MONGO_URL.split("?", 1)
        path_db = f"/{parsed['database']}" if parsed["database"] else ""
        host_part = base[0][: len(base[0]) - len(path_db)] if path_db else base[0].rstrip("/")
        url = f"{host_part}/mftest_{uuid.uuid4().hex[:10]}" + (f"?{base[1]}" if len(base) > 1 else "")
        return MongoMetadataStore(url, server_selection_timeout_ms=5000, **kwargs)
    raise ValueError(kind)


def drop_metadata_store(store) -> None:
    """Remove what a test left (a real MongoDB keeps its databases)."""
    client = getattr(store, "client", None)
    if client is not None and getattr(store, "_owns_client", False):
        client.drop_database(store.db.name)
    store.close()


class MotoServer:
    """``moto_server`` as a child process on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._admin = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(
            cmd + ["-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **S3_ENV},
        )
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    msg = "moto_server did not start (pip install -r requirements-dev.txt)"
                    if IN_CI:
                        pytest.fail(msg)
                    pytest.skip(msg)
                time.sleep(0.1)

    def admin(self):
        """One boto3 client for test set-up (creating a client per test is slow)."""
        if self._admin is None:
            import boto3

            self._admin = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        return self._admin

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback for the whole session, with dummy credentials in the env."""
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = MotoServer()
    server.start()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_bucket(server: MotoServer) -> str:
    """A new, empty bucket on the moto server."""
    bucket = f"mf-{uuid.uuid4().hex[:12]}"
    server.admin().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=METADATA_BACKENDS)
def metadata_store(request, tmp_path):
    """Every metadata backend, empty, closed after the test."""
    store = make_metadata_store(request.param, tmp_path)
    yield store
    drop_metadata_store(store)


@pytest.fixture(params=ARTIFACT_BACKENDS)
def artifact_store(request, tmp_path):
    """Every artifact backend, empty (a fresh directory or a fresh bucket)."""
    if request.param == "file":
        from megaflow.stores.local import LocalArtifactStore

        store = LocalArtifactStore(f"file://{tmp_path / 'artifacts'}")
    else:
        from megaflow.stores.s3 import S3ArtifactStore

        server = request.getfixturevalue("s3_server")
        store = S3ArtifactStore(
            f"s3://{make_bucket(server)}/runs", endpoint_url=server.endpoint, region="us-east-1", max_attempts=2
        )
    yield store
    store.close()
