"""The pass order, written once, and the pipelines built from it.

Every pipeline runs its passes in :data:`ORDER`. The order matters: layer replication renames
targets before anything reads the base for them; residual reconstruction needs the original base
weights; untying must see the final targets and decides on the factors as saved; truncation needs
plain (reconstructed) factors and runs before DoRA's norm, which needs the final delta; folding the
scale into B comes last.

Each pipeline has required passes, those its output needs to be correct, and takes optional ones
(``--passes``): the user's passes are added to the required ones, or configure them, and the
result runs in :data:`ORDER`. A spec cannot drop a required pass, and one that lists passes out of
:data:`ORDER` or names a pass twice is refused rather than reordered.

:func:`run_pipeline` owns verification, as onnx-ir's ``PassBase.__call__`` owns pre- and
postconditions: with ``check=True`` or ``LORACC_VERIFY=1`` (which the tests set) it verifies the
IR before the first pass and after every pass, so every pipeline — merge, convert, the ONNX
export, ``compile --emit ir`` — is verified in tests, not only the ones whose caller asks.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

from loracc.errors import ConfigError
from loracc.ir import Adapter
from loracc.passes import Pass, PassContext, PassResult
from loracc.passes.apply_graph_layout import ApplyGraphLayout
from loracc.passes.drop_noop_replacements import DropNoopReplacements
from loracc.passes.expand_layer_replication import ExpandLayerReplication
from loracc.passes.fold_dora import FoldDora
from loracc.passes.fold_scaling import FoldScaling
from loracc.passes.reconstruct_residual import ReconstructResidual
from loracc.passes.truncate_rank import TruncateRank
from loracc.passes.untie_embeddings import UntieEmbeddings
from loracc.verify import verify
from loracc.weights import BaseWeights

__all__ = [
    "MERGE_REQUIRED",
    "ORDER",
    "VERIFY_ENV",
    "PipelineResult",
    "compile_adapter",
    "convert_pipeline",
    "in_order",
    "merge_pipeline",
    "onnx_pipeline",
    "pass_steps",
    "pipeline_spec",
    "run_pipeline",
]

ORDER: tuple[type[Pass], ...] = (
    ApplyGraphLayout,
    ExpandLayerReplication,
    ReconstructResidual,
    UntieEmbeddings,
    TruncateRank,
    FoldDora,
    FoldScaling,
    DropNoopReplacements,
)

# What every lowering of a merged model needs: without one of them the merged tensors are wrong
# (or the lowering cannot place an edit) for the adapters that use the feature.
MERGE_REQUIRED: tuple[type[Pass], ...] = (
    ExpandLayerReplication,
    ReconstructResidual,
    UntieEmbeddings,
    FoldDora,
)


# Set to "1" to verify the IR around every pass of every pipeline (tests/conftest.py sets it).
VERIFY_ENV = "LORACC_VERIFY"


def in_order(required: Sequence[Pass], requested: Sequence[Pass]) -> list[Pass]:
    """``required`` with ``requested`` added (a requested pass configures a required one of its
    kind), in :data:`ORDER`; a requested list out of that order or with a pass twice is refused."""
    names = [p.name for p in requested]
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            raise ConfigError(f"--passes: '{name}' is given {names.count(name)} times")
    for before, after in pairwise(requested):
        if ORDER.index(type(before)) > ORDER.index(type(after)):
            raise ConfigError(
                f"--passes: '{before.name}' is listed before '{after.name}', but passes always "
                f"run in the order {', '.join(cls.name for cls in ORDER)}; list them in that order"
            )
    chosen = {type(p): p for p in required} | {type(p): p for p in requested}
    return [chosen[cls] for cls in ORDER if cls in chosen]


def merge_pipeline(requested: Sequence[Pass] = ()) -> list[Pass]:
    """The passes every lowering runs (:data:`MERGE_REQUIRED`), plus ``requested``, in order."""
    return in_order([cls() for cls in MERGE_REQUIRED], requested)


def onnx_pipeline() -> list[Pass]:
    """The passes both ONNX lowerings run: the merge pipeline between the two that read the
    graph (the layer kinds it shows first, replacements equal to its tensors dropped last)."""
    return in_order([ApplyGraphLayout(), *merge_pipeline(), DropNoopReplacements()], ())


def convert_pipeline(
    *, base: bool, rank: int | None = None, energy: float | None = None
) -> list[Pass]:
    """The passes ``loracc convert`` runs before writing a plain PEFT adapter, in order.

    With a base, layer replication is expanded only so residual inits read the right base
    tensors; the written adapter keeps ``layer_replication`` and peft replicates again when it
    loads it. Truncation sees the reconstructed rank-2r delta; the scale is folded last.
    """
    required: list[Pass] = [ExpandLayerReplication()] if base else []
    required += [ReconstructResidual(), FoldScaling()]
    truncate = [TruncateRank(rank=rank, energy=energy)] if (rank, energy) != (None, None) else []
    return in_order(required, truncate)


def pipeline_spec(passes: Sequence[Pass]) -> str:
    """``passes`` as a pipeline string, options included (what ``compile --emit ir`` shows)."""
    return ",".join(p.spec() for p in passes)


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
    """Run ``passes`` in order.

    With ``check``, or when :data:`VERIFY_ENV` is ``1``, the IR is verified before the first
    pass and after each one; a broken invariant raises :class:`~loracc.errors.VerifyError`
    naming the pass that broke it. ``after`` sees each pass's spec and output (IR dumps).
    """
    check = check or os.environ.get(VERIFY_ENV) == "1"
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


def compile_adapter(
    adapter: Adapter,
    base: BaseWeights | None,
    passes: list[Pass] | None = None,
    *,
    device: str = "cpu",
    check: bool = False,
) -> PipelineResult:
    """Run the merge pipeline over ``adapter``, or exactly ``passes`` (nothing added: a lowering
    takes ``merge_pipeline(extra)``, which keeps the required passes)."""
    ctx = PassContext(base=base, device=device)
    return run_pipeline(adapter, merge_pipeline() if passes is None else passes, ctx, check=check)


def pass_steps(result: PipelineResult) -> list[dict[str, Any]]:
    """Each pass of ``result`` as the reports print it: changed, skipped sites counted per
    reason, details."""
    return [
        {
            "pass": name,
            "changed": list(step.changed),
            # counts per reason: an all-linear 7B adapter skips hundreds of sites per pass
            "skipped": dict(Counter(s.reason for s in step.skipped)),
            "details": list(step.details),
        }
        for name, step in result.steps
    ]
