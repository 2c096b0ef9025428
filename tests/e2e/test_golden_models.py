"""The checked-in golden/models cases: loracc's artifacts against PEFT's recorded logits.

``scripts/golden_models.py`` built every case with PEFT and transformers (the oracle); here the
check runs in CI through pytest, and a drifting merge is shown to be caught.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts import golden_models as gm
from scripts import regen_golden

FILES = (
    "base/config.json",
    "base/model.safetensors",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "inputs.npz",
    "expected.npz",
    "case.json",
)


@pytest.mark.parametrize("name", sorted(gm.CASES))
def test_case_is_checked_in_and_small(name):
    case = gm.GOLDEN_DIR / name
    for f in FILES:
        assert (case / f).is_file(), (
            f"golden/models/{name}/{f} missing: run scripts/regen_golden.py"
        )
    size = sum(p.stat().st_size for p in case.rglob("*") if p.is_file())
    assert size <= gm.MAX_CASE_BYTES, f"{name}: {size} bytes"
    meta = json.loads((case / "case.json").read_text())
    assert meta["adapter_effect"] > 1e-2  # the adapter really moves the logits
    with np.load(case / "inputs.npz") as z:
        ids = z["input_ids"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < gm.VOCAB


def test_loracc_merge_matches_peft_goldens():
    """What ``scripts/regen_golden.py --check`` runs for the model cases."""
    problems = gm.check_cases()
    assert not problems, "\n".join(problems)


def test_check_catches_a_drifting_merge():
    """A merge that is off by 0.1% in one projection must be reported, with the error."""
    from safetensors.torch import load_file, save_file

    import loracc

    def drifting_merge(base: Path, adapter: Path, out: Path) -> None:
        loracc.merge(str(base), str(adapter), str(out))
        path = out / "model.safetensors"
        tensors = load_file(str(path))
        key = "model.layers.0.self_attn.q_proj.weight"
        tensors[key] = tensors[key] * (1 + 1e-3)
        save_file(tensors, str(path), metadata={"format": "pt"})

    problems = gm.check_cases(["llama_fp32"], merge=drifting_merge, oracle=False)
    assert len(problems) == 1 and "models/llama_fp32: merge: logits differ" in problems[0]


def test_onnx_artifacts_are_checked(tmp_path):
    """The export / keep-lora / pack checks run, and fail when the reference moves by 0.1%."""
    case = gm.GOLDEN_DIR / "llama_fp32"
    assert (case / "base.onnx").is_file()
    meta = json.loads((case / "case.json").read_text())
    with np.load(case / "inputs.npz") as z:
        ids = z["input_ids"]
    with np.load(case / "expected.npz") as z:
        moved = {k: z[k] * np.float32(1.001) for k in z.files}
    problems = gm._check_onnx(case, meta, ids, moved, tmp_path)
    assert [p.split(":")[0] for p in problems] == [
        "onnx export (merged)",
        "onnx export --keep-lora, adapter active",
        "onnx export --keep-lora, no adapter",
        "onnx pack, adapter active",
    ], problems


def test_registered_in_regen_golden():
    """``scripts/regen_golden.py --check`` runs this suite (CI runs it through this file)."""
    suites = {s.name: s for s in regen_golden.SUITES}
    assert suites["models"].run is gm.suite and suites["models"].folder == "models"
