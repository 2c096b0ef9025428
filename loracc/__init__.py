"""loracc: a compiler for PEFT LoRA adapters.

Read an adapter into the IR (:func:`load_adapter`), run passes (:func:`compile_adapter`), and
lower it to a merged Hugging Face checkpoint (:func:`merge`) or an ONNX model
(:func:`export_onnx`, which needs the onnx extra only when called). :func:`combine` makes one
adapter of several.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loracc._lazy import lazy_attributes

if TYPE_CHECKING:  # imported on first use (loracc._lazy): ``import loracc`` needs no torch
    from loracc.api.combination import CombineReport, combine
    from loracc.api.hf import (
        ConvertReport,
        MergeReport,
        convert,
        emit_ir,
        load_adapter,
        merge,
    )
    from loracc.api.inspect import inspect_adapter as inspect
    from loracc.api.onnx import OnnxReport, export_onnx
    from loracc.api.packing import (
        PackReport,
        adapter_session,
        check_adapter_files,
        pack,
        pack_mixed,
    )
    from loracc.errors import LoraccError
    from loracc.ir import Adapter, Replacement, Site, SiteKind, TokenRows
    from loracc.pipeline import compile_adapter

__all__ = [
    "Adapter",
    "CombineReport",
    "ConvertReport",
    "LoraccError",
    "MergeReport",
    "OnnxReport",
    "PackReport",
    "Replacement",
    "Site",
    "SiteKind",
    "TokenRows",
    "adapter_session",
    "check_adapter_files",
    "combine",
    "compile_adapter",
    "convert",
    "emit_ir",
    "export_onnx",
    "inspect",
    "load_adapter",
    "merge",
    "pack",
    "pack_mixed",
]

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        **dict.fromkeys(["CombineReport", "combine"], "loracc.api.combination"),
        **dict.fromkeys(
            ["ConvertReport", "MergeReport", "convert", "emit_ir", "load_adapter", "merge"],
            "loracc.api.hf",
        ),
        "inspect": "loracc.api.inspect:inspect_adapter",
        **dict.fromkeys(["OnnxReport", "export_onnx"], "loracc.api.onnx"),
        **dict.fromkeys(
            ["PackReport", "adapter_session", "check_adapter_files", "pack", "pack_mixed"],
            "loracc.api.packing",
        ),
        "LoraccError": "loracc.errors",
        **dict.fromkeys(["Adapter", "Replacement", "Site", "SiteKind", "TokenRows"], "loracc.ir"),
        "compile_adapter": "loracc.pipeline",
    },
)
