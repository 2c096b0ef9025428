"""The Python API: :mod:`loracc.api.hf` (Hugging Face checkpoints and PEFT adapters) and
:mod:`loracc.api.onnx` (ONNX models; imports the onnx extra only when called). Both load on
first use (:mod:`loracc._lazy`): importing this package imports neither, nor torch."""

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

_HF = ["DTYPES", "ConvertReport", "MergeReport", "convert", "emit_ir"]
_ONNX = ["OnnxReport", "PackReport", "bind_onnx", "export_onnx", "pack"]
__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        **dict.fromkeys(["CombineReport", "combine"], "loracc.api.combination"),
        **dict.fromkeys([*_HF, "load_adapter", "merge"], "loracc.api.hf"),
        **dict.fromkeys(_ONNX, "loracc.api.onnx"),
        "inspect_adapter": "loracc.api.inspect",
    },
)
