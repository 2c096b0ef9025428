"""Commands that need no torch do not import it (issue 16 item 3, issue 15 item 2).

``--help`` of every command, ``inspect`` without a base, ``golden record|check`` and ``run`` on
an ONNX model must start without importing torch (a second of start-up, and gigabytes a CI job
that only checks ONNX goldens should not install). Each command runs in a fresh interpreter that
reports, at exit, whether torch was imported; and a fresh venv without torch installs the
checkout and checks an ONNX golden with it (the install story of docs/examples/golden-check.yml).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support import make_corpus as mc
from tests.support import pass_cases as pc
from tests.support import peft_oracle as po

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
    proc = _loracc("merge", "--base", "/nonexistent-base", "--adapter", "/nonexistent", "-o", "o")
    assert proc.returncode == 2 and "'torch'" in _imported(proc), proc.stderr


# The values path: inspect reading the adapter's tensors with torch, as merge reads them.
_WITH_VALUES = """
import loracc.api.inspect as _inspect
_read = _inspect.read_peft_adapter
_inspect.read_peft_adapter = lambda *a, header_only=False, **k: _read(*a, **k)
"""

# PEFT adapters of several kinds (DoRA + rsLoRA on bf16, trainable tokens, 2-D and 3-D
# target_parameters, modules_to_save, lora_bias, conv, a refused aLoRA config).
_PEFT_CASES = {
    "dora_rslora_bf16": "pass",
    "dora_embedding": "pass",
    "llama_tt_list": "peft",
    "llama_target_param_2d": "peft",
    "gpt_oss_target_param_3d": "peft",
    "llama_mts_lm_head": "peft",
    "gpt2_lora_bias": "peft",
    "conv2d": "peft",
    "llama_alora": "peft",
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapter folders by name: the PEFT cases, and copies of one made bad on purpose (a NaN in
    a bf16 factor, an integer factor), which inspect refuses with exit 2."""
    folders = {
        name: (
            pc.case(name, tmp_path_factory)
            if source == "pass"
            else po.build_case(name, tmp_path_factory.mktemp(name))
        ).adapter_dir
        for name, source in _PEFT_CASES.items()
    }
    good = folders["dora_rslora_bf16"]
    tensors = load_file(str(good / "adapter_model.safetensors"))
    factor = next(k for k in tensors if k.endswith("lora_B.weight"))
    for name, bad in (
        ("nan_bf16", tensors[factor].to(torch.bfloat16).index_fill(1, torch.tensor([1]), np.nan)),
        ("int_factor", tensors[factor].to(torch.int32)),
    ):
        folder = tmp_path_factory.mktemp(name)
        shutil.copy(good / "adapter_config.json", folder)
        save_file({**tensors, factor: bad}, str(folder / "adapter_model.safetensors"))
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name", [*_PEFT_CASES, "nan_bf16", "int_factor"])
@pytest.mark.parametrize("as_json", [True, False])
def test_inspect_without_base_imports_no_torch(
    adapters: dict[str, Path], name: str, as_json: bool
) -> None:
    """``inspect ADAPTER`` reads the header only, with the reader merge uses: torch is not
    imported, and the report (or the refusal) is the one the reader gives with the values."""
    args = ["inspect", str(adapters[name]), *(["--json"] if as_json else [])]
    header_only = _loracc(*args)
    with_values = _loracc(*args, prelude=_WITH_VALUES)
    refused = name in ("nan_bf16", "int_factor")
    _no_torch(header_only, rc=2 if refused else 0)
    assert "'torch'" in _imported(with_values), with_values.stderr  # the other path, really
    assert header_only.returncode == with_values.returncode, with_values.stderr
    assert header_only.stdout == with_values.stdout
    assert header_only.stderr.splitlines()[:-1] == with_values.stderr.splitlines()[:-1]
    if refused:
        assert "NaN or Inf" in header_only.stderr or "dtype int32" in header_only.stderr
    elif name == "llama_alora":
        assert "REFUSED" in header_only.stdout or '"refusals": [\n' in header_only.stdout


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
