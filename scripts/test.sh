#!/usr/bin/env bash
# Install everything into .venv, then run the linters, the golden checks and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
ruff check loracc tests scripts
mypy loracc
python -m pytest "$@"
