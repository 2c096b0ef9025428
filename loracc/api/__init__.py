"""The Python API: :mod:`loracc.api.hf` (Hugging Face checkpoints and PEFT adapters),
:mod:`loracc.api.onnx` (ONNX export) and :mod:`loracc.api.packing` (adapter files for ONNX models
with slots; both import the onnx extra only when called). They load on first use
(:mod:`loracc._lazy`): importing this package imports none of them, nor torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loracc._lazy import lazy_attributes

if TYPE_CHECKING:
    from loracc.api.combination import CombineReport, combine
    from loracc.api.hf import (
        DTYPES,
        ConvertReport,
        MergeReport,
        convert,
        emit_ir,
        load_adapter,
        merge,
    )
    from loracc.api.inspect import inspect_adapter
    from loracc.api.onnx import OnnxReport, bind_onnx, export_onnx
    from loracc.api.packing import PackReport, pack

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

_HF = ["DTYPES", "ConvertReport", "MergeReport", "convert", "emit_ir"]
_ONNX = ["OnnxReport", "bind_onnx", "export_onnx"]
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        **dict.fromkeys(["CombineReport", "combine"], "loracc.api.combination"),
        **dict.fromkeys([*_HF, "load_adapter", "merge"], "loracc.api.hf"),
        **dict.fromkeys(_ONNX, "loracc.api.onnx"),
        **dict.fromkeys(["PackReport", "pack"], "loracc.api.packing"),
        "inspect_adapter": "loracc.api.inspect",
    },
)
