"""The IR verifier: every invariant a well-formed adapter keeps, checked all at once.

:func:`loracc.pipeline.run_pipeline` runs it before the first pass and after each one when
called with ``check=True`` or when ``LORACC_VERIFY=1`` (the tests set it). A broken invariant
after a pass is a loracc bug, so the error names the pass. tests/test_verify.py breaks each
invariant on purpose.
"""

from __future__ import annotations

import math

from loracc.errors import VerifyError
from loracc.ir import Adapter, Site, SiteKind

__all__ = ["problems", "verify"]


def _site_problems(site: Site) -> list[str]:
    out: list[str] = []
    A, B = site.lora_A, site.lora_B
    name = site.module
    if not (A.is_floating_point() and B.is_floating_point()):
        out.append(f"{name}: factors must be floating point, got {A.dtype}/{B.dtype}")
    if A.dim() < 2 or B.dim() != A.dim():
        out.append(f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} ranks differ")
        return out
    if B.shape[1] != A.shape[0]:
        out.append(f"{name}: lora_B has {B.shape[1]} columns, lora_A {A.shape[0]} rows")
    if site.experts and A.shape[0] % site.experts:
        out.append(f"{name}: {A.shape[0]} rows of lora_A do not split into {site.experts} experts")
    if site.kind is SiteKind.CONV and any(d != 1 for d in B.shape[2:]):
        out.append(f"{name}: conv lora_B kernel must be 1, got {tuple(B.shape[2:])}")
    if site.kind is not SiteKind.CONV and A.dim() != 2:
        out.append(f"{name}: {site.kind.value} factors must be 2-D")
    if not math.isfinite(site.scale):
        out.append(f"{name}: scale {site.scale} is not finite")
    out_dim = B.shape[0]
    if site.lora_bias is not None and site.lora_bias.shape != (out_dim,):
        out.append(f"{name}: lora bias {tuple(site.lora_bias.shape)}, expected ({out_dim},)")
    if site.lora_bias is not None and site.bias_target is None:
        out.append(f"{name}: lora bias without a bias target")
    channels = B.shape[0]
    for label, vec in (("magnitude", site.magnitude), ("channel scale", site.channel_scale)):
        if vec is not None and vec.numel() != channels:
            out.append(f"{name}: DoRA {label} has {vec.numel()} values, expected {channels}")
    if site.magnitude is not None and site.channel_scale is not None:
        out.append(f"{name}: both a raw DoRA magnitude and a folded channel scale")
    if site.initial is not None:
        A0, B0 = site.initial
        if A0.shape != A.shape or B0.shape != B.shape:
            out.append(f"{name}: initial factors {tuple(A0.shape)}/{tuple(B0.shape)} differ")
    return out


def problems(adapter: Adapter) -> list[str]:
    """Every broken invariant of ``adapter``, as messages."""
    out: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for site in adapter.sites:
        out.extend(_site_problems(site))
        key = (site.target, site.module)
        if key in seen:
            out.append(f"{site.module}: two sites for the same module and target")
        seen[key] = site.module
    replaced = [r.target for r in adapter.replacements]
    if len(set(replaced)) != len(replaced):
        out.append("a base tensor is replaced twice")
    for rows in adapter.token_rows:
        if rows.rows.dim() != 2 or rows.rows.shape[0] != len(rows.indices):
            out.append(
                f"{rows.target}: {len(rows.indices)} token indices, rows {tuple(rows.rows.shape)}"
            )
        if len(set(rows.indices)) != len(rows.indices):
            out.append(f"{rows.target}: a token index repeats")
    for out_key, src in adapter.tensor_sources.items():
        if not out_key or not src:
            out.append(f"tensor source '{out_key}' <- '{src}' is empty")
    return out


def verify(adapter: Adapter, *, after: str | None = None) -> None:
    """Raise VerifyError listing every broken invariant."""
    found = problems(adapter)
    if found:
        where = f" after pass '{after}'" if after else ""
        raise VerifyError(f"IR invalid{where}: " + "; ".join(found))
