"""Adapter slots in models loracc did not make (Olive, onnxruntime-genai's builder).

Slots are found by their names (graph inputs with same-name float initializers, as each tool names
them), their ranks from the shapes; an adapter is matched to them, fusing or splitting q/k/v as the
model's slots are. docs/ONNX.md "Models loracc did not make".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

import onnx_ir as ir

from loracc.errors import FormatError, UnsupportedError
from loracc.io.onnx_model import tensor_dims
from loracc.ir import PLAIN_INITS, Adapter, Site, SiteKind
from loracc.lower.onnx.lora import elem_type
from loracc.lower.onnx.slots import MANIFEST_KEY, Member, SlotGroup, slot_values

__all__ = ["FUSED_PARTS", "foreign_groups", "match_foreign"]


# Slot names of the tools that write adapter slots (docs/ONNX.md, "Models loracc did not make"):
# loracc, Olive's convert-adapters and its ExtractAdapters on TorchScript graphs write
# ``<module>.lora_A.weight``; ExtractAdapters on dynamo graphs keeps PEFT's parameter name
# (``base_model.model.<module>.lora_A.default.weight``); onnxruntime-genai's model builder and
# ``olive extract-adapters`` write ``<module>.lora_A.MatMul.weight`` with ``attn`` for
# ``self_attn``. Every one holds A as (in, r) and B as (r, out), the scale folded into B.
_SLOT_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])"
    r"(?:\.(?P<tag>[A-Za-z0-9_]+))?\.weight$"
)
# Fused projections (Phi-3's) and the split slots the builder and Olive write for them.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _canonical(module: str) -> str:
    """A module path as both namings spell it (the builder's ``attn`` is HF's ``self_attn``)."""
    return module.replace(".self_attn.", ".attn.")


def foreign_groups(model: ir.Model, where: str) -> tuple[list[SlotGroup], dict[str, int]]:
    """The LoRA slot pairs of a model without loracc's manifest, from the graph alone: graph
    inputs with same-name float initializers named as some tool names them, in/out from the
    shapes. Also the fixed rank of slots whose rank dimension is a number (quantized or
    ``dynamic_lora_r=False`` exports)."""
    pairs: dict[str, dict[str, ir.Value]] = {}
    for name, value in slot_values(model).items():
        m = _SLOT_NAME.match(name)
        if m is None:
            continue
        if m["tag"] == "quant":
            raise UnsupportedError(
                f"{where}: slot '{name}' holds quantized LoRA weights; pack writes float slots only"
            )
        pairs.setdefault(m["module"], {})[m["which"]] = value
    if not pairs:
        raise FormatError(
            f"{where}: no '{MANIFEST_KEY}' metadata and no LoRA slots (graph inputs with "
            "same-name initializers named '<module>.lora_A[.MatMul|.default].weight')"
        )
    groups: list[SlotGroup] = []
    fixed: dict[str, int] = {}
    seen: dict[str, str] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise FormatError(f"{where}: slot of '{module}' has no {missing} input")
        a, b = ab["A"], ab["B"]
        a_shape = tensor_dims(a.const_value.shape)  # type: ignore[union-attr]
        b_shape = tensor_dims(b.const_value.shape)  # type: ignore[union-attr]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise UnsupportedError(f"{where}: slots of '{module}' are not 2-D MatMul factors")
        other = seen.setdefault(_canonical(module), module)
        if other != module:
            raise FormatError(f"{where}: slots of '{other}' and '{module}' name one module")
        declared = a.shape.dims[1] if a.shape is not None and len(a.shape) == 2 else None
        groups.append(
            SlotGroup(
                key=module,
                op="MatMul",
                fan_in=a_shape[0],
                fan_out=b_shape[1],
                kernel=[],
                dtype=elem_type(a.const_value.dtype),  # type: ignore[union-attr]
                A=a.name or "",
                B=b.name or "",
                rank_dim=str(declared) if declared is not None else "",
                members=[],
                weight="",
                weight_transposed=False,
            )
        )
        if isinstance(declared, int):
            fixed[module] = declared
    return groups, fixed


def match_foreign(groups: Sequence[SlotGroup], adapter: Adapter, where: str) -> Adapter:
    """Give each of ``adapter``'s sites its slot in ``groups`` (:func:`foreign_groups`), by
    module path in either naming; a fused q/k/v (gate/up) site whose model has split slots is
    split into one site per slot (A shared, B's rows in the slots' order and sizes), and split
    q/k/v (gate/up) sites whose model has one fused slot become block members of it (rows in
    q, k, v order; k and v, gate and up, have equal sizes). Refuses sites with no slot, and
    what a slot pair without the base weights cannot hold."""
    by_module = {_canonical(g.key): g for g in groups}
    fused_of = {p: f for f, parts in FUSED_PARTS.items() for p in parts}
    sites: list[Site] = []
    blocks: dict[str, dict[str, Site]] = {}  # fused slot -> part name -> site
    missing: list[str] = []
    for site in adapter.sites:
        if site.kind not in (SiteKind.LINEAR, SiteKind.CONV1D):
            raise UnsupportedError(
                f"{adapter.name}: module '{site.module}' is a {site.kind.value} layer; slots of "
                f"{where} (not written by loracc) are read as MatMul factors only"
            )
        dora = site.magnitude is not None or site.channel_scale is not None
        if site.lora_bias is not None or dora or site.init not in PLAIN_INITS:
            what = "DoRA" if dora else "lora_bias" if site.lora_bias is not None else site.init
            raise UnsupportedError(
                f"{adapter.name}: module '{site.module}' uses {what}; {where} was not written "
                "by loracc: its slots hold LoRA factors only, and the base weights behind them "
                "are unknown"
            )
        canon = _canonical(site.module)
        parent, _, leaf = canon.rpartition(".")
        parts = [by_module.get(f"{parent}.{p}") for p in FUSED_PARTS.get(leaf, ())]
        fused = f"{parent}.{fused_of.get(leaf, '')}"
        if canon in by_module:
            sites.append(site)
        elif parts and all(parts):
            sites.extend(_split_site(site, parts, adapter.name, where))  # type: ignore[arg-type]
        elif leaf in fused_of and fused in by_module:
            blocks.setdefault(fused, {})[leaf] = site
        else:
            missing.append(site.module)
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise UnsupportedError(
            f"{adapter.name}: targets {', '.join(repr(m) for m in missing[:8])}{more}, which "
            f"{'has' if len(missing) == 1 else 'have'} no adapter slot in {where}"
        )
    for group in groups:
        group.members = []
    for site in sites:
        group = by_module[_canonical(site.module)]
        group.members.append(Member(site.module, site.kind.value, 0, group.fan_out))
    for fused, parts_of in blocks.items():
        group = by_module[fused]
        rows = _block_rows(group, parts_of, adapter.name, where)
        for leaf, site in parts_of.items():
            group.members.append(Member(site.module, site.kind.value, *rows[leaf]))
            sites.append(site)
    return replace(adapter, sites=tuple(sites))


def _block_rows(
    group: SlotGroup, parts_of: Mapping[str, Site], name: str, where: str
) -> dict[str, tuple[int, int]]:
    """Each part's rows of a fused slot's output: the sizes the adapter gives, the rest from
    the slot's size (k and v, gate and up, are equally wide)."""
    order = FUSED_PARTS[group.key.rpartition(".")[2]]
    known = {leaf: int(site.lora_B.shape[0]) for leaf, site in parts_of.items()}
    total = group.fan_out
    if len(order) == 2:  # gate/up
        sizes = dict.fromkeys(order, total // 2)
    else:  # q/k/v
        kv = known.get("k_proj", known.get("v_proj"))
        if kv is None:
            kv = (total - known["q_proj"]) // 2
        sizes = {"q_proj": total - 2 * kv, "k_proj": kv, "v_proj": kv}
    if any(known[leaf] != sizes[leaf] for leaf in known) or sum(sizes.values()) != total:
        given = ", ".join(f"{leaf} {size}" for leaf, size in known.items())
        raise UnsupportedError(
            f"{name}: the output sizes of {', '.join(repr(s.module) for s in parts_of.values())}"
            f" ({given}) do not split the fused slot '{group.key}' of {where} ({total} rows)"
        )
    rows, start = {}, 0
    for leaf in order:
        rows[leaf] = (start, start + sizes[leaf])
        start += sizes[leaf]
    return rows


def _split_site(site: Site, parts: Sequence[SlotGroup], name: str, where: str) -> list[Site]:
    """One site per split slot: the fused A for each, B's rows in the slots' order."""
    sizes = [g.fan_out for g in parts]
    if sum(sizes) != site.lora_B.shape[0]:
        raise UnsupportedError(
            f"{name}: module '{site.module}' has {site.lora_B.shape[0]} output rows; its split "
            f"slots in {where} ({', '.join(g.key for g in parts)}) take {sizes}"
        )
    out, start = [], 0
    for group, size in zip(parts, sizes, strict=True):
        module = f"{site.module.rpartition('.')[0]}.{group.key.rpartition('.')[2]}"
        b = site.lora_B[start : start + size]
        out.append(replace(site, module=module, target=f"{module}.weight", lora_B=b))
        start += size
    return out
