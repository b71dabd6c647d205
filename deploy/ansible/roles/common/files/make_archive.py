"""Pack a MegaFlow checkout into a reproducible .tar.gz (same tree, same bytes), so that copying it
to hosts is idempotent: an unchanged checkout gives an unchanged archive and restarts nothing.

usage: make_archive.py SRC_DIR OUT_FILE
"""

import gzip
import io
import os
import sys
import tarfile

SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "node_modules",
    "build",
    "dist",
    ".tox",
}
SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")
# Operator files next to the playbooks that must never travel to hosts.
SKIP_FILES = {"inventory.ini", "vault.yml"}


def members(src: str):
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(SKIP_SUFFIXES))
        for name in sorted(files):
            if name in SKIP_FILES or name.endswith(SKIP_SUFFIXES):
                continue
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path, os.path.relpath(path, src)


def main(src: str, out: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, rel in members(src):
            info = tarfile.TarInfo(rel)
            info.size = os.path.getsize(path)
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.mtime = 0
            with open(path, "rb") as fh:
                tar.addfile(info, fh)
    data = gzip.compress(buf.getvalue(), mtime=0)
    tmp = out + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
