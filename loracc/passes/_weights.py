"""Base weights as the merge will see them, for passes that need ``W`` (DoRA norms, residuals).

A pass reads one tensor at a time through :class:`~loracc.passes.base.PassContext`. The tensor an
output key starts from is not always the base tensor of the same name: layer-replication copies
and untied heads name their source in ``Adapter.tensor_sources``, a tied head that was not untied
reads the input embedding, and whole replacements and trainable-token rows come first
(:func:`loracc.kernels.apply_edits`, the order every lowering applies).
"""

from __future__ import annotations

import torch

from loracc import kernels
from loracc.errors import PassError
from loracc.ir import Adapter, TargetEdits
from loracc.passes.base import PassContext

__all__ = ["source_key", "start_weight"]


def source_key(adapter: Adapter, ctx: PassContext, key: str) -> str:
    """The base key whose stored tensor output ``key`` is copied from."""
    assert ctx.base is not None
    src = adapter.tensor_sources.get(key, key)
    if src in ctx.base:
        return src
    tied = ctx.base.tied_embeddings
    if tied is not None and src == tied[0]:
        return tied[1]
    stored = ctx.base.resolve(src)
    if stored is None:
        raise PassError(f"the base has no tensor for '{key}' (looked for '{src}')")
    return stored


def start_weight(
    adapter: Adapter, ctx: PassContext, key: str, *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The fp32 tensor the deltas on ``key`` are added to: replacement or base, then rows."""
    base = ctx.base
    assert base is not None
    edits = adapter.edits_by_target().get(key, TargetEdits())
    return kernels.apply_edits(
        lambda: base.read(source_key(adapter, ctx, key)), edits.before_deltas(), device=device
    )
