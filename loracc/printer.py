"""A deterministic text form of the IR, for golden tests and ``loracc compile --emit ir``.

Sites are sorted by target then module; tensors print as shape, dtype and the first 12 hex digits
of the SHA-256 of their bytes, so a golden file changes exactly when the data does.
"""

from __future__ import annotations

import hashlib

import torch

from loracc.ir import Adapter, Site

__all__ = ["print_ir", "tensor_summary"]


def tensor_summary(t: torch.Tensor) -> str:
    """``[shape] dtype #hash`` of a tensor."""
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()[:12]
    dtype = str(t.dtype).removeprefix("torch.")
    return f"[{'x'.join(map(str, t.shape))}] {dtype} #{digest}"


def _fmt(value: float) -> str:
    return repr(float(value))


def _site(site: Site) -> list[str]:
    lines = [
        f"site {site.module} -> {site.target}",
        f"  kind={site.kind.value} rank={site.rank} alpha={_fmt(site.alpha)} "
        f"scale={_fmt(site.scale)} rslora={str(site.use_rslora).lower()} "
        f"variant={site.variant} init={site.init}",
        f"  lora_A {tensor_summary(site.lora_A)}",
        f"  lora_B {tensor_summary(site.lora_B)}",
    ]
    if site.layout_source:
        lines.append(f"  layout: {site.layout_source}")
    if site.experts:
        lines.append(f"  experts={site.experts} transposed={str(site.transposed).lower()}")
    if site.lora_bias is not None:
        lines.append(f"  lora_bias -> {site.bias_target} {tensor_summary(site.lora_bias)}")
    if site.magnitude is not None:
        lines.append(f"  magnitude {tensor_summary(site.magnitude)}")
    if site.channel_scale is not None:
        lines.append(f"  channel_scale {tensor_summary(site.channel_scale)}")
    if site.initial is not None:
        lines.append(f"  initial_A {tensor_summary(site.initial[0])}")
        lines.append(f"  initial_B {tensor_summary(site.initial[1])}")
    return lines


def print_ir(adapter: Adapter) -> str:
    """The adapter as sorted, hash-summarized text (no paths, so goldens are portable)."""
    lines: list[str] = []
    for site in sorted(adapter.sites, key=lambda s: (s.target, s.module)):
        lines.extend(_site(site))
    for r in sorted(adapter.replacements, key=lambda r: r.target):
        lines.append(f"replace {r.target} ({r.origin}) {tensor_summary(r.tensor)}")
    for t in sorted(adapter.token_rows, key=lambda t: t.target):
        idx = ",".join(map(str, t.indices))
        lines.append(f"token_rows {t.target} [{idx}] {tensor_summary(t.rows)}")
    if adapter.layer_replication:
        lines.append(f"layer_replication {[list(p) for p in adapter.layer_replication]}")
    for k in sorted(adapter.tensor_sources):
        lines.append(f"source {k} <- {adapter.tensor_sources[k]}")
    for k in sorted(adapter.removed_keys):
        lines.append(f"removed {k}")
    for k in sorted(adapter.config_updates):
        lines.append(f"config {k} = {adapter.config_updates[k]!r}")
    for reason in adapter.refusals:
        lines.append(f"refused {reason}")
    return "\n".join(lines) + "\n"
