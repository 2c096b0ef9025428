"""The checked-in golden/models cases: loracc's artifacts against PEFT's recorded logits.

``scripts/golden_models.py`` built every case with PEFT and transformers (the oracle); here the
check runs in CI through pytest, and a drifting merge is shown to be caught.
"""

from __future__ import annotations

import json
import shutil
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


def test_checked_in_json_does_not_depend_on_where_or_with_what_it_was_built():
    """No build path, no transformers version in the files a rebuild compares byte for byte."""
    for name in gm.CASES:
        case = gm.GOLDEN_DIR / name
        adapter = json.loads((case / "adapter/adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == f"golden/models/{name}/base"
        assert "transformers_version" not in json.loads((case / "base/config.json").read_text())


def test_a_rebuild_elsewhere_reproduces_the_checked_in_cases():
    """What ``regen_golden.py --check`` adds: regenerating in another folder changes nothing
    (logits within the oracle tolerance, versions aside), so a fresh clone stays clean."""
    assert gm.reproduce() == []


def test_case_differences_sees_content_and_ignores_versions(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(gm.GOLDEN_DIR / "llama_fp32", old)
    new = tmp_path / "new"
    shutil.copytree(old, new)
    meta = json.loads((new / "case.json").read_text())
    meta["produced_by"]["transformers"] = "9.99.0"
    (new / "case.json").write_text(json.dumps(meta))
    with np.load(old / "expected.npz") as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(
        new / "expected.npz", **{k: v * np.float32(1 + 1e-7) for k, v in arrays.items()}
    )
    assert gm.case_differences(old, new) == []
    np.savez_compressed(
        new / "expected.npz", **{k: v * np.float32(1.001) for k, v in arrays.items()}
    )
    config = new / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace("golden/models", "/somewhere/golden/models"))
    assert gm.case_differences(old, new) == [
        "adapter/adapter_config.json: content differs",
        "expected.npz: content differs",
    ]
