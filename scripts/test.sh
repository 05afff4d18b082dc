#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole default test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
exec .venv/bin/python -m pytest "$@"
