# The two commands of the README. Both set up what is missing first (scripts/setup.sh).
.PHONY: demo test setup bench lint

demo:
	bash scripts/setup.sh
	.venv/bin/megaflow demo

test:
	bash scripts/setup.sh --test
	bash scripts/lint.sh
	.venv/bin/python -m pytest -q

setup:
	bash scripts/setup.sh --test

bench:
	.venv/bin/python bench/dispatch.py

lint:
	bash scripts/lint.sh
