"""reconstruct-residual: express a PiSSA/OLoRA/CorDA/LoRA-GA adapter relative to the original base.

Identity: these inits train on a *residual* base ``W_res = W − s·B0·A0`` (peft ``lora/layer.py``
pissa_init, olora_init, corda_init, lora_ga_init), so the trained layer is
``W_res + s·B·A = W + s·(B·A − B0·A0)``. The pass rewrites each such site into a plain rank-2r
LoRA on the original ``W``, as peft's own weight conversion does
(``save_pretrained(path_initial_model_for_weight_conversion=...)``)::

    A' = [A; A0]   (2r, in)      B' = [B, −B0]   (out, 2r)      s' = s

``lora_alpha`` doubles (×√2 under rsLoRA) so that ``alpha/r`` still gives ``s``.

Where ``B0·A0`` comes from:

- the initial adapter (``--initial-adapter``: the folder saved right after ``get_peft_model``,
  before training) when the reader attached it as ``Site.initial``; exact for every init;
- otherwise recomputed from the original base, in fp32 as peft does:
  ``pissa``: ``W = U·S·Vh`` (``torch.linalg.svd``), ``A0 = diag(√(S_r/s))·Vh_r``,
  ``B0 = U_r·diag(√(S_r/s))`` on the (out, in) weight; ``s·B0·A0`` is the best rank-r
  approximation, unique up to singular-vector signs, which cancel in the product.
  ``olora``: ``Q, R = qr(W_stored)``, ``A0 = R[:r]``, ``B0 = Q[:, :r]``; ``Q_r·R_r`` projects W
  onto the span of its first r columns, so it too is unique. Recomputed factors get a sign
  convention (largest entry of each column of B0 positive, zeros +0) so the IR does not depend on
  the LAPACK build.
- ``kasa`` (``kasa_config``; peft ``variants.py`` KasaLinearVariant): every load of the adapter
  truncates the base to its rank-(k − r) SVD approximation, ``W_res = W − U_d·S_d·Vh_d`` with
  the r *smallest* singular components (k = min(out, in)); the reader already folded
  ``lora_diag`` into ``lora_B``. So ``A0 = Vh_d`` and ``B0 = U_d·S_d / s``, from one fp32
  ``torch.linalg.svd`` of the (out, in) weight, as peft's. The dropped part is unique (signs
  cancel) unless ``S[k−r−1] = S[k−r]``, where the split between kept and dropped is arbitrary:
  refused. The initial adapter plays no part.
- ``pissa_niter_K`` (a randomized ``svd_lowrank``), ``corda`` (activation covariances) and
  ``lora_ga`` (gradients) cannot be recomputed: the pass refuses and asks for the initial
  adapter. peft itself re-runs these inits when it reloads the adapter, so a reloaded
  ``pissa_niter`` adapter drifts from the trained model (semantics §7); loracc does not.

Inits that leave the base alone are plain LoRA: true, false, gaussian, orthogonal, mica, eva, and
every init on Embedding and Conv layers (peft only runs the base-changing inits on Linear and
Conv1D layers). ``loftq`` trains against a quantized base (bitsandbytes NF4/int8 of W), which no
weight on the original base reproduces: refused. An adapter peft already converted
(init_lora_weights true, rank 2r) is plain and passes through.

PEFT fields read: init_lora_weights, r (from shapes), lora_alpha, alpha_pattern, use_rslora.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from loracc import kernels
from loracc.errors import FormatError, InputError, UnsupportedError
from loracc.ir import PLAIN_INITS, Adapter, Site, SiteKind
from loracc.passes._weights import source_key, start_weight
from loracc.passes.base import PassContext, Rewritten, SitePass, Skip

__all__ = ["ReconstructResidual"]

_RECOMPUTABLE = ("pissa", "olora", "kasa")
_NEED_INITIAL = {
    "pissa_niter": "a randomized SVD (torch.svd_lowrank) drawn from the global RNG",
    "corda": "activation covariances collected on training data",
    "lora_ga": "gradients estimated on training data",
}


def _family(init: str) -> str:
    return "pissa_niter" if init.startswith("pissa_niter_") else init


def _origin(site: Site) -> str:
    """The config field that made the site a residual one, for messages."""
    return "kasa_config" if site.init == "kasa" else f"init_lora_weights='{site.init}'"


def _canonical(A0: torch.Tensor, B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each rank-1 pair so the largest entry of B0's column is positive, and make zeros +0.

    ``B0·A0`` is unchanged; the factors no longer depend on the LAPACK build's sign choices.
    """
    signs = kernels.column_signs(B0)
    return (A0 * signs[:, None] + 0.0).contiguous(), (B0 * signs + 0.0).contiguous()


def _pissa(weight: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    Sr = S[:r] / s
    return _canonical(torch.diag(torch.sqrt(Sr)) @ Vh[:r], U[:, :r] @ torch.diag(torch.sqrt(Sr)))


def _kasa(module: str, weight: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The r smallest singular components peft's KaSA drops: ``s·B0·A0 = U_d·S_d·Vh_d``."""
    k = min(weight.shape)
    if r >= k:
        raise FormatError(
            f"{module}: KaSA rank {r} is not below min(out, in) = {k} (peft refuses to create it)"
        )
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    keep = k - r
    if S[keep - 1] == S[keep]:
        raise UnsupportedError(
            f"{module}: KaSA truncation is ambiguous: singular values {keep} and {keep + 1} of "
            f"the base weight are equal ({float(S[keep]):.6g}), so which components peft drops "
            "depends on its LAPACK build"
        )
    return _canonical(Vh[keep:], U[:, keep:] * (S[keep:] / s))


def _olora(stored: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    Q, R = torch.linalg.qr(stored)
    return _canonical(R[:r], Q[:, :r])


@dataclass(frozen=True, slots=True)
class ReconstructResidual(SitePass):
    """Rewrite residual-base inits into rank-2r LoRA deltas on the original base."""

    name: ClassVar[str] = "reconstruct-residual"

    def requires(self, adapter: Adapter, ctx: PassContext) -> None:
        if ctx.base is not None:
            self._refuse_shared(adapter, ctx, [s for s in adapter.sites if self._changes_base(s)])

    def rewrite(self, site: Site, adapter: Adapter, ctx: PassContext) -> Rewritten | Skip:
        if site.init in PLAIN_INITS:
            return Skip(site.module, f"init_lora_weights={site.init} keeps the base")
        if not self._changes_base(site):
            return Rewritten(
                replace(site, init="true", initial=None),
                f"{site.module}: peft's '{site.init}' init leaves {site.kind.value} base "
                "layers unchanged; plain LoRA",
            )
        new, how = self._rewrite(adapter, ctx, site)
        return Rewritten(new, f"{site.module}: {site.init} residual from {how}; rank {new.rank}")

    @staticmethod
    def _changes_base(site: Site) -> bool:
        if site.init in PLAIN_INITS:
            return False
        if site.init == "loftq":
            return True
        return site.kind not in (SiteKind.EMBEDDING, SiteKind.CONV)

    @staticmethod
    def _refuse_shared(adapter: Adapter, ctx: PassContext, residual: list[Site]) -> None:
        """Refuse a residual init on a base tensor that several output layers share.

        peft's layer_replication copies share Parameters, and the init rewrites the shared
        weight in place: every copy, adapted or not, then runs on one residual, re-derived once
        per adapted copy. No per-layer merged weight reproduces that.
        """
        readers = Counter(adapter.tensor_sources.values())
        for site in residual:
            key = source_key(adapter, ctx, site.target)
            itself = key not in adapter.removed_keys and key not in adapter.tensor_sources
            n = readers[key] + int(itself)
            if n > 1:
                raise UnsupportedError(
                    f"{site.module}: {_origin(site)} on base tensor '{key}', "
                    f"which {n} layers share (layer_replication); peft re-initializes the shared "
                    "weight in place for every copy, which no merged weight reproduces"
                )

    def _rewrite(self, adapter: Adapter, ctx: PassContext, site: Site) -> tuple[Site, str]:
        init, family = site.init, _family(site.init)
        if init == "loftq":
            raise UnsupportedError(
                f"{site.module}: init_lora_weights='loftq' trains against a quantized base "
                "(bitsandbytes NF4/int8 of W) that loracc cannot reproduce; merge into the "
                "LoftQ base saved at training time instead"
            )
        if site.kind not in (SiteKind.LINEAR, SiteKind.CONV1D):
            raise UnsupportedError(
                f"{site.module}: init_lora_weights='{init}' on a {site.kind.value} site is not "
                "supported (peft's residual inits act on Linear and Conv1D weights)"
            )
        if site.initial is not None and init != "kasa":  # KaSA's B0·A0 is the base's alone
            A0, B0 = site.initial
            how = "the initial adapter"
        elif family in _RECOMPUTABLE:
            A0, B0 = self._recompute(adapter, ctx, site)
            how = "the original base (recomputed)"
        elif family in _NEED_INITIAL:
            raise UnsupportedError(
                f"{site.module}: init_lora_weights='{init}' trained on the residual base "
                f"W - s·B0·A0, and B0·A0 came from {_NEED_INITIAL[family]}, which cannot be "
                "recomputed. Pass --initial-adapter DIR: the adapter folder saved right after "
                "get_peft_model() and before training (peft's "
                "path_initial_model_for_weight_conversion folder)"
            )
        else:
            raise UnsupportedError(f"{site.module}: unknown init_lora_weights='{init}'")
        dtype = torch.promote_types(site.lora_A.dtype, A0.dtype)
        A = torch.cat([site.lora_A.to(dtype), A0.to(dtype)], dim=0)
        B = torch.cat([site.lora_B.to(dtype), -B0.to(dtype)], dim=1)
        alpha = site.alpha * (math.sqrt(2.0) if site.use_rslora else 2.0)
        new = replace(site, lora_A=A, lora_B=B, alpha=alpha, init="true", initial=None)
        return new, how

    @staticmethod
    def _recompute(
        adapter: Adapter, ctx: PassContext, site: Site
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.base is None:
            raise InputError(
                f"{site.module}: {_origin(site)} needs the original base "
                "checkpoint (--base) to recompute B0·A0"
            )
        stored = start_weight(adapter, ctx, site.target)
        r, s = site.rank, site.scale
        if site.init == "kasa":
            return _kasa(site.module, stored, r, s)  # peft's KaSA exists for nn.Linear only
        if site.init == "olora":
            if site.kind is SiteKind.CONV1D:
                raise UnsupportedError(
                    f"{site.module}: peft's OLoRA init on a Conv1D layer factors the stored "
                    "(in, out) weight, so its A and B are transposed relative to the layer "
                    "(merge crashes in peft unless the layer is square); refused"
                )
            return _olora(stored, r)
        weight = site.to_logical(stored)
        return _pissa(weight, r, s)
