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


def test_bench_onnx_mixed_batch_quick_prints_both_ratios_and_the_sweep(tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    cmd = [sys.executable, str(REPO / "scripts/bench_onnx.py"), "--mixed-batch", "--quick"]
    cmd += ["--threads", "1", "--sweep", "1,4,8", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    for ratio in ("(a)/(c) mixed/merged", "(a)/(b) mixed/grouped"):
        assert re.search(rf"ratio {re.escape(ratio)} = [\d.]+ \[goal", done.stdout), ratio
    data = json.loads(out.read_text())
    assert data["errors"]["mixed_vs_peft"] < 1e-4 and data["errors"]["adapter_effect"] > 1e-3
    (result,) = data["results"]
    assert result["a_c"] > 0 and result["a_b"] > 0
    mib = [result["sweep"][n]["stacked_mib"] for n in ("1", "4", "8")]
    assert 0 < mib[0] < mib[1] < mib[2]  # (N + 2) stacked rows per slot


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


def test_check_cuda_cpu_stand_in_runs_the_int4_and_iobinding_checks() -> None:
    cmd = [sys.executable, str(REPO / "scripts/check_cuda.py"), "--provider", "cpu"]
    cmd += ["--dim", "128", "--layers", "2", "--tokens", "16", "--runs", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("check_cuda: OK")
    assert "int4 (MatMulNBits, block 32), tolerance max abs err <= " in done.stdout
    assert "cpu: int4 keep without adapter vs int4 base max abs err 0.000e+00" in done.stdout
    iobinding = done.stdout.split("IOBinding (x, adapter tensors and output on cpu)")[1]
    for graph in ("keep+adapter", "int4 keep+adapter"):
        row = re.search(rf"^\| {re.escape(graph)} \| ([\d.e+-]+) \|", iobinding, re.MULTILINE)
        assert row is not None, graph
        assert float(row.group(1)) == 0.0, row.group(0)  # same provider, same kernels


def test_iobinding_applies_the_adapter_only_when_its_tensors_are_bound(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    from loracc.io.ort import adapter_ortvalues, run_options
    from scripts.bench_onnx import build

    m = build(tmp_path, 64, 2, 8, 4, half=True)
    sess = ort.InferenceSession(str(m["keep"]), providers=["CPUExecutionProvider"])
    active = run_options(m["adapter_file"])
    y_plain = sess.run(None, {"x": m["x"]})[0]
    y_active = sess.run(None, {"x": m["x"]}, active)[0]
    assert np.abs(y_active - y_plain).max() > 1e-2  # the adapter matters

    def through_iobinding(bind_adapter: bool) -> np.ndarray:
        binding = sess.io_binding()
        binding.bind_cpu_input("x", m["x"])
        if bind_adapter:
            for name, value in adapter_ortvalues(m["adapter_file"]).items():
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(sess.get_outputs()[0].name, "cpu")
        sess.run_with_iobinding(binding, active)
        return np.asarray(binding.copy_outputs_to_cpu()[0])

    # run_with_iobinding ignores RunOptions' active adapter (why adapter_ortvalues exists)
    np.testing.assert_array_equal(through_iobinding(bind_adapter=False), y_plain)
    np.testing.assert_array_equal(through_iobinding(bind_adapter=True), y_active)
