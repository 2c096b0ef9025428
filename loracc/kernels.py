"""The delta formulas, in one place, written as peft 0.21 computes them.

Every function returns fp32 (or the requested float dtype) in the *stored* orientation of the
site's base tensor, so a lowering adds it to the tensor as read. The operation order matches
peft's ``get_delta_weight`` (``(B @ A) * s``, matmul first) so fp32 merges are bit-identical.

:func:`apply_edits` is the one order of the edits on one tensor (:class:`Step`); the checkpoint
merge, the merged ONNX lowering and the passes that need ``W`` all apply edits through it or its
steps (:func:`put_rows`, :func:`add_site`, :func:`bias_delta`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from loracc.ir import Site, SiteKind, TargetEdits, TokenRows

__all__ = [
    "Step",
    "add_site",
    "all_finite",
    "apply_channel_scale",
    "apply_edits",
    "bias_delta",
    "channel_axis",
    "channel_norm",
    "channel_shape",
    "column_signs",
    "put_rows",
    "site_delta",
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
    if kind is SiteKind.EMBEDDING:
        return (B @ A).T * s  # B @ A is (dim, num); the logical (num, dim) is stored
    if kind is SiteKind.CONV:
        # peft's _ConvNd.get_delta_weight takes the matmul shortcut when the weight's
        # shape[2:4] == (1, 1): only Conv2d 1x1 gets there (on Conv3d (1, 1, k) that shortcut
        # crashes, so peft's merge has no result to match). Every other kernel, Conv1d's (1,)
        # included, goes through the conv, whose rounding differs from the matmul's.
        if A.shape[2:] == (1, 1):
            return (B.flatten(1) @ A.flatten(1))[:, :, None, None] * s
        return _CONV[A.dim()](A.transpose(0, 1), B).transpose(0, 1) * s
    if site.experts:
        E = site.experts
        r = A.shape[0] // E
        A3 = A.reshape(E, r, A.shape[1])
        B3 = B.reshape(B.shape[0], r, E).permute(2, 0, 1)
        return site.to_stored((B3 @ A3) * s)
    return site.to_stored((B @ A) * s)  # LINEAR, CONV1D, 2-D PARAMETER: logical (out, in)


def bias_delta(site: Site, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """``scale · lora_B.bias`` (lora_bias=True)."""
    assert site.lora_bias is not None
    return site.lora_bias.to(device=device, dtype=torch.float32) * site.scale


def channel_axis(site: Site) -> int:
    """The stored weight's axis DoRA scales per: the logical channel axis, moved by the
    stored orientation's transpose (Conv1D's output channels are its columns)."""
    return site.stored_axis(site.kind.channel_axis)


def channel_shape(ndim: int, axis: int, channels: int = -1) -> list[int]:
    """The shape that broadcasts a flat (channels,) vector along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = channels
    return shape


def channel_norm(site: Site, weight: torch.Tensor) -> torch.Tensor:
    """DoRA's ``‖W + ΔW‖`` per output channel, shaped to broadcast against the stored weight."""
    axis = channel_axis(site)
    others = tuple(d for d in range(weight.dim()) if d != axis)
    return torch.linalg.vector_norm(weight, dim=others, keepdim=True)


def apply_channel_scale(site: Site, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight *= scale`` per channel, in place, ``weight`` stored, ``scale`` flat (channels,)."""
    return weight.mul_(scale.to(weight).reshape(channel_shape(weight.dim(), channel_axis(site))))


class Step(enum.IntEnum):
    """The order of the edits on one tensor: the order peft's unmerged forward composes them."""

    REPLACE = 0  # a whole replacement (modules_to_save, a trained bias, a resized embedding)
    ROWS = 1  # trainable-token rows, W[idx] = rows
    DELTA = 2  # each site's s·B@A, then its DoRA channel scale
    BIAS = 3  # each lora_bias, b += s·b_B


def apply_edits(
    stored: Callable[[], torch.Tensor],
    edits: TargetEdits,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The fp32 tensor ``edits`` make of the tensor ``stored()`` reads, steps in :class:`Step`
    order; ``stored`` is not called when a replacement supplies the tensor."""
    if edits.replacement is not None:
        w = edits.replacement.tensor.to(device=device, dtype=torch.float32, copy=True)
    else:
        w = stored().to(device=device, dtype=torch.float32)
    for rows in edits.rows:
        put_rows(w, rows)
    for site in edits.sites:
        add_site(w, site)
    for site in edits.bias_sites:
        w += bias_delta(site, device=w.device)
    return w


def put_rows(weight: torch.Tensor, rows: TokenRows) -> torch.Tensor:
    """``weight[rows.indices] = rows.rows``, in place (``weight`` may be a transposed view)."""
    idx = torch.tensor(rows.indices, device=weight.device)
    new = rows.rows.to(device=weight.device, dtype=torch.float32)  # the one rounding, as merged
    return weight.index_copy_(0, idx, new.to(weight.dtype))


def add_site(weight: torch.Tensor, site: Site) -> torch.Tensor:
    """``weight += s·B@A``, then DoRA's folded channel scale, in place; ``weight`` (fp32 or
    fp64) in the site's stored orientation, or a view of a fused weight's rows seen that way."""
    weight += site_delta(site, device=weight.device)
    if site.channel_scale is not None:
        apply_channel_scale(site, weight, site.channel_scale)
    return weight


def column_signs(columns: torch.Tensor) -> torch.Tensor:
    """The sign that makes each column's largest-magnitude entry positive (+1 for a zero column).

    Multiplying a factor pair's rank-1 terms by these signs leaves ``B @ A`` unchanged and makes
    SVD-derived factors independent of the LAPACK build's sign choices.
    """
    pick = columns.abs().argmax(dim=0)
    signs = torch.sign(columns[pick, torch.arange(columns.shape[1])])
    signs[signs == 0] = 1
    return signs


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: a finite sum proves it in one pass without a temporary; only a
    sum that overflows (or a real NaN/Inf) needs the element-wise test."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())
