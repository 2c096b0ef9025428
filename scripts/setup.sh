#!/usr/bin/env bash
# Create .venv with loracc and its test dependencies (CPU torch from this machine's disk).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# pip and the build backend print warnings on every run (setuptools' "compat editable installs",
# index locations): keep each install's output in a log and show it only when the install fails.
pip_install() {
  local log
  log=$(mktemp)
  if ! python -m pip install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup.sh: pip install $* failed (output above)" >&2
    return 1
  fi
  rm -f "$log"
}
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip show torch >/dev/null 2>&1 || pip_install torch==2.13.0
# compat mode puts the checkout root on sys.path (a .pth file), so the scripts import the test
# support code as `tests.support.X` and each other as `scripts.X` (docs/DESIGN.md "Tests and scripts").
compat=(--config-settings editable_mode=compat)
pip_install "${compat[@]}" -e ".[dev]"
# onnxruntime and onnxruntime-gpu ship the same module and must not be installed together.
python -c "import onnxruntime" 2>/dev/null || pip_install "${compat[@]}" -e ".[ort]"
# onnxruntime-genai (its tests: og.Model, og.Adapters) depends on the CPU onnxruntime wheel: only
# where that is the runtime, so it never brings a second runtime beside onnxruntime-gpu.
if ! python -m pip show onnxruntime-gpu >/dev/null 2>&1; then
  python -m pip show onnxruntime-genai >/dev/null 2>&1 || pip_install onnxruntime-genai
fi
