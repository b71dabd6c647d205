#!/usr/bin/env bash
# Static checks `make test` runs before the tests: layers, lint, format, types (and Ansible when present).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\033[1m[lint]\033[0m %s\n' "$*"; }
say "import-linter (layers, no cycles)"; .venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
say "ruff check";                        .venv/bin/ruff check megaflow tests bench scripts examples
say "ruff format --check";               .venv/bin/ruff format --check megaflow tests bench scripts examples
say "mypy megaflow";                     .venv/bin/mypy megaflow
if [ -x .venv/bin/ansible-lint ] && [ -f deploy/ansible/.ansible-lint ]; then
  say "ansible-lint --profile production"
  PATH="$PWD/.venv/bin:$PATH" .venv/bin/ansible-lint --profile production -c deploy/ansible/.ansible-lint deploy/ansible
fi
say "clean"
