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

from loracc.ir import Adapter
from loracc.passes.base import Pass, PassContext, PassResult, Skip

__all__ = ["FoldScaling"]


@dataclass(frozen=True, slots=True)
class FoldScaling(Pass):
    """Fold each site's scale into lora_B (and its bias)."""

    name: ClassVar[str] = "fold-scaling"

    def run(self, adapter: Adapter, ctx: PassContext) -> PassResult:
        sites, changed, skipped = [], [], []
        for site in adapter.sites:
            if site.scale == 1.0 and site.alpha == site.rank:
                skipped.append(Skip(site.module, "scale is already 1"))
                sites.append(site)
                continue
            s = site.scale
            folded = replace(
                site,
                lora_B=site.lora_B * s,
                lora_bias=None if site.lora_bias is None else site.lora_bias * s,
                initial=None if site.initial is None else (site.initial[0], site.initial[1] * s),
                scale=1.0,
                alpha=float(site.rank),
                use_rslora=False,
            )
            sites.append(folded)
            changed.append(site.module)
        if not changed:
            return PassResult(adapter, (), tuple(skipped))
        return PassResult(replace(adapter, sites=tuple(sites)), tuple(changed), tuple(skipped))
