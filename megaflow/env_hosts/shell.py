"""Long-lived shell sessions for any backend that can run ``bash``: the state lives in the sandbox.

A session is a directory in the sandbox holding the shell's working directory and exported
variables. Each command is wrapped so that it starts from that state and saves it on exit
(``cd`` and ``export`` persist; a command killed at its time limit keeps the state from before
it). Since nothing lives in the worker process, any worker thread or process of the host can
run the next command of a session.
"""

from __future__ import annotations

import re
import shlex
import uuid

SESSION_ROOT = "/tmp/.megaflow-sessions"
_ID_OK = re.compile(r"[0-9a-f]{6,32}")


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def session_dir(session_id: str) -> str:
    if not _ID_OK.fullmatch(session_id or ""):
        raise ValueError(f"bad shell session id {session_id!r}")
    return f"{SESSION_ROOT}/{session_id}"


def open_script(session_id: str, workdir: str | None = None, env: dict | None = None) -> str:
    """The command that creates a session starting in ``workdir`` with ``env`` exported."""
    d = session_dir(session_id)
    exports = "".join(
        f"export {k}={shlex.quote(str(v))}\n"
        for k, v in (env or {}).items()
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k))
    )
    return (
        f"umask 077; mkdir -p {d} && cd {shlex.quote(workdir or '/')} && pwd > {d}/cwd && "
        f"printf %s {shlex.quote(exports)} > {d}/env"
    )


def wrap(session_id: str, command: str) -> str:
    """``command`` run from the session's saved state, saving the state again when the shell exits."""
    d = session_dir(session_id)
    return (
        f"__mf_d={d}\n"
        f'[ -d "$__mf_d" ] || {{ echo "megaflow: shell session {session_id} is closed" >&2; exit 127; }}\n'
        '. "$__mf_d/env"\n'
        'cd "$(cat "$__mf_d/cwd")" 2>/dev/null\n'
        "__mf_save() {\n"
        "  export -p | grep -v -E '^declare -x (PWD|OLDPWD|SHLVL|_)(=|$)' > \"$__mf_d/env.new\" && "
        'mv -f "$__mf_d/env.new" "$__mf_d/env"; pwd > "$__mf_d/cwd"\n'
        "}\n"
        "trap __mf_save EXIT\n"
        f"{command}\n"
    )


def close_script(session_id: str) -> str:
    return f"rm -rf {session_dir(session_id)}"
