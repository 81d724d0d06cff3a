#!/usr/bin/env bash
# Install (if needed) and run a local federation: a coordinator and three clients with
# different memory budgets fine-tune SmolLM2-135M on the shipped dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/edgefed-local "$@"
