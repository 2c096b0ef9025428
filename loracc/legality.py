"""What each output can express: one table, IR feature × target → ok, or the reason it is refused.

A lowering calls :func:`require` with its :class:`Target` once the pipeline has run, and with
``before_passes=True`` right after reading the adapter: only the cells marked ``before_passes``
are checked then (the reader's refusals, structure the ONNX graph cannot gain), so those refusals
come before any pass reads the base. The cells that name a pass are postconditions of that pass:
reaching them is a pipeline bug, and the message says which pass should have run.

The table is the single answer to "can this be lowered?": merge (``lower/merge.py``), the ONNX
export in both modes (``api/onnx``), and ``convert``'s PEFT writer (``io/peft_writer.py``) ask it,
and tests/test_legality.py checks every cell on a hand-built IR.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loracc.errors import LoraccError, UnsupportedError
from loracc.ir import PLAIN_INITS, Adapter, Site, SiteKind

if TYPE_CHECKING:
    from loracc.weights import BaseWeights

__all__ = ["FEATURES", "TABLE", "Feature", "Refuse", "Target", "require"]


class Target(str, enum.Enum):
    """An output loracc lowers an adapter to."""

    MERGE = "merge"  # `loracc merge`: dense Hugging Face checkpoint
    ONNX_MERGE = "onnx-merge"  # `export --onnx`: edited initializers
    ONNX_KEEP_LORA = "onnx-keep-lora"  # `export --onnx --keep-lora`, `pack`: adapter slots
    PEFT_ADAPTER = "peft-adapter"  # `loracc convert`: a plain PEFT LoRA adapter


@dataclass(frozen=True, slots=True)
class Refuse:
    """A refused cell: the message (a format string over the feature's fields) and when it applies.

    Attributes:
        reason: ``str.format`` template; fields: ``adapter``, and per feature ``refusal``,
            ``module``, ``init``, ``scale``, ``owner``.
        before_passes: also checked right after reading, before any pass reads the base.
        error: the exception class raised.
    """

    reason: str
    before_passes: bool = False
    error: type[LoraccError] = UnsupportedError


# A feature's finder returns the fields of its first use in the adapter (None: not used). Site
# features are asked per site, in site order, so the first offending module is named.
AdapterFinder = Callable[[Adapter, "BaseWeights | None"], "dict[str, object] | None"]
SiteFinder = Callable[[Site], bool]


@dataclass(frozen=True, slots=True)
class Feature:
    """An IR feature some target may not express.

    Exactly one of ``adapter`` (a whole-adapter finder) or ``site`` (a per-site predicate) is set.
    """

    name: str
    doc: str
    adapter: AdapterFinder | None = None
    site: SiteFinder | None = None


def _first_refusal(adapter: Adapter, base: BaseWeights | None) -> dict[str, object] | None:
    return {"refusal": adapter.refusals[0]} if adapter.refusals else None


def _any(used: Callable[[Adapter], object]) -> AdapterFinder:
    return lambda adapter, base: {} if used(adapter) else None


def _split_experts(adapter: Adapter, base: BaseWeights | None) -> dict[str, object] | None:
    if base is None:
        return None
    split = {k for s in base.expert_splits.values() for keys in s.keys for k in keys}
    return {} if any(site.target in split for site in adapter.sites) else None


def _shared_owner(adapter: Adapter, base: BaseWeights | None) -> dict[str, object] | None:
    owners = Counter(
        s.module.rsplit(".", 1)[0] for s in adapter.sites if s.kind is SiteKind.PARAMETER
    )
    many = sorted(owner for owner, n in owners.items() if n > 1)
    return {"owner": many[0]} if many else None


# Checked in this order: whole-adapter features, every site (site by site, so the first
# offending module is named), then the features that look across sites.
_WHOLE: tuple[Feature, ...] = (
    Feature("refusals", "the reader found a config no merged form exists for", _first_refusal),
    Feature(
        "layer-replication",
        "layer_replication ranges, before expand-layer-replication",
        _any(lambda a: a.layer_replication),
    ),
    Feature("replacements", "whole-tensor replacements", _any(lambda a: a.replacements)),
    Feature("token-rows", "trainable-token rows", _any(lambda a: a.token_rows)),
    Feature(
        "tensor-sources",
        "output keys copied from another base key",
        _any(lambda a: a.tensor_sources),
    ),
    Feature("removed-keys", "base keys left out of the output", _any(lambda a: a.removed_keys)),
    Feature(
        "split-experts",
        "fused expert parameters the base stores per expert (needs the base)",
        _split_experts,
    ),
)
_PER_SITE: tuple[Feature, ...] = (
    Feature(
        "dora", "a raw DoRA magnitude, before fold-dora", site=lambda s: s.magnitude is not None
    ),
    Feature(
        "dora-folded",
        "a DoRA channel scale (fold-dora's output)",
        site=lambda s: s.channel_scale is not None,
    ),
    Feature(
        "residual-init",
        "a residual-base init (pissa, olora, ...), before reconstruct-residual",
        site=lambda s: s.init not in PLAIN_INITS,
    ),
    Feature(
        "initial-factors",
        "initial (A0, B0) factors still attached",
        site=lambda s: s.initial is not None,
    ),
    Feature(
        "unfolded-scale",
        "a scale other than 1 (alpha != r or rsLoRA), before fold-scaling",
        site=lambda s: s.scale != 1.0 or s.alpha != s.rank or s.use_rslora,
    ),
    Feature("experts", "a 3-D expert parameter site", site=lambda s: bool(s.experts)),
)
_ACROSS: tuple[Feature, ...] = (
    Feature("shared-owner", "several target_parameters on one module", _shared_owner),
)
FEATURES: tuple[Feature, ...] = _WHOLE + _PER_SITE + _ACROSS

_RESIDUAL_NEEDS_PASS = "{module}: init_lora_weights='{init}' needs the reconstruct-residual pass"
_ONNX_RESIDUAL = (
    "{module}: init_lora_weights='{init}' applies to a residual base; the reconstruct-residual "
    "pass did not turn it into plain LoRA"
)
_PEFT_RESIDUAL = (
    "{module}: init_lora_weights='{init}' must be reconstructed first (reconstruct-residual)"
)
_PEFT_DORA = (
    "{module}: DoRA cannot be written as a plain LoRA adapter: its m/‖W + ΔW‖ scale is not a "
    "low-rank delta on the original base"
)
_DORA_NOT_FOLDED = "{module}: DoRA magnitude not folded (fold-dora pass)"
_ONNX_LAYERS = Refuse(
    "{adapter}: layer_replication adds layers; the ONNX graph would need new layers, which "
    "loracc does not build (merge the adapter into the HF checkpoint with `loracc merge` and "
    "re-export instead)",
    before_passes=True,
)
_ONNX_SPLIT = Refuse(
    "{adapter}: --base-weights stores the fused expert parameters one tensor per expert, and the "
    "ONNX graph holds them fused (E, out, in); export without --base-weights (the graph's expert "
    "weights give the shapes)",
    before_passes=True,
)

_M, _OM, _OK, _P = Target.MERGE, Target.ONNX_MERGE, Target.ONNX_KEEP_LORA, Target.PEFT_ADAPTER

# Every cell is written out; None is "ok".
TABLE: Mapping[str, Mapping[Target, Refuse | None]] = {
    "refusals": {
        _M: Refuse("{adapter}: cannot merge: {refusal}", before_passes=True),
        _OM: Refuse("{adapter}: {refusal}", before_passes=True),
        _OK: Refuse("{adapter}: {refusal}", before_passes=True),
        _P: Refuse("{adapter}: cannot convert: {refusal}", before_passes=True),
    },
    "layer-replication": {
        _M: Refuse("{adapter}: layer_replication needs the expand-layer-replication pass"),
        _OM: _ONNX_LAYERS,
        _OK: _ONNX_LAYERS,
        _P: None,  # the written adapter keeps layer_replication; peft replicates on load
    },
    "replacements": {_M: None, _OM: None, _OK: None, _P: None},
    "token-rows": {_M: None, _OM: None, _OK: None, _P: None},
    "tensor-sources": {_M: None, _OM: None, _OK: None, _P: None},
    "removed-keys": {_M: None, _OM: None, _OK: None, _P: None},
    "split-experts": {
        _M: None,
        _OM: _ONNX_SPLIT,
        _OK: _ONNX_SPLIT,
        _P: Refuse(
            "{adapter}: cannot convert: fused expert target_parameters stored per expert in the "
            "base are not written back as a PEFT adapter yet"
        ),
    },
    "dora": {
        _M: Refuse(_DORA_NOT_FOLDED),
        _OM: Refuse(_DORA_NOT_FOLDED),
        _OK: Refuse(_DORA_NOT_FOLDED),
        _P: Refuse(_PEFT_DORA),
    },
    "dora-folded": {_M: None, _OM: None, _OK: None, _P: Refuse(_PEFT_DORA)},
    "residual-init": {
        _M: Refuse(_RESIDUAL_NEEDS_PASS),
        _OM: Refuse(_ONNX_RESIDUAL),
        _OK: Refuse(_ONNX_RESIDUAL),
        _P: Refuse(_PEFT_RESIDUAL),
    },
    "initial-factors": {_M: None, _OM: None, _OK: None, _P: Refuse(_PEFT_RESIDUAL)},
    "unfolded-scale": {
        _M: None,
        _OM: None,
        _OK: None,
        _P: Refuse("{module}: scale {scale} not folded (fold-scaling) before writing"),
    },
    "experts": {
        _M: None,
        _OM: None,  # lower/onnx/experts.py
        _OK: None,
        _P: Refuse("{module}: writing 3-D expert parameter sites is not supported"),
    },
    "shared-owner": {
        _M: None,
        _OM: None,
        _OK: None,
        _P: Refuse(
            "{owner}: several target_parameters on one module (peft nests their wrappers); "
            "writing them is not supported"
        ),
    },
}


def _cell(feature: Feature, target: Target, before_passes: bool) -> Refuse | None:
    cell = TABLE[feature.name][target]
    return None if cell is None or (before_passes and not cell.before_passes) else cell


def _refuse(cell: Refuse, adapter: Adapter, fields: Mapping[str, object]) -> LoraccError:
    return cell.error(cell.reason.format(adapter=adapter.name, **fields))


def require(
    adapter: Adapter,
    target: Target,
    *,
    base: BaseWeights | None = None,
    before_passes: bool = False,
) -> None:
    """Raise the first refusal :data:`TABLE` gives ``adapter`` for ``target``.

    Args:
        adapter: the IR to lower (after the target's pipeline, unless ``before_passes``).
        target: the output.
        base: the base weights, for features only the base decides (``split-experts``).
        before_passes: check only the cells no pass can change (right after reading).
    """
    for feature in _WHOLE:
        _check_whole(feature, adapter, target, base, before_passes)
    for site in adapter.sites:
        for feature in _PER_SITE:
            cell = _cell(feature, target, before_passes)
            if cell is not None and feature.site is not None and feature.site(site):
                fields = {"module": site.module, "init": site.init, "scale": site.scale}
                raise _refuse(cell, adapter, fields)
    for feature in _ACROSS:
        _check_whole(feature, adapter, target, base, before_passes)


def _check_whole(
    feature: Feature,
    adapter: Adapter,
    target: Target,
    base: BaseWeights | None,
    before_passes: bool,
) -> None:
    cell = _cell(feature, target, before_passes)
    if cell is None or feature.adapter is None:
        return
    fields = feature.adapter(adapter, base)
    if fields is not None:
        raise _refuse(cell, adapter, fields)
