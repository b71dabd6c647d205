"""The README stays current: its settings table is the one generated from Settings."""

from pathlib import Path

from scripts.settings_doc import END, START, table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_settings_table_is_current():
    text = (ROOT / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == table(), "run: .venv/bin/python scripts/settings_doc.py --write README.md"


def test_readme_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
