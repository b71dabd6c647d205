"""Eval scripts for rows that do not carry one (pre-5.x SWE-bench rows, SWE-rebench, MegaFlow rows).

Harness 5.x rows ship their own ``eval_script``; it is used as is. Older rows get a script of the
same shape as the harness's: activate the testbed env, reset the test files to the base commit,
apply the test patch, run the repository's test command on the test *files* of the test patch
between the start/end markers, reset the test files again. Test ids never go on the command line.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

HEREDOC = "EOF_114329324912"
CONDA = "if [ -f /opt/miniconda3/bin/activate ]; then source /opt/miniconda3/bin/activate; conda activate testbed; fi"
# The repository's own test command (swebench 4.x's MAP_REPO_VERSION_TO_SPECS test_cmd, which 5.x rows bake
# into their eval_script); a row's ``test_cmd`` wins.
PYTEST = "pytest -rA"
REPO_TEST_CMD = {
    "django/django": "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1",
    "sympy/sympy": "PYTHONWARNINGS='ignore::UserWarning,ignore::SyntaxWarning' bin/test -C --verbose",
    "astropy/astropy": "pytest -rA -vv -o console_output_style=classic --tb=no",
    "mwaskom/seaborn": "pytest --no-header -rA",
    "sphinx-doc/sphinx": "tox --current-env -epy39 -v --",
}
_NEW_FILE = re.compile(r"^diff --git a/.* b/(.*)$", re.MULTILINE)
_OLD_FILE = re.compile(r"^--- a/(.*)$", re.MULTILINE)


def test_files(test_patch: str) -> list[str]:
    """Files the test patch modifies (``--- a/`` side), reset to the base commit around the run."""
    return list(dict.fromkeys(_OLD_FILE.findall(test_patch or "")))


def test_directives(repo: str, test_patch: str) -> list[str]:
    """What the test command is given: the test patch's files (Django: dotted module labels)."""
    from megaflow.swebench.harness import constants

    skip = tuple(constants().NON_TEST_EXTS)
    out = [d for d in dict.fromkeys(_NEW_FILE.findall(test_patch or "")) if not d.endswith(skip)]
    if repo == "django/django":
        out = [d.removesuffix(".py").removeprefix("tests/").replace("/", ".") for d in out]
    return out


def heredoc_delimiter(text: str) -> str:
    delim = HEREDOC
    while delim in text:
        delim += "_X"
    return delim


def make_eval_script(row: dict[str, Any], *, workdir: str, base: str) -> str:
    """A harness-shaped eval script for ``row`` (``test_cmd`` or the repo's command, ``test_patch``)."""
    from megaflow.swebench.harness import constants

    c = constants()
    repo = row.get("repo") or ""
    test_patch = row.get("test_patch") or ""
    command = row.get("test_cmd") or REPO_TEST_CMD.get(repo, PYTEST)
    files = " ".join(shlex.quote(f) for f in test_files(test_patch))
    reset = f"git checkout {shlex.quote(base)} {files}" if files else ""
    lines = [
        "#!/bin/bash",
        "set -uxo pipefail",
        CONDA,
        f"cd {shlex.quote(workdir)}",
        f"git config --global --add safe.directory {shlex.quote(workdir)}",
        CONDA,
    ]
    lines += list(row.get("eval_setup") or [])
    if reset:
        lines.append(reset)
    if test_patch.strip():
        delim = heredoc_delimiter(test_patch)
        body = test_patch if test_patch.endswith("\n") else test_patch + "\n"
        lines.append(f"git apply -v - <<'{delim}'\n{body}{delim}")
    directives = " ".join(shlex.quote(d) for d in test_directives(repo, test_patch))
    lines += [f": '{c.START_TEST_OUTPUT}'", f"{command} {directives}".strip(), f": '{c.END_TEST_OUTPUT}'"]
    if reset:
        lines.append(reset)
    return "\n".join(lines) + "\n"
