"""Built-in demo tasks: tiny Python repositories with one bug each, in SWE-bench instance form.

Each task has the buggy source, the fixed source (its diff is the reference ``patch``), and a
test file (the ``test_patch``) with a failing test (FAIL_TO_PASS) and a passing one (PASS_TO_PASS).
"""

from __future__ import annotations

import difflib
from typing import Any

from megaflow.core.spec import SUBMIT_WORD

_TASKS: list[dict[str, str]] = [
    dict(
        id="calc-add",
        mod="calc",
        problem="calc.add(2, 3) returns -1; it must return the sum.",
        before="def add(a, b):\n    return a - b\n",
        after="def add(a, b):\n    return a + b\n",
        fail="self.assertEqual(calc.add(2, 3), 5)",
        ok="self.assertTrue(callable(calc.add))",
    ),
    dict(
        id="parity-even",
        mod="parity",
        problem="parity.is_even(4) is False; even numbers must give True.",
        before="def is_even(n):\n    return n % 2 == 1\n",
        after="def is_even(n):\n    return n % 2 == 0\n",
        fail="self.assertTrue(parity.is_even(4)); self.assertFalse(parity.is_even(3))",
        ok="self.assertTrue(callable(parity.is_even))",
    ),
    dict(
        id="mathx-factorial",
        mod="mathx",
        problem="mathx.factorial(5) returns 24 instead of 120.",
        before="def factorial(n):\n    out = 1\n    for i in range(1, n):\n        out *= i\n    return out\n",
        after="def factorial(n):\n    out = 1\n    for i in range(1, n + 1):\n        out *= i\n    return out\n",
        fail="self.assertEqual(mathx.factorial(5), 120)",
        ok="self.assertEqual(mathx.factorial(0), 1)",
    ),
    dict(
        id="text-reverse-words",
        mod="text",
        problem="text.reverse_words('a b c') must return 'c b a'.",
        before="def reverse_words(s):\n    words = s.split()\n    return ' '.join(words)\n",
        after="def reverse_words(s):\n    words = s.split()\n    return ' '.join(reversed(words))\n",
        fail="self.assertEqual(text.reverse_words('a b c'), 'c b a')",
        ok="self.assertEqual(text.reverse_words(''), '')",
    ),
    dict(
        id="stats-max",
        mod="stats",
        problem="stats.max_of([-3, -1, -2]) returns 0; it must return -1.",
        before=(
            "def max_of(xs):\n    best = 0\n    for x in xs:\n        if x > best:\n            best = x\n"
            "    return best\n"
        ),
        after=(
            "def max_of(xs):\n    best = xs[0]\n    for x in xs:\n        if x > best:\n            best = x\n"
            "    return best\n"
        ),
        fail="self.assertEqual(stats.max_of([-3, -1, -2]), -1)",
        ok="self.assertEqual(stats.max_of([1, 5, 2]), 5)",
    ),
    dict(
        id="game-fizzbuzz",
        mod="game",
        problem="game.fizzbuzz(15) returns 'Fizz'; multiples of 15 must give 'FizzBuzz'.",
        before=(
            "def fizzbuzz(n):\n    if n % 3 == 0:\n        return 'Fizz'\n    if n % 15 == 0:\n"
            "        return 'FizzBuzz'\n    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)\n"
        ),
        after=(
            "def fizzbuzz(n):\n    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n"
            "        return 'Fizz'\n    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)\n"
        ),
        fail="self.assertEqual(game.fizzbuzz(15), 'FizzBuzz')",
        ok="self.assertEqual(game.fizzbuzz(3), 'Fizz')",
    ),
    dict(
        id="units-fahrenheit",
        mod="units",
        problem="units.c_to_f(100) returns 148; it must return 212.",
        before="def c_to_f(c):\n    return c * 9 / 5 - 32\n",
        after="def c_to_f(c):\n    return c * 9 / 5 + 32\n",
        fail="self.assertEqual(units.c_to_f(100), 212)",
        ok="self.assertTrue(callable(units.c_to_f))",
    ),
    dict(
        id="text-vowels",
        mod="vowels",
        problem="vowels.count_vowels('uu') returns 0; 'u' is a vowel too.",
        before="def count_vowels(s):\n    return sum(1 for ch in s.lower() if ch in 'aeio')\n",
        after="def count_vowels(s):\n    return sum(1 for ch in s.lower() if ch in 'aeiou')\n",
        fail="self.assertEqual(vowels.count_vowels('uu'), 2)",
        ok="self.assertEqual(vowels.count_vowels('abe'), 2)",
    ),
    dict(
        id="text-palindrome",
        mod="pal",
        problem="pal.is_palindrome('Anna') is False; the check must ignore case.",
        before="def is_palindrome(s):\n    return s == s[::-1]\n",
        after="def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]\n",
        fail="self.assertTrue(pal.is_palindrome('Anna'))",
        ok="self.assertTrue(pal.is_palindrome('abba'))",
    ),
    dict(
        id="num-clamp",
        mod="clamp",
        problem="clamp.clamp(15, 0, 10) returns 0; it must return 10.",
        before="def clamp(x, lo, hi):\n    return max(hi, min(lo, x))\n",
        after="def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n",
        fail="self.assertEqual(clamp.clamp(15, 0, 10), 10); self.assertEqual(clamp.clamp(-5, 0, 10), 0)",
        ok="self.assertTrue(callable(clamp.clamp))",
    ),
    dict(
        id="stats-mean-empty",
        mod="avg",
        problem="avg.mean([]) raises ZeroDivisionError; it must return 0.0.",
        before="def mean(xs):\n    return sum(xs) / len(xs)\n",
        after="def mean(xs):\n    if not xs:\n        return 0.0\n    return sum(xs) / len(xs)\n",
        fail="self.assertEqual(avg.mean([]), 0.0)",
        ok="self.assertEqual(avg.mean([1, 3]), 2.0)",
    ),
    dict(
        id="text-slug",
        mod="slug",
        problem="slug.slugify('Hello World') returns 'Hello-World'; slugs are lower case.",
        before="def slugify(s):\n    return '-'.join(s.split())\n",
        after="def slugify(s):\n    return '-'.join(s.lower().split())\n",
        fail="self.assertEqual(slug.slugify('Hello World'), 'hello-world')",
        ok="self.assertEqual(slug.slugify('a b'), 'a-b')",
    ),
]


def _diff(path: str, before: str, after: str) -> str:
    new = not before
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile="/dev/null" if new else f"a/{path}",
        tofile=f"b/{path}",
    )
    head = f"diff --git a/{path} b/{path}\n" + ("new file mode 100644\n" if new else "")
    return head + "".join(lines)


def _test_file(t: dict[str, str]) -> str:
    test_name = t["id"].replace("-", "_")
    return (
        f"import unittest\n\nimport {t['mod']}\n\n\nclass Test{t['mod'].title()}(unittest.TestCase):\n"
        f"    def test_{test_name}(self):\n        {t['fail']}\n\n"
        f"    def test_still_works(self):\n        {t['ok']}\n\n\nif __name__ == '__main__':\n    unittest.main()\n"
    )


def instances() -> list[dict[str, Any]]:
    """The demo tasks as SWE-bench-style instances (plus the repo files they start from)."""
    out = []
    for t in _TASKS:
        mod_path = f"{t['mod']}.py"
        test_path = f"tests/test_{t['mod']}.py"
        test_src = _test_file(t)
        test_cls = f"tests.test_{t['mod']}.Test{t['mod'].title()}"
        out.append(
            {
                "instance_id": f"demo__{t['id']}",
                "repo": f"megaflow-demo/{t['mod']}",
                "base_commit": "HEAD",
                "problem_statement": t["problem"],
                "patch": _diff(mod_path, t["before"], t["after"]),
                "test_patch": _diff(test_path, "", test_src),
                "FAIL_TO_PASS": [f"{test_cls}.test_{t['id'].replace('-', '_')}"],
                "PASS_TO_PASS": [f"{test_cls}.test_still_works"],
                "image_name": None,  # the sandbox image (settings.default_image)
                "test_cmd": "python3 -m unittest -v",
                "log_parser": "unittest",
                "repo_files": {mod_path: t["before"], "tests/__init__.py": "", "README.md": f"# {t['mod']}\n"},
                "test_files": {test_path: test_src},
            }
        )
    return out


def fix_replies(patch: str) -> list[str]:
    """Scripted replies that apply the reference fix, look at it, then submit."""
    return [
        f"I will apply the fix.\n```bash\ngit apply <<'MEGAFLOW_PATCH'\n{patch}MEGAFLOW_PATCH\n```",
        "Check the change.\n```bash\ngit diff --stat\n```",
        SUBMIT_WORD,
    ]


def noop_replies() -> list[str]:
    """Scripted replies that look around and submit without changing anything."""
    return ["```bash\nls -la\n```", SUBMIT_WORD]


def task_spec(
    inst: dict[str, Any], *, replies: list[str], image: str | None = None, mode: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """A TaskSpec dict that runs one demo instance with the given scripted replies.

    It is evaluated SWE-bench style (test patch, FAIL_TO_PASS / PASS_TO_PASS); see
    megaflow.datasets.instance_to_spec for the other options.
    """
    from megaflow.datasets import instance_to_spec

    return instance_to_spec(inst, model={"backend": "scripted", "replies": replies}, image=image, mode=mode, **kwargs)


def demo_specs(kind: str = "fix", *, grading: str = "swebench", **kwargs: Any) -> list[dict[str, Any]]:
    """Specs for every demo task: kind 'fix' (reference fix, all succeed) or 'noop' (all fail).

    ``grading`` 'swebench' grades like the SWE-bench harness (test patch in a fresh container,
    FAIL_TO_PASS / PASS_TO_PASS from the test log); 'exit_code' writes the tests and rewards the
    exit status of ``python3 -m unittest`` (what the ``sim`` env backend's demo preset answers).
    """
    if kind not in ("fix", "noop"):
        raise ValueError("kind must be 'fix' or 'noop'")
    if grading not in ("swebench", "exit_code"):
        raise ValueError("grading must be 'swebench' or 'exit_code'")
    specs = []
    for inst in instances():
        spec = task_spec(inst, replies=fix_replies(inst["patch"]) if kind == "fix" else noop_replies(), **kwargs)
        if grading == "exit_code":
            workdir = spec["workdir"].rstrip("/")
            spec["eval"] = {
                "command": "python3 -m unittest -v",
                "files": {f"{workdir}/{p}": src for p, src in inst["test_files"].items()},
            }
            spec["metadata"].pop("swebench", None)
        specs.append(spec)
    return specs
