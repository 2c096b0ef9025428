"""The Python API: :mod:`loracc.api.hf` (Hugging Face checkpoints and PEFT adapters) and
:mod:`loracc.api.onnx` (ONNX models; imports the onnx extra only when called)."""

from __future__ import annotations

from loracc.api.combination import CombineReport, combine
from loracc.api.hf import (
    DTYPES,
    ConvertReport,
    MergeReport,
    convert,
    emit_ir,
    inspect_adapter,
    load_adapter,
    merge,
)
from loracc.api.onnx import OnnxReport, PackReport, bind_onnx, export_onnx, pack

__all__ = [
    "DTYPES",
    "CombineReport",
    "ConvertReport",
    "MergeReport",
    "OnnxReport",
    "PackReport",
    "bind_onnx",
    "combine",
    "convert",
    "emit_ir",
    "export_onnx",
    "inspect_adapter",
    "load_adapter",
    "merge",
    "pack",
]
