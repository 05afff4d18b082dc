#!/usr/bin/env bash
# Set up (scripts/setup.sh), run the static checks (scripts/check.sh: ruff, mypy) and the whole
# default test suite, docstring examples included (pytest --doctest-modules over src/ and
# tests/). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check.sh
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
exec .venv/bin/python -m pytest "$@"
