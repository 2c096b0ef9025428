"""untie-embeddings: give a tied output embedding its own tensor when the adapter edits differ.

Identity: the adapted model's forward. With ``tie_word_embeddings`` the checkpoint stores one
tensor W for the input embedding E and the output head H. peft's unmerged forward uses
``E(W) + ΔE`` for token lookup and ``H(W) + ΔH`` for logits; trainable tokens and a resized
embedding change the shared W for both (peft may also save the head's copies of those). So the
tie survives the merge only when ΔE == ΔH: no LoRA on either, or ``ensure_weight_tying`` mirrors
(H's A = E's Bᵀ, H's B = E's Aᵀ), and the head's saved rows or table equal the embedding's; the
head's copies are then dropped so each edit applies once. Otherwise
peft's merge_and_unload adds both deltas into W (wrong by up to 2Δ); this pass instead adds an
output tensor ``lm_head.weight`` copied from W, moves H's edits there, and sets
``tie_word_embeddings=false``.

PEFT fields read: target_modules (through the saved keys), modules_to_save,
trainable_token_indices, ensure_weight_tying (through the mirrored factors).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import ClassVar

import torch

from loracc.errors import PassError
from loracc.ir import Adapter, Site, SiteKind, TargetEdits
from loracc.passes.base import Pass, PassContext, PassResult, Skip

__all__ = ["UntieEmbeddings"]


def _mirrors(head: Site, emb: Site) -> bool:
    return (
        emb.kind is SiteKind.EMBEDDING
        and head.scale == emb.scale
        and head.magnitude is None
        and emb.magnitude is None
        and head.lora_A.shape == emb.lora_B.T.shape
        and torch.equal(head.lora_A, emb.lora_B.T)
        and torch.equal(head.lora_B, emb.lora_A.T)
    )


@dataclass(frozen=True, slots=True)
class UntieEmbeddings(Pass):
    """Split a tied lm_head from the input embedding when their edits differ."""

    name: ClassVar[str] = "untie-embeddings"

    def requires(self, adapter: Adapter, ctx: PassContext) -> None:
        if ctx.base is None:
            raise PassError("untie-embeddings needs the base checkpoint")

    def run(self, adapter: Adapter, ctx: PassContext) -> PassResult:
        assert ctx.base is not None
        tied = ctx.base.tied_embeddings
        if tied is None:
            return PassResult(adapter, skipped=(Skip("*", "the base has no tied embeddings"),))
        head_key, emb_key = tied
        edits = adapter.edits_by_target()
        head, emb = edits.get(head_key, TargetEdits()), edits.get(emb_key, TargetEdits())
        if not head and not _differs_alone(emb):
            return PassResult(
                adapter, skipped=(Skip(head_key, "no edit differs between the tied pair"),)
            )
        if _same_as(head, emb):
            dropped = {id(x) for x in (*head.sites, *head.rows, *head.replacements)}
            return PassResult(
                replace(
                    adapter,
                    sites=tuple(x for x in adapter.sites if id(x) not in dropped),
                    token_rows=tuple(x for x in adapter.token_rows if id(x) not in dropped),
                    replacements=tuple(x for x in adapter.replacements if id(x) not in dropped),
                ),
                changed=(head_key,),
                details=(f"{head_key}: edited like {emb_key}; applied once, tie kept",),
            )
        # The forward sees two tensors. Edits saved for the embedding alone that act on the
        # shared weight (trainable tokens, a resized vocabulary) reach the head too, unless the
        # adapter saved the head's own.
        rows = () if head.rows else tuple(replace(t, target=head_key) for t in emb.rows)
        shared = [r for r in emb.replacements if r.origin == "embedding"]
        resize = () if head.replacements else tuple(replace(r, target=head_key) for r in shared)
        sources = dict(adapter.tensor_sources)
        sources[head_key] = emb_key
        updates = dict(adapter.config_updates)
        updates["tie_word_embeddings"] = False
        return PassResult(
            replace(
                adapter,
                token_rows=adapter.token_rows + rows,
                replacements=adapter.replacements + resize,
                tensor_sources=MappingProxyType(sources),
                config_updates=MappingProxyType(updates),
            ),
            changed=(head_key,),
            details=(f"{head_key}: untied from {emb_key}; the adapter edits them differently",),
        )


def _differs_alone(emb: TargetEdits) -> bool:
    """Whether these embedding edits change the lookup but not the shared weight."""
    return bool(emb.sites) or any(r.origin != "embedding" for r in emb.replacements)


def _same_as(head: TargetEdits, emb: TargetEdits) -> bool:
    """Whether the head, as the forward sees it, equals the embedding after these edits."""
    sites = (not head.sites and not emb.sites) or (
        len(head.sites) == len(emb.sites) == 1 and _mirrors(head.sites[0], emb.sites[0])
    )
    rows = not head.rows or (
        len(head.rows) == len(emb.rows)
        and all(
            h.indices == e.indices and torch.equal(h.rows, e.rows)
            for h, e in zip(head.rows, emb.rows, strict=True)
        )
    )
    if head.replacements:
        reps = len(head.replacements) == len(emb.replacements) and all(
            torch.equal(h.tensor, e.tensor)
            for h, e in zip(head.replacements, emb.replacements, strict=True)
        )
    else:
        reps = all(r.origin == "embedding" for r in emb.replacements)
    return sites and rows and reps
