#!/usr/bin/env bash
# Create .venv (Python >= 3.10), install flatminima with the pinned CPU torch, and fetch the
# Fashion-MNIST files from Debian's package where apt is available. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$EXTRAS]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${FLATMINIMA_DATA:-}" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
            || echo "setup: could not install dataset-fashion-mnist; tests that need it skip" >&2
    else
        echo "setup: Fashion-MNIST not found; install the Debian package dataset-fashion-mnist" \
             "or set FLATMINIMA_DATA (see README)" >&2
    fi
fi
