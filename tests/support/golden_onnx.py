"""Tiny ONNX models built with ``onnx.helper`` and ``loracc golden`` CLI calls, for golden tests.

Shared by tests/e2e/test_golden_cli.py and tests/e2e/test_golden_guards.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from loracc.cli import main

VOCAB, HIDDEN, OUT = 16, 8, 5


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def record_seeded(model: Path, out: Path) -> Any:
    """``golden record`` of the embedding model with seeded inputs of batch 2, sequence 6."""
    return invoke(
        "golden", "record", "--model", model, "--seed", 3,
        "--dim", "batch=2", "--dim", "seq=6", "-o", out,
    )  # fmt: skip


def save_onnx(model: Any, path: Path) -> Path:
    model.ir_version = 10  # onnx 1.23 writes IR 14; this onnxruntime reads <= 13
    onnx.save(model, str(path))
    return path


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "w": rng.standard_normal((HIDDEN, OUT)).astype(np.float32),
        "b": rng.standard_normal(OUT).astype(np.float32),
    }


def embed_model(
    path: Path, w: dict[str, np.ndarray], *, ids_type: int = TensorProto.INT64, doc: str = ""
) -> Path:
    """logits = emb[input_ids] @ w + b, with symbolic batch and seq."""
    ids = helper.make_tensor_value_info("input_ids", ids_type, ["batch", "seq"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", OUT])
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    graph = helper.make_graph(nodes, "embed", [ids], [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.doc_string = doc
    return save_onnx(model, path)


def hf_folder(path: Path, tensors: dict[str, Any], config: dict[str, Any]) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path
