#!/usr/bin/env bash
# Build a tiny base checkpoint and a PEFT adapter, inspect the adapter, merge it, check the result.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
out=${1:-demo-out}
# The PEFT reference steps use transformers: keep its progress bars and deprecation warnings out of
# the demo's output (loracc itself imports neither).
export TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONWARNINGS=ignore::FutureWarning
python scripts/make_demo.py "$out"
echo "== loracc inspect"
loracc inspect "$out/adapter" --base "$out/base"
echo "== loracc merge"
loracc merge --base "$out/base" --adapter "$out/adapter" -o "$out/merged" --force
python scripts/make_demo.py "$out" --check
