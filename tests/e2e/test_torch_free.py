"""Commands that need no torch do not import it (issue 16 item 3, issue 15 item 2).

``--help`` of every command, ``golden record|check`` and ``run`` on an ONNX model must start
without importing torch (a second of start-up, and gigabytes a CI job that only checks ONNX
goldens should not install). Each command runs in a fresh interpreter that reports, at exit,
whether torch was imported; and a fresh venv without torch installs the checkout and checks an
ONNX golden with it (the install story of docs/examples/golden-check.yml).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import make_corpus as mc

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240

# Runs the CLI, then says which of the heavy modules it imported (on stderr's last line).
_REPORT_MODULES = """
import sys
from loracc.cli import main
try:
    main(sys.argv[1:], prog_name="loracc")
except SystemExit as e:
    code = e.code
print("imported:", sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules),
      file=sys.stderr)
sys.exit(code)
"""

COMMANDS = ("merge", "convert", "combine", "compile", "inspect", "export", "pack", "run", "golden")


def _loracc(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", prelude + _REPORT_MODULES, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
    )


def _imported(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stderr.strip().splitlines()[-1]


def _no_torch(proc: subprocess.CompletedProcess[str], rc: int = 0) -> None:
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert _imported(proc) == "imported: []", proc.stderr


@pytest.fixture(scope="module")
def slotted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A keep-lora ONNX model, an adapter file for it, and a golden recorded with both."""
    pytest.importorskip("onnxruntime")
    lay = mc.build_slotted_valid(tmp_path_factory.mktemp("slotted"))
    packed = _loracc(*lay.argv)
    assert packed.returncode == 0, packed.stderr
    model = lay.base / "model.onnx"
    golden = lay.out.parent / "golden.npz"
    args = ["golden", "record", "--model", str(model), "--adapter", str(lay.out), "--seed", "0"]
    recorded = _loracc(*args, "-o", str(golden))
    assert recorded.returncode == 0, recorded.stderr
    return model, lay.out, golden


@pytest.mark.parametrize("args", [[], *([c] for c in COMMANDS), ["golden", "check"]])
def test_help_imports_no_torch(args: list[str]) -> None:
    _no_torch(_loracc(*args, "--help"))


def test_the_check_sees_torch() -> None:
    """Not vacuous: a command that merges does import torch (and fails here on bad input)."""
    proc = _loracc("inspect", "/nonexistent-adapter")
    assert proc.returncode == 2 and "'torch'" in _imported(proc), proc.stderr


def test_golden_and_run_on_onnx_import_no_torch(
    slotted: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    model, adapter, with_adapter = slotted
    golden = tmp_path / "g.npz"
    _no_torch(_loracc("golden", "record", "--model", str(model), "--seed", "1", "-o", str(golden)))
    _no_torch(_loracc("golden", "check", "--model", str(model), "--golden", str(golden)))
    checked = _loracc(
        "golden",
        "check",
        "--model",
        str(model),
        "--adapter",
        str(adapter),
        "--golden",
        str(with_adapter),
    )
    _no_torch(checked)
    assert "fingerprint differs" not in checked.stdout + checked.stderr
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.ones((1, mc.HIDDEN), np.float32))
    _no_torch(_loracc("run", "--model", str(model), "--inputs", str(inputs)))
    _no_torch(
        _loracc("run", "--model", str(model), "--adapter", str(adapter), "--inputs", str(inputs))
    )


def test_missing_torch_is_one_line(tmp_path: Path) -> None:
    """Without torch, a command that needs it exits 2 with the install command."""
    lay = mc.build_valid(tmp_path)
    proc = _loracc(*lay.argv, prelude="import sys; sys.modules['torch'] = None\n")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[0]
    assert err == (
        "loracc: error: loracc merge needs torch, which is not installed: "
        "pip install 'loracc[torch]'"
    ), proc.stderr
    assert not lay.out.exists()


def test_fresh_venv_without_torch_checks_an_onnx_golden(
    slotted: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """``pip install 'loracc[onnx]' onnxruntime`` (a wheel built from the checkout) into a fresh
    venv: no torch installed, and ``loracc --help`` and ``loracc golden check`` with an adapter
    on the ONNX golden pass with the fingerprint recorded in the dev install (onnx reads the
    external-data files it covers). The wheel is built with this interpreter's setuptools
    (``--no-build-isolation``: no build env to download); the package index gives the rest."""
    model, adapter, golden = slotted
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=TIMEOUT_S)
    py = venv / "bin" / "python"
    # build the wheel with this interpreter's setuptools; install it with onnxruntime
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(wheels), str(REPO)], check=True, timeout=TIMEOUT_S)
    (wheel,) = wheels.glob("loracc-*.whl")
    install = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run(
        [*install, f"{wheel}[onnx]", "onnxruntime"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    gone = subprocess.run([str(py), "-c", "import torch"], capture_output=True, timeout=60)
    assert gone.returncode != 0, "torch is installed in the fresh venv"
    loracc = str(venv / "bin" / "loracc")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = {"capture_output": True, "text": True, "timeout": TIMEOUT_S, "cwd": tmp_path, "env": env}
    helped = subprocess.run([loracc, "--help"], **run)  # type: ignore[call-overload]
    assert helped.returncode == 0 and "golden" in helped.stdout, helped.stderr
    args = ["golden", "check", "--model", str(model), "--adapter", str(adapter)]
    checked = subprocess.run([loracc, *args, "--golden", str(golden)], **run)  # type: ignore[call-overload]
    assert checked.returncode == 0 and "PASS" in checked.stdout, checked.stdout + checked.stderr
    assert "fingerprint differs" not in checked.stdout, checked.stdout
    merged = subprocess.run([loracc, "merge", "--base", "b", "--adapter", "a", "-o", "o"], **run)  # type: ignore[call-overload]
    assert merged.returncode == 2, merged.stderr
    assert "pip install 'loracc[torch]'" in merged.stderr
    shutil.rmtree(venv)
