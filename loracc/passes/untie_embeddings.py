"""untie-embeddings: give a tied output embedding its own tensor when the adapter edits differ.

Identity: the adapted model's forward. With ``tie_word_embeddings`` the checkpoint stores one
tensor W for the input embedding E and the output head H. peft's unmerged forward uses
``E(W) + ΔE`` for token lookup and ``H(W) + ΔH`` for logits; trainable tokens and a resized
embedding change the shared W for both. So the tie survives the merge only when ΔE == ΔH:
no LoRA on either, or ``ensure_weight_tying`` mirrors (H's A = E's Bᵀ, H's B = E's Aᵀ). Otherwise
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
from loracc.ir import Adapter, Site, SiteKind
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
        head = [s for s in adapter.sites if s.target == head_key]
        emb = [s for s in adapter.sites if s.target == emb_key]
        emb_own = [
            r for r in adapter.replacements if r.target == emb_key and r.origin == "modules_to_save"
        ]
        if not head and not emb and not emb_own:
            return PassResult(
                adapter, skipped=(Skip(head_key, "no edit differs between the tied pair"),)
            )
        if len(head) == 1 and len(emb) == 1 and not emb_own and _mirrors(head[0], emb[0]):
            sites = tuple(s for s in adapter.sites if s is not head[0])
            return PassResult(
                replace(adapter, sites=sites),
                changed=(head_key,),
                details=(
                    f"{head_key}: mirrors {emb_key} (ensure_weight_tying); applied once, tie kept",
                ),
            )
        shared_rows = tuple(
            replace(t, target=head_key) for t in adapter.token_rows if t.target == emb_key
        )
        shared_resize = tuple(
            replace(r, target=head_key)
            for r in adapter.replacements
            if r.target == emb_key and r.origin == "embedding"
        )
        sources = dict(adapter.tensor_sources)
        sources[head_key] = emb_key
        updates = dict(adapter.config_updates)
        updates["tie_word_embeddings"] = False
        return PassResult(
            replace(
                adapter,
                token_rows=adapter.token_rows + shared_rows,
                replacements=adapter.replacements + shared_resize,
                tensor_sources=MappingProxyType(sources),
                config_updates=MappingProxyType(updates),
            ),
            changed=(head_key,),
            details=(f"{head_key}: untied from {emb_key}; the adapter edits them differently",),
        )
