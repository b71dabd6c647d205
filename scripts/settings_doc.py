"""Print the settings table of the README from megaflow.core.settings.Settings (one row per field)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaflow.core.settings import Settings  # noqa: E402


def table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = {"state_dir": "~/.megaflow", "host_name": "hostname", "model_endpoints": "[]"}.get(name, "")
        else:
            default = "" if field.default in (None, "") else str(field.default)
        doc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `MEGAFLOW_{name.upper()}` | {default} | {doc} |")
    return "\n".join(rows)


START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def write(readme: Path) -> None:
    """Replace the block between the settings markers of ``readme`` with the current table."""
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write(Path(sys.argv[2]))
    else:
        print(table())
