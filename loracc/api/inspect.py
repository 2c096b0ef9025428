"""``inspect``: an adapter's resolved sites and what would be refused, as plain data.

Without a base it imports no torch (an instant CLI): the PEFT reader runs on the
adapter file's header (:func:`loracc.io.peft.read_peft_adapter` ``header_only``), the same code
that decides the sites of a merge, so the two cannot disagree. With a base, the merge pipeline
(or the ONNX binding) runs as ``merge`` (``export --onnx``) would, and that needs torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loracc.api.common import LayoutChoices, PathLike, adapter_folder, base_folder
from loracc.errors import LoweringError, NonFiniteError, UnsupportedError
from loracc.io.checkpoint import Checkpoint
from loracc.io.peft import read_peft_adapter

__all__ = ["inspect_adapter"]


def inspect_adapter(
    adapter_dir: PathLike, base_dir: PathLike | None = None, *, layout: LayoutChoices = None
) -> dict[str, Any]:
    """The resolved sites of an adapter and what would be refused, as plain data.

    ``base_dir`` is the base HF folder: the merge pipeline then runs as ``merge`` would (reading
    the base tensors DoRA and PiSSA/OLoRA sites need), and what it would refuse is listed. Or it is
    the base model's ``.onnx`` file: then ``bindings`` holds the binding of
    :func:`loracc.api.onnx.bind_onnx` (site -> nodes, initializer, transposed), and what
    ``export --onnx`` would refuse is listed with the refusals.
    """
    onnx_base = base_dir is not None and Path(base_dir).suffix == ".onnx"
    base = Checkpoint(base_folder(base_dir)) if base_dir is not None and not onnx_base else None
    # Without a base nothing below needs the values: the same reader reads the header only.
    adapter = read_peft_adapter(
        adapter_folder(adapter_dir), base, layout=layout, header_only=base is None
    )
    sites = [
        {
            "module": s.module,
            "target": s.target,
            "kind": s.kind.value,
            "shape": [int(d) for d in s.logical_shape()],
            "rank": s.rank,
            "alpha": s.alpha,
            "scale": s.scale,
            "rslora": s.use_rslora,
            "variant": s.variant,
            "lora_bias": s.lora_bias is not None,
            "experts": s.experts,
            "layout": s.layout_source,
            "params": s.num_params,
        }
        for s in sorted(adapter.sites, key=lambda s: s.module)
    ]
    out: dict[str, Any] = {
        "adapter": str(adapter_dir),
        "sites": sites,
        "replacements": [
            {"target": r.target, "origin": r.origin, "shape": list(r.tensor.shape)}
            for r in adapter.replacements
        ],
        "token_rows": [
            {"target": t.target, "indices": list(t.indices)} for t in adapter.token_rows
        ],
        "layer_replication": [list(p) for p in adapter.layer_replication],
        "refusals": list(adapter.refusals),
        "notes": list(adapter.notes),
        "params": sum(s.num_params for s in adapter.sites),
    }
    if onnx_base:
        from loracc.api.onnx import bind_onnx  # the onnx extra and torch

        assert base_dir is not None
        out.update(base=str(base_dir), bindings=[])
        if not adapter.refusals:
            try:
                out["bindings"] = bind_onnx(base_dir, adapter_dir, layout=layout)
            except (UnsupportedError, LoweringError) as e:
                out["refusals"].append(f"export --onnx: {e}")
    elif base is not None and not adapter.refusals:
        from loracc.lower.merge import check_mergeable  # torch, for the base's values
        from loracc.pipeline import compile_adapter

        try:
            check_mergeable(compile_adapter(adapter, base).adapter)
        except (UnsupportedError, NonFiniteError) as e:
            out["refusals"].append(f"merge: {e}")
    return out
