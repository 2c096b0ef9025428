"""scripts/bench_onnx.py and scripts/check_cuda.py run end to end (the harness, not the timings)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("onnxruntime")
pytest.importorskip("peft")


def test_bench_onnx_quick_prints_the_three_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts/bench_onnx.py"), "--quick", "--threads", "1"]
    cmd += ["--json", str(out), "--int4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    ratios = ("(a) keep-empty/base", "(b) keep-active/merged", "(c) session/activate")
    ratios += ("(d) int4 keep-active/int4 base", "(e) int4 merged/int4 base")
    for ratio in ratios:
        assert re.search(rf"ratio {re.escape(ratio)} = [\d.]+x? \[goal", done.stdout), ratio
    assert "correctness" in done.stdout and "| 1 |" in done.stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["threads"] == 1 and result["a"] > 0 and result["b"] > 0 and result["c"] > 0
    assert json.loads(out.read_text())["errors"]["keep_active_vs_merged"] < 1e-4
    (int4,) = json.loads(out.read_text())["int4"]
    assert int4["d"] > 0 and int4["e"] > 0


def test_check_cuda_refuses_cleanly_without_cuda() -> None:
    from loracc.io.ort import cuda_usable

    if cuda_usable():
        pytest.skip("CUDA is usable here: check_cuda.py would run, not refuse")
    cmd = [sys.executable, str(REPO / "scripts/check_cuda.py")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2, done.stdout + done.stderr[-2000:]
    assert "the CUDA execution provider is not usable here: " in done.stdout
    assert "run this script on a machine with a GPU" in done.stdout
    assert "Traceback" not in done.stderr
