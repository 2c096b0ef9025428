"""fold-dora: turn DoRA's magnitude into a per-output-channel scale of the merged weight.

Identity (DoRA, https://arxiv.org/abs/2402.09353; peft ``lora/dora.py``, ``variants.py``)::

    W' = (m / ‖W + s·B·A‖) ⊙ (W + s·B·A)        per output channel

with peft's norm orientation: Linear and Conv1D take the L2 norm of each output row of the
(out, in) weight (Conv1D is stored (in, out), so per stored column); ConvNd over every axis but
``out``; Embedding over the vocabulary for each embedding dim (stored (num, dim), so per column).
The norm is a constant of the weights at inference (peft detaches it), so the pass computes
``channel_scale = m / n`` once from the base tensor and the site's delta, and clears the
magnitude. What remains is a plain LoRA branch next to a per-channel scale, which the merge
lowering applies as ``channel_scale ⊙ (W + ΔW)`` and an ONNX lowering can emit as a ``Mul``.

PEFT fields read: use_dora (through the saved ``lora_magnitude_vector``), lora_alpha,
alpha_pattern, use_rslora (through ``Site.scale``). Base tensors are read one at a time.

Refuses: a zero (or non-finite) norm, which makes peft's forward NaN/Inf
(:class:`~loracc.errors.NonFiniteError`, naming the module and the channel).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from loracc import kernels
from loracc.errors import NonFiniteError, PassError, UnsupportedError
from loracc.ir import PLAIN_INITS, Adapter, Site
from loracc.passes._weights import start_weight
from loracc.passes.base import PassContext, Rewritten, SitePass, Skip

__all__ = ["FoldDora"]


@dataclass(frozen=True, slots=True)
class FoldDora(SitePass):
    """Replace each DoRA magnitude by ``channel_scale = m / ‖W + ΔW‖``."""

    name: ClassVar[str] = "fold-dora"

    def requires(self, adapter: Adapter, ctx: PassContext) -> None:
        if ctx.base is None and any(s.magnitude is not None for s in adapter.sites):
            raise PassError("fold-dora needs the base checkpoint: DoRA's norm is ‖W + ΔW‖")

    def rewrite(self, site: Site, adapter: Adapter, ctx: PassContext) -> Rewritten | Skip:
        if site.magnitude is None:
            return Skip(site.module, "not DoRA")
        if site.init not in PLAIN_INITS:
            raise PassError(
                f"{site.module}: fold-dora must run after reconstruct-residual "
                f"(init_lora_weights='{site.init}')"
            )
        start = start_weight(adapter, ctx, site.target, device=ctx.device)
        stored = site.kind.stored_shape(site.logical_shape())
        if tuple(start.shape) != tuple(stored):  # a saved base weight read in another layout
            raise UnsupportedError(
                f"{site.module}: the base weight '{site.target}' is {list(start.shape)}, and "
                f"the adapter's factors as {site.kind.value} ({site.layout_source}) need "
                f"{list(stored)} (--layout decides a module's layout)"
            )
        weight = kernels.add_site(start, site)
        norm = kernels.channel_norm(site, weight).reshape(-1)
        bad = ~torch.isfinite(norm) | (norm == 0)
        if bool(bad.any()):
            channel = int(bad.nonzero()[0, 0])
            raise NonFiniteError(
                f"{site.module}: DoRA norm ‖W + ΔW‖ is {float(norm[channel])} for output "
                f"channel {channel}; m/‖W + ΔW‖ is not finite (peft's forward gives NaN/Inf)"
            )
        magnitude = site.magnitude.to(device=ctx.device, dtype=torch.float32).reshape(-1)
        scale = (magnitude / norm).cpu()
        return Rewritten(
            replace(site, magnitude=None, channel_scale=scale),
            f"{site.module}: channel scale in [{float(scale.min()):.4g}, "
            f"{float(scale.max()):.4g}] over {scale.numel()} channels",
        )
