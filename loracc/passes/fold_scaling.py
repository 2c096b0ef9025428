"""fold-scaling: move the LoRA scale into B.

Identity: ``s · B @ A == (s · B) @ A`` with s = alpha/r, or alpha/sqrt(r) under rsLoRA; lora_B's
bias is scaled with B. After the pass every site has ``scale == 1`` and ``alpha == r``, so
runtimes that ignore rsLoRA and alpha_pattern compute the same delta.

PEFT fields read: lora_alpha, alpha_pattern, use_rslora (already resolved into ``Site.scale``).

Rounding: the folded product can differ from peft's ``(B @ A) * s`` in the last bit for a
scale that is not a power of two; the merge pipeline therefore does not run this pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from loracc.ir import Adapter, Site
from loracc.passes.base import PassContext, Rewritten, SitePass, Skip

__all__ = ["FoldScaling"]


@dataclass(frozen=True, slots=True)
class FoldScaling(SitePass):
    """Fold each site's scale into lora_B (and its bias)."""

    name: ClassVar[str] = "fold-scaling"

    def rewrite(self, site: Site, adapter: Adapter, ctx: PassContext) -> Rewritten | Skip:
        if site.scale == 1.0 and site.alpha == site.rank:
            return Skip(site.module, "scale is already 1")
        s = site.scale
        return Rewritten(
            replace(
                site,
                lora_B=site.lora_B * s,
                lora_bias=None if site.lora_bias is None else site.lora_bias * s,
                initial=None if site.initial is None else (site.initial[0], site.initial[1] * s),
                scale=1.0,
                alpha=float(site.rank),
                use_rslora=False,
            )
        )
