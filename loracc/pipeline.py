"""The pass order, written once.

``merge_pipeline`` is what ``loracc merge`` and the ONNX lowerings run before lowering; the order
matters: layer replication renames targets before anything reads the base for them, residual
reconstruction needs the original base weights, untying must see the final targets, DoRA's norm
needs the final delta.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from loracc.ir import Adapter
from loracc.passes import Pass, PassContext, PassResult
from loracc.passes.expand_layer_replication import ExpandLayerReplication
from loracc.passes.fold_dora import FoldDora
from loracc.passes.fold_scaling import FoldScaling
from loracc.passes.reconstruct_residual import ReconstructResidual
from loracc.passes.truncate_rank import TruncateRank
from loracc.passes.untie_embeddings import UntieEmbeddings
from loracc.verify import verify

__all__ = ["PipelineResult", "convert_pipeline", "merge_pipeline", "run_pipeline"]


def merge_pipeline() -> list[Pass]:
    """The passes every lowering runs, in order."""
    return [
        ExpandLayerReplication(),
        ReconstructResidual(),
        UntieEmbeddings(),
        FoldDora(),
    ]


def convert_pipeline(
    *, base: bool, rank: int | None = None, energy: float | None = None
) -> list[Pass]:
    """The passes ``loracc convert`` runs before writing a plain PEFT adapter, in order.

    With a base, layer replication is expanded only so residual inits read the right base
    tensors; the written adapter keeps ``layer_replication`` and peft replicates again when it
    loads it. Truncation sees the reconstructed rank-2r delta; the scale is folded last.
    """
    passes: list[Pass] = [ExpandLayerReplication()] if base else []
    passes.append(ReconstructResidual())
    if rank is not None or energy is not None:
        passes.append(TruncateRank(rank=rank, energy=energy))
    passes.append(FoldScaling())
    return passes


@dataclass(frozen=True, slots=True)
class PipelineResult:
    adapter: Adapter
    steps: tuple[tuple[str, PassResult], ...]


def run_pipeline(
    adapter: Adapter,
    passes: Sequence[Pass],
    ctx: PassContext,
    *,
    check: bool = False,
    after: Callable[[str, Adapter], None] | None = None,
) -> PipelineResult:
    """Run ``passes`` in order; with ``check`` verify the IR before and after each pass."""
    if check:
        verify(adapter)
    steps: list[tuple[str, PassResult]] = []
    for p in passes:
        result = p(adapter, replace(ctx, history=tuple(name for name, _ in steps)))
        adapter = result.adapter
        if check:
            verify(adapter, after=p.name)
        steps.append((p.spec(), result))
        if after is not None:
            after(p.spec(), adapter)
    return PipelineResult(adapter, tuple(steps))
