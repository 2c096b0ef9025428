"""The delta formulas, in one place, written as peft 0.21 computes them.

Every function returns fp32 (or the requested float dtype) in the *stored* orientation of the
site's base tensor, so a lowering adds it to the tensor as read. The operation order matches
peft's ``get_delta_weight`` (``(B @ A) * s``, matmul first) so fp32 merges are bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from loracc.ir import Replacement, Site, SiteKind, TokenRows

__all__ = [
    "all_finite",
    "apply_channel_scale",
    "bias_delta",
    "channel_norm",
    "site_delta",
    "start_weight",
]

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def site_delta(
    site: Site,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``scale · B @ A`` in the stored orientation of ``site.target``."""
    A = site.lora_A.to(device=device, dtype=dtype)
    B = site.lora_B.to(device=device, dtype=dtype)
    s = site.scale
    kind = site.kind
    if kind is SiteKind.LINEAR:
        return (B @ A) * s
    if kind in (SiteKind.CONV1D, SiteKind.EMBEDDING):
        return (B @ A).T * s
    if kind is SiteKind.CONV:
        # peft's _ConvNd.get_delta_weight takes the matmul shortcut when the weight's
        # shape[2:4] == (1, 1): only Conv2d 1x1 gets there (on Conv3d (1, 1, k) that shortcut
        # crashes, so peft's merge has no result to match). Every other kernel, Conv1d's (1,)
        # included, goes through the conv, whose rounding differs from the matmul's.
        if A.shape[2:] == (1, 1):
            return (B.flatten(1) @ A.flatten(1))[:, :, None, None] * s
        return _CONV[A.dim()](A.transpose(0, 1), B).transpose(0, 1) * s
    if kind is SiteKind.PARAMETER:
        if not site.experts:
            return (B @ A) * s
        E = site.experts
        r = A.shape[0] // E
        A3 = A.reshape(E, r, A.shape[1])
        B3 = B.reshape(B.shape[0], r, E).permute(2, 0, 1)
        delta = (B3 @ A3) * s
        return delta.transpose(1, 2) if site.transposed else delta
    raise AssertionError(kind)


def bias_delta(site: Site, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """``scale · lora_B.bias`` (lora_bias=True)."""
    assert site.lora_bias is not None
    return site.lora_bias.to(device=device, dtype=torch.float32) * site.scale


def _channel_axes(site: Site, ndim: int) -> tuple[int, ...]:
    """Axes reduced by DoRA's norm, in stored orientation: all but the output channel."""
    if site.kind is SiteKind.CONV1D:
        return (0,)  # stored (in, out): norm per output column
    if site.kind is SiteKind.EMBEDDING:
        return (0,)  # peft: norm over the vocabulary, per embedding dim
    return tuple(range(1, ndim))


def channel_norm(site: Site, weight: torch.Tensor) -> torch.Tensor:
    """DoRA's ``‖W + ΔW‖`` per output channel, shaped to broadcast against the stored weight."""
    return torch.linalg.vector_norm(weight, dim=_channel_axes(site, weight.dim()), keepdim=True)


def apply_channel_scale(site: Site, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale ⊙ weight`` per output channel, ``scale`` flat (channels,)."""
    shape = [1] * weight.dim()
    axis = 1 if site.kind in (SiteKind.CONV1D, SiteKind.EMBEDDING) else 0
    shape[axis] = -1
    return weight * scale.to(weight).reshape(shape)


def start_weight(
    stored: Callable[[], torch.Tensor],
    replacement: Replacement | None,
    rows: Iterable[TokenRows],
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The fp32 tensor the deltas add to: the replacement (else the stored tensor), then rows."""
    if replacement is not None:
        w = replacement.tensor.to(device=device, dtype=torch.float32, copy=True)
    else:
        w = stored().to(device=device, dtype=torch.float32)
    for r in rows:
        idx = torch.tensor(r.indices, device=device)
        w.index_copy_(0, idx, r.rows.to(device=device, dtype=torch.float32))
    return w


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: a finite sum proves it in one pass without a temporary; only a
    sum that overflows (or a real NaN/Inf) needs the element-wise test."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())
