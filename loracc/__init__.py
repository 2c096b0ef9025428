"""loracc: a compiler for PEFT LoRA adapters.

Read an adapter into the IR (:func:`load_adapter`), run passes, and lower it to a merged
Hugging Face checkpoint (:func:`merge`) or an ONNX model.
"""

from __future__ import annotations

from loracc.api import (
    ConvertReport,
    MergeReport,
    compile_adapter,
    convert,
    emit_ir,
    inspect,
    load_adapter,
    merge,
)
from loracc.errors import LoraccError
from loracc.ir import Adapter, Replacement, Site, SiteKind, TokenRows
from loracc.onnx_api import OnnxReport, PackReport, check_adapter_files, export_onnx, pack

__all__ = [
    # IR
    "Adapter",
    "ConvertReport",
    # errors
    "LoraccError",
    "MergeReport",
    "Replacement",
    "Site",
    "SiteKind",
    "TokenRows",
    "compile_adapter",
    "convert",
    "emit_ir",
    "inspect",
    # API
    "load_adapter",
    "merge",
]
# ONNX (needs the onnx extra)
__all__ += ["OnnxReport", "PackReport", "check_adapter_files", "export_onnx", "pack"]
