"""truncate-rank: cut each site's delta to a lower rank, through its factors.

Identity (Eckart–Young): the best rank-k approximation of ``ΔW = s·B·A`` in the Frobenius norm
keeps its k largest singular triplets. They come from the factors alone, without forming the
(out, in) delta::

    B = Q_B·R_B,  Aᵀ = Q_A·R_A            (thin QR: (out, r), (in, r) and two r×r)
    R_B·R_Aᵀ = U·Σ·Vᵀ                     (SVD of an r×r core)
    B·A = (Q_B·U)·Σ·(Q_A·V)ᵀ
    B' = Q_B·U_k·√Σ_k,  A' = √Σ_k·(Q_A·V_k)ᵀ,  s' = s

Cost O((out + in)·r²) instead of O(out·in·min(out, in)) for a dense SVD (scripts/bench_truncate.py).
The rank kept is ``rank`` (a cap) and/or the smallest k whose singular values keep a fraction
``energy`` of ``‖ΔW‖²_F``. The relative Frobenius error ``√(Σ_{i>k} σ_i²) / √(Σ σ_i²)`` is
reported per site. A site whose rank is already within the cap and the energy target is left
untouched, so truncating a rank-r adapter at rank r is exact. Singular-vector signs are
normalized (largest entry of each column of ``Q_B·U`` positive) so the result does not depend
on the LAPACK build. Computed in fp64, stored back in the factors' dtype; ``lora_alpha`` becomes
``s·k`` (``s·√k`` under rsLoRA) so ``alpha/r`` still gives ``s``.

Conv factors are flattened to (r, in·k…) and (out, r): peft's conv delta is that product
reshaped (semantics §3). Skipped: 3-D expert parameters, folded DoRA sites (their channel scale
belongs to the full delta), and residual inits not yet reconstructed.

PEFT fields read: r (from shapes), lora_alpha, alpha_pattern, use_rslora (through Site.scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from loracc import kernels
from loracc.ir import PLAIN_INITS, Adapter, Site, SiteKind
from loracc.passes.base import PassContext, Rewritten, SitePass, Skip

__all__ = ["TruncateRank", "Truncation", "truncate_factors"]


@dataclass(frozen=True, slots=True)
class Truncation:
    """Truncated factors of ``B @ A`` and what was kept."""

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    singular_values: torch.Tensor
    rel_error: float


def truncate_factors(
    A: torch.Tensor, B: torch.Tensor, *, rank: int | None = None, energy: float | None = None
) -> Truncation:
    """Best rank-k factors of ``B @ A`` (B (m, r), A (r, n)) from QRs and an r×r SVD, in fp64."""
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    Qb, Rb = torch.linalg.qr(B64)
    Qa, Ra = torch.linalg.qr(A64.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    power = S.square()
    cumulative = power.cumsum(0)
    total = float(cumulative[-1])
    k = S.numel()
    if energy is not None and total > 0:
        target = torch.tensor(energy * total, dtype=cumulative.dtype)
        k = min(k, int(torch.searchsorted(cumulative, target)) + 1)
    if rank is not None:
        k = min(k, rank)
    k = max(k, 1)
    left = Qb @ U[:, :k]
    right = Qa @ Vh[:k].T
    # Sign convention: the largest-magnitude entry of each left singular vector is positive.
    signs = kernels.column_signs(left)
    left, right = left * signs, right * signs
    root = S[:k].sqrt()
    dropped = max(total - float(cumulative[k - 1]), 0.0)
    rel = math.sqrt(dropped / total) if total > 0 else 0.0
    return Truncation(  # "+ 0.0": BLAS builds differ in the sign of exact zeros; make them +0
        A=((right * root).T + 0.0).contiguous(),
        B=(left * root + 0.0).contiguous(),
        rank=k,
        singular_values=S,
        rel_error=rel,
    )


@dataclass(frozen=True, slots=True)
class TruncateRank(SitePass):
    """Truncate each site's delta to ``rank`` and/or the ``energy`` fraction of its energy.

    Args:
        rank: the largest rank kept per site.
        energy: the fraction of ``‖ΔW‖²_F`` kept per site, in (0, 1].
    """

    name: ClassVar[str] = "truncate-rank"
    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.rank is None and self.energy is None:
            raise ValueError("truncate-rank needs rank=R and/or energy=E")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")

    def rewrite(self, site: Site, adapter: Adapter, ctx: PassContext) -> Rewritten | Skip:
        reason = self._unsupported(site)
        if reason is not None:
            return Skip(site.module, reason)
        return self._truncate(site, ctx.device)

    @staticmethod
    def _unsupported(site: Site) -> str | None:
        if site.experts:
            return "3-D expert parameter: per-expert truncation is not supported"
        if site.channel_scale is not None:
            return "DoRA channel scale was computed for the full delta"
        if site.init not in PLAIN_INITS:
            return f"init_lora_weights='{site.init}': run reconstruct-residual first"
        return None

    def _truncate(self, site: Site, device: str) -> Rewritten | Skip:
        r = site.rank
        A = site.lora_A.flatten(1).to(device)
        B = site.lora_B.flatten(1).to(device)
        t = truncate_factors(A, B, rank=self.rank, energy=self.energy)
        if t.rank >= r:
            return Skip(site.module, f"rank {r} kept (relative error 0)")
        A_new = t.A.to(site.lora_A.dtype).cpu().reshape(t.rank, *site.lora_A.shape[1:])
        B_new = t.B.to(site.lora_B.dtype).cpu()
        if site.kind is SiteKind.CONV:
            B_new = B_new.reshape(B_new.shape[0], t.rank, *site.lora_B.shape[2:])
        k = t.rank
        alpha = site.scale * (math.sqrt(k) if site.use_rslora else k)
        new = replace(site, lora_A=A_new, lora_B=B_new, alpha=alpha, initial=None)
        return Rewritten(
            new, f"{site.module}: rank {r} -> {k}, relative Frobenius error {t.rel_error:.3e}"
        )
