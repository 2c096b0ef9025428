"""A folder in which README.md and docs/*.md's blocks run as written (tests/e2e/test_docs_run.py).

The docs name their inputs with placeholders; this folder holds tiny real files under exactly
those names, so a block runs unchanged, as a user would paste it:

* ``BASE_DIR/``: a Hugging Face base (golden/models/llama_fp32: 2-layer Llama, hidden 32, fp32)
  with a byte-level tokenizer (onnxruntime-genai's builder needs one);
* ``ADAPTER_DIR/``: a PEFT LoRA adapter for it (r 4, every projection);
* ``ADAPTER_B/``: a second one (rsLoRA r 4 on q/v/down_proj, golden/models/llama_bf16_rslora's);
* ``BASE.onnx``: the base exported with ``torch.onnx.export(dynamo=True)``, dims batch, sequence;
* ``INPUTS.npz``: ``input_ids`` (int64, 2 x 12);
* ``artifacts/model.onnx`` (+ ``.onnx_adapter``): ``BASE.onnx`` exported with ``--keep-lora``;
* ``artifacts/support.onnx_adapter``: ``ADAPTER_DIR`` packed for it;
* ``artifacts/merged/``: ``ADAPTER_DIR`` merged into ``BASE_DIR``;
* ``goldens/``: empty, the docs record into it.

Outputs the docs write (``OUT_DIR``, ``OUT.onnx``, ...) do not exist beforehand.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
_LLAMA = ROOT / "golden" / "models" / "llama_fp32"
_SECOND_ADAPTER = ROOT / "golden" / "models" / "llama_bf16_rslora" / "adapter"
_TOKENIZER = ROOT / "tests" / "fixtures" / "genai_llama" / "hf"

__all__ = ["build_workspace"]


def build_workspace(root: Path) -> Path:
    """Fill ``root`` (created) with the files of the table above; returns ``root``."""
    import loracc

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(_LLAMA / "base", root / "BASE_DIR")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(_TOKENIZER / name, root / "BASE_DIR" / name)
    shutil.copytree(_LLAMA / "adapter", root / "ADAPTER_DIR")
    shutil.copytree(_SECOND_ADAPTER, root / "ADAPTER_B")
    shutil.copy2(_LLAMA / "base.onnx", root / "BASE.onnx")
    with np.load(_LLAMA / "inputs.npz") as z:
        np.savez(root / "INPUTS.npz", input_ids=z["input_ids"])

    artifacts = root / "artifacts"
    artifacts.mkdir()
    loracc.export_onnx(
        root / "BASE.onnx", root / "ADAPTER_DIR", artifacts / "model.onnx", keep_lora=True
    )
    loracc.pack(artifacts / "model.onnx", root / "ADAPTER_DIR", artifacts / "support.onnx_adapter")
    loracc.merge(root / "BASE_DIR", root / "ADAPTER_DIR", artifacts / "merged")
    (root / "goldens").mkdir()
    return root
