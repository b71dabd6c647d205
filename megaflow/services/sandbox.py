"""What every sandbox of an episode gets: its labels and its set-up (work dir, files, set-up commands).

Shared by the env step (the episode's sandbox) and evaluation (a fresh sandbox from the same image).
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from megaflow.core.errors import TaskError

if TYPE_CHECKING:
    from megaflow.env_hosts.base import EnvHandle
    from megaflow.services.root import Root


def labels(rt: Root, ep) -> dict[str, str]:
    return {
        "megaflow.run": ep.batch_id,
        "megaflow.episode": ep.id,
        "megaflow.user": ep.user,
        "megaflow.host": rt.host,
        "megaflow.prefix": rt.settings.key_prefix,
    }


def setup(rt: Root, handle: EnvHandle | dict[str, Any], spec) -> None:
    rt.env_host.execute(handle, f"mkdir -p {shlex.quote(spec.workdir)}", timeout=rt.settings.command_timeout_s)
    if spec.files:
        rt.env_host.put_files(handle, spec.files)
    for command in spec.setup:
        res = rt.env_host.execute(handle, command, timeout=rt.settings.command_timeout_s, workdir=spec.workdir)
        if res.timed_out or res.exit_code != 0:
            raise TaskError(f"set-up command failed (exit {res.exit_code}): {command[:200]}\n{res.output[-1000:]}")
