"""scripts/bench_merge.py runs end to end on a tiny model (the harness, not the timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_merge_smoke(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    cmd = [sys.executable, str(REPO / "scripts/bench_merge.py"), "--sizes", "tiny"]
    cmd += ["--paths", "copy,loracc", "--workdir", str(tmp_path / "w"), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {r["path"]: r for r in json.loads(out.read_text())}
    assert set(runs) == {"copy", "loracc"}
    assert runs["loracc"]["rc"] == 0 and runs["loracc"]["inner_s"] is not None
    assert runs["loracc"]["peak_anon_mib"] > 10  # sampled: a Python + torch process
    assert "| tiny |" in done.stdout and "loracc/copy" in done.stdout
    assert not (tmp_path / "w" / "base-tiny").exists()  # cleaned up without --keep


def test_bench_merge_samples_keeps_inputs_and_checks_against_peft(tmp_path: Path) -> None:
    """The 7B options at tiny size: warm and cold runs, outputs digested and removed as it goes,
    sampled tensors compared with PEFT's, the inputs kept for the next run."""
    work = tmp_path / "w"
    cmd = [sys.executable, str(REPO / "scripts/bench_merge.py"), "--sizes", "tiny"]
    cmd += ["--paths", "peft,loracc", "--cache", "warm,cold", "--check-tensors", "5"]
    cmd += ["--keep-inputs", "--workdir", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "tiny: OK: 5 sampled tensors identical" in done.stdout
    cold = "cold runs skipped" in done.stdout or "### cold page cache" in done.stdout
    assert "### warm page cache" in done.stdout and cold
    assert sorted(p.name for p in work.iterdir()) == ["adapter-tiny", "base-tiny"]
