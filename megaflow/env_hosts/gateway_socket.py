"""The per-episode model gateway seen from inside a container that has no network.

Episode containers run with ``network_mode: none``. To reach the gateway without any route out,
each env host serves the gateway on a Unix socket in a host directory of its own
(``gateway_socket_dir``, default ``STATE_DIR/gateway/<host>``), and every container it boots
gets that directory bind-mounted read-only at :data:`CONTAINER_DIR`. An installed agent then
talks plain HTTP to a tiny loopback relay (:data:`RELAY_SOURCE`, python3 standard library only)
that the env host starts detached in the container before the agent: it listens on
``127.0.0.1:PORT`` and copies each connection to and from the socket. The container's own
network namespace keeps only ``lo``; the socket reaches one server, the gateway, whose keys name
one live episode each.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CONTAINER_DIR = "/run/megaflow"  # where the host's socket directory appears in every container
SOCKET_NAME = "gateway.sock"
CONTAINER_SOCKET = f"{CONTAINER_DIR}/{SOCKET_NAME}"
OFF = "off"

# The in-container relay: argv = port, socket path, ready file (written once it listens).
RELAY_SOURCE = r"""
import socket, sys, threading

port, path, ready = int(sys.argv[1]), sys.argv[2], sys.argv[3]
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(128)
open(ready, "w").close()
BODY = b'{"error": {"message": "megaflow relay: the gateway socket refused the connection", "code": 502}}'
BAD = b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"


def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(conn):
    try:
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(path)
    except OSError:
        conn.sendall(BAD % (len(BODY), BODY))
        conn.close()
        return
    back = threading.Thread(target=pump, args=(up, conn), daemon=True)
    back.start()
    pump(conn, up)
    back.join()
    conn.close()
    up.close()


while True:
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def host_dir(settings: Any, host: str) -> str | None:
    """The host directory holding this env host's gateway socket; None when the socket is off."""
    raw = (getattr(settings, "gateway_socket_dir", "") or "").strip()
    if raw == OFF:
        return None
    base = Path(raw) if raw else Path(settings.state_dir) / "gateway"
    safe = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in host) or "host"
    return str(base.absolute() / safe)


def host_socket(settings: Any, host: str) -> str | None:
    """The host path of this env host's gateway socket (None when off)."""
    d = host_dir(settings, host)
    return os.path.join(d, SOCKET_NAME) if d else None


def binds(settings: Any, host: str) -> dict[str, dict[str, str]] | None:
    """Docker ``binds`` that put the host's socket directory at CONTAINER_DIR, read-only (None when off).

    The directory is created here (mode 0755) so that Docker never creates it as root-only.
    """
    d = host_dir(settings, host)
    if d is None:
        return None
    os.makedirs(d, mode=0o755, exist_ok=True)
    return {d: {"bind": CONTAINER_DIR, "mode": "ro"}}


def relay_port(base_url: str) -> int | None:
    """The loopback port a relay must listen on for ``base_url`` (None: not a loopback URL, no relay)."""
    try:
        parts = urlsplit(base_url)
        port = parts.port
    except ValueError:
        return None
    if parts.hostname not in ("127.0.0.1", "localhost") or parts.scheme != "http":
        return None
    return port or 80


def relay_start_script(port: int, run_dir: str) -> str:
    """Shell lines that start the relay detached (own session) and wait until it listens.

    Without the socket in the container (another env backend, or the socket turned off) they
    only say so: the agent still gets its OPENAI_* variables.
    """
    d = shlex.quote(run_dir)
    eof = "MF_RELAY_EOF"
    return (
        f"if [ -S {CONTAINER_SOCKET} ]; then\n"
        f"mkdir -p {d}\n"
        f"cat > {d}/relay.py <<'{eof}'\n{RELAY_SOURCE}\n{eof}\n"
        f"setsid nohup python3 {d}/relay.py {int(port)} {CONTAINER_SOCKET} {d}/relay.ready "
        f"> {d}/relay.log 2>&1 < /dev/null &\n"
        f"i=0; while [ ! -f {d}/relay.ready ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
        f'if [ ! -f {d}/relay.ready ]; then echo "megaflow: the gateway relay did not start"; '
        f"cat {d}/relay.log; exit 1; fi\n"
        f'echo "megaflow: gateway relay on 127.0.0.1:{int(port)} -> {CONTAINER_SOCKET}"\n'
        "else\n"
        f'echo "megaflow: no gateway socket at {CONTAINER_SOCKET}: no relay started"\n'
        "fi\n"
    )
