#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: SGD vs Entropy-SGD vs Replicated-SGD vs SAM on
# Fashion-MNIST at equal gradient evaluations, with flatness, into reports/fashion-quick.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-test} bash scripts/setup.sh
exec .venv/bin/flatminima --threads 1 compare --preset fashion-quick --jobs 2 \
    --out reports/fashion-quick "$@"
