"""Local artifact store: blobs as files under one directory (``file:///DIR``), the embedded default.

Writes are atomic (a temporary file in the same directory, fsync, rename), so a reader never
sees half a blob, even from another process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote

from megaflow.core.errors import ConfigError, NotFoundError, ServiceUnavailableError, SpecError

_TMP_PREFIX = ".mf-tmp-"


def file_root(url: str) -> Path:
    """The directory of a ``file:///DIR`` URL (or a plain path)."""
    if url.startswith("file://"):
        path = unquote(url[len("file://") :])
        if not path.startswith("/"):
            raise ConfigError(f"MEGAFLOW_ARTIFACTS_URL: file URL needs an absolute path (file:///DIR), got {url!r}")
        return Path(path)
    if "://" in url:
        raise ConfigError(f"MEGAFLOW_ARTIFACTS_URL: expected file:///DIR, got {url!r}")
    return Path(url).absolute()


def check_key(key: str) -> str:
    """``key`` if it is a safe relative blob key ("a/b/c.json"), else SpecError."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in key:
        raise SpecError(f"artifact key {key!r} must be a relative path without '.', '..' or empty parts", field="key")
    if parts[-1].startswith(_TMP_PREFIX):
        raise SpecError(f"artifact key {key!r} uses the reserved prefix {_TMP_PREFIX!r}", field="key")
    return key


class LocalArtifactStore:
    """ArtifactStore on a local directory; URIs are ``file:///DIR/KEY``."""

    def __init__(self, url_or_path: str):
        self.root = file_root(url_or_path)
        self.url = "file://" + str(self.root)

    # --- addressing ------------------------------------------------------------------------------
    def _key(self, uri_or_key: str) -> str:
        if uri_or_key.startswith("file://"):
            path = uri_or_key[len("file://") :]  # URIs are made by uri(): the key is not %-encoded
            root = str(self.root).rstrip("/") + "/"
            if not path.startswith(root):
                raise NotFoundError(f"artifact {uri_or_key} is not in the store {self.url}")
            return check_key(path[len(root) :])
        if "://" in uri_or_key:
            raise NotFoundError(f"artifact {uri_or_key} is not in the store {self.url}")
        return check_key(uri_or_key)

    def uri(self, key: str) -> str:
        """The URI of ``key`` in this store."""
        return f"{self.url.rstrip('/')}/{check_key(key)}"

    # --- ArtifactStore ---------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        key = check_key(key)
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        except OSError as exc:
            raise ServiceUnavailableError(f"artifact store {self.url}: cannot write {key}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return self.uri(key)

    def get_bytes(self, uri_or_key: str) -> bytes:
        key = self._key(uri_or_key)
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"artifact {key} not found in {self.url}") from None

    def exists(self, uri_or_key: str) -> bool:
        try:
            return (self.root / self._key(uri_or_key)).is_file()
        except NotFoundError:
            return False

    def delete(self, uri_or_key: str) -> None:
        try:
            (self.root / self._key(uri_or_key)).unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, NotFoundError):
            pass

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the deepest directory the prefix names; then filter by the string prefix.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base if base else self.root
        if ".." in base.split("/") or not start.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def close(self) -> None:
        """Nothing to release (symmetry with the S3 store)."""

    def __repr__(self) -> str:
        return f"LocalArtifactStore({self.url!r})"
