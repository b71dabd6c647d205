"""A bounded reader of task files (JSONL, or one JSON list): whatever the path names, a SpecError.

A directory, ``/dev/zero``, a binary or UTF-16 file, invalid UTF-8, deeply nested or huge JSON all end
in one message naming the file (and line) and the fix, never a traceback or an endless read.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
from pathlib import Path
from typing import Any

from megaflow.core.errors import SpecError

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # Settings.max_task_file_bytes' default
CHUNK = 1 << 16
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))  # fmt: skip


def _open_checked(path: Path, max_bytes: int) -> Any:
    """The file opened for binary reading, after refusing what is no readable file of bounded size."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; give a JSONL file of task specs") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise SpecError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise SpecError(f"{path}: is a directory; give a JSONL file of task specs (one JSON object a line)")
    if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
        raise SpecError(f"{path}: {st.st_size:,} bytes is above MEGAFLOW_MAX_TASK_FILE_BYTES ({max_bytes:,}); "
                        "split the file or raise the setting")  # fmt: skip
    try:
        return open(path, "rb")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def read_text(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The file's UTF-8 text, read in chunks up to ``max_bytes`` (a pipe or device is read the same way)."""
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    size = 0
    with _open_checked(path, max_bytes) as fh:
        while True:
            try:
                chunk = fh.read(CHUNK)
            except OSError as exc:
                raise SpecError(f"{path}: cannot read it ({exc.strerror or exc})") from None
            if size == 0:
                for bom, name in _BOMS:
                    if chunk.startswith(bom):
                        raise SpecError(f"{path}: is {name} text; save it as UTF-8 (one JSON object a line)")
                chunk = chunk.removeprefix(codecs.BOM_UTF8)
            if b"\x00" in chunk:
                line = b"".join(p.encode() for p in parts).count(b"\n") + chunk[: chunk.index(b"\x00")].count(b"\n")
                raise SpecError(f"{path}:{line + 1}: holds NUL bytes (a binary or UTF-16 file?); "
                                "give UTF-8 JSONL text")  # fmt: skip
            size += len(chunk)
            if size > max_bytes:
                raise SpecError(f"{path}: more than {max_bytes:,} bytes (MEGAFLOW_MAX_TASK_FILE_BYTES); "
                                "split the file or raise the setting")  # fmt: skip
            try:
                parts.append(decoder.decode(chunk, final=not chunk))
            except UnicodeDecodeError as exc:
                bad = bytes(exc.object)  # the decoder's buffered bytes plus this chunk
                line = "".join(parts).count("\n") + bad[: exc.start].count(b"\n") + 1
                what = f"byte 0x{bad[exc.start]:02x}" if exc.start < len(bad) else "cut off at the end"
                raise SpecError(f"{path}:{line}: not UTF-8 text ({what}); save the file as UTF-8") from None
            if not chunk:
                return "".join(parts)


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise SpecError(f"{where}: JSON nested too deeply; flatten it") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise SpecError(f"{where}: not valid JSON ({str(exc)[:120]})") from None


def read_records(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[str, Any]]:
    """(where, record) pairs of a JSONL file (or a file holding one JSON list); ``where`` is FILE:LINE."""
    text = read_text(path, max_bytes=max_bytes)
    if text.lstrip().startswith("["):
        records = _loads(text, str(path))
        if not isinstance(records, list):
            raise SpecError(f"{path}: not a JSON list of task specs")
        return [(f"{path}[{i}]", r) for i, r in enumerate(records)]
    out = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if line.strip():
            out.append((f"{path}:{n}", _loads(line, f"{path}:{n}")))
    return out
