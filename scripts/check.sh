#!/usr/bin/env bash
# Static checks of the project's Python code: ruff (lint and format) and mypy (settings in
# pyproject.toml). Run by scripts/test.sh before the tests; needs the .venv of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m ruff check src tests benchmarks scripts
.venv/bin/python -m ruff format --check src tests benchmarks scripts
.venv/bin/python -m mypy
