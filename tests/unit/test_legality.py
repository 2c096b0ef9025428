"""loracc.legality: every cell of the target × feature table, on hand-built IR.

Each feature gets a minimal adapter that uses it and nothing else refused anywhere (one plain,
folded Linear site); every (feature, target) cell is then either accepted or refused with the
message written out below, independently of the table's templates. The messages are those the
five checks the table replaced gave (merge, the two ONNX ones, the PEFT writer, convert).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from loracc.errors import UnsupportedError
from loracc.ir import Adapter, Replacement, Site, SiteKind, TokenRows
from loracc.legality import FEATURES, TABLE, Target, require
from loracc.weights import ExpertSplit

OUT, IN, R = 4, 3, 2
Q = "layers.0.q_proj"


def _site(module: str = Q, **kw: Any) -> Site:
    fields: dict[str, Any] = {
        "module": module,
        "target": f"{module}.weight",
        "kind": SiteKind.LINEAR,
        "lora_A": torch.randn(R, IN),
        "lora_B": torch.randn(OUT, R),
        "alpha": float(R),
        "scale": 1.0,
    }
    return Site(**(fields | kw))


PLAIN = Adapter(name="ad", sites=(_site(),))


def _site_with(**kw: Any) -> Callable[[], Adapter]:
    return lambda: replace(PLAIN, sites=(_site(**kw),))


def _split_base() -> Any:
    split = ExpertSplit(keys=((f"{Q}.weight",),), shape=(1, OUT, IN))
    return SimpleNamespace(expert_splits={"experts.gate_up_proj": split})


def _two_params() -> Adapter:
    sites = tuple(
        _site(f"mlp.experts.{p}", kind=SiteKind.PARAMETER) for p in ("gate_up_proj", "down_proj")
    )
    return replace(PLAIN, sites=sites)


# feature -> (the adapter using it, the base require() gets)
USES: dict[str, tuple[Callable[[], Adapter], Any]] = {
    "refusals": (lambda: replace(PLAIN, refusals=("alora_invocation_tokens is set",)), None),
    "layer-replication": (lambda: replace(PLAIN, layer_replication=((0, 2), (1, 2))), None),
    "replacements": (
        lambda: replace(PLAIN, replacements=(Replacement("lm_head.weight", torch.ones(2), "m"),)),
        None,
    ),
    "token-rows": (
        lambda: replace(PLAIN, token_rows=(TokenRows("embed.weight", (1,), torch.ones(1, 3)),)),
        None,
    ),
    "tensor-sources": (lambda: replace(PLAIN, tensor_sources={"b.weight": "a.weight"}), None),
    "removed-keys": (lambda: replace(PLAIN, removed_keys=frozenset({"layers.3.w"})), None),
    "split-experts": (lambda: PLAIN, _split_base()),
    "dora": (_site_with(magnitude=torch.ones(OUT)), None),
    "dora-folded": (_site_with(channel_scale=torch.ones(OUT)), None),
    "residual-init": (_site_with(init="pissa"), None),
    "initial-factors": (_site_with(initial=(torch.zeros(R, IN), torch.zeros(OUT, R))), None),
    "unfolded-scale": (_site_with(scale=0.5, alpha=1.0), None),
    "experts": (
        _site_with(kind=SiteKind.PARAMETER, experts=2, lora_A=torch.randn(2 * R, IN)),
        None,
    ),
    "shared-owner": (_two_params, None),
}

M, OM, OK, P = Target.MERGE, Target.ONNX_MERGE, Target.ONNX_KEEP_LORA, Target.PEFT_ADAPTER
ONNX_RESIDUAL = (
    f"{Q}: init_lora_weights='pissa' applies to a residual base; the reconstruct-residual pass "
    "did not turn it into plain LoRA"
)
PEFT_DORA = (
    f"{Q}: DoRA cannot be written as a plain LoRA adapter: its m/‖W + ΔW‖ scale is not a "
    "low-rank delta on the original base"
)
ONNX_LAYERS = (
    "ad: layer_replication adds layers; the ONNX graph would need new layers, which loracc does "
    "not build (merge the adapter into the HF checkpoint with `loracc merge` and re-export "
    "instead)"
)
ONNX_SPLIT = (
    "ad: --base-weights stores the fused expert parameters one tensor per expert, and the ONNX "
    "graph holds them fused (E, out, in); export without --base-weights (the graph's expert "
    "weights give the shapes)"
)
# (feature, target) -> (error class, message, checked right after reading); absent: accepted.
REFUSED: dict[tuple[str, Target], tuple[type[Exception], str, bool]] = {
    ("refusals", M): (UnsupportedError, "ad: cannot merge: alora_invocation_tokens is set", True),
    ("refusals", OM): (UnsupportedError, "ad: alora_invocation_tokens is set", True),
    ("refusals", OK): (UnsupportedError, "ad: alora_invocation_tokens is set", True),
    ("refusals", P): (UnsupportedError, "ad: cannot convert: alora_invocation_tokens is set", True),
    ("layer-replication", M): (
        UnsupportedError,
        "ad: layer_replication needs the expand-layer-replication pass",
        False,
    ),
    ("layer-replication", OM): (UnsupportedError, ONNX_LAYERS, True),
    ("layer-replication", OK): (UnsupportedError, ONNX_LAYERS, True),
    ("split-experts", OM): (UnsupportedError, ONNX_SPLIT, True),
    ("split-experts", OK): (UnsupportedError, ONNX_SPLIT, True),
    ("split-experts", P): (
        UnsupportedError,
        "ad: cannot convert: fused expert target_parameters stored per expert in the base are "
        "not written back as a PEFT adapter yet",
        False,
    ),
    ("dora", M): (UnsupportedError, f"{Q}: DoRA magnitude not folded (fold-dora pass)", False),
    ("dora", OM): (UnsupportedError, f"{Q}: DoRA magnitude not folded (fold-dora pass)", False),
    ("dora", OK): (UnsupportedError, f"{Q}: DoRA magnitude not folded (fold-dora pass)", False),
    ("dora", P): (UnsupportedError, PEFT_DORA, False),
    ("dora-folded", P): (UnsupportedError, PEFT_DORA, False),
    ("residual-init", M): (
        UnsupportedError,
        f"{Q}: init_lora_weights='pissa' needs the reconstruct-residual pass",
        False,
    ),
    ("residual-init", OM): (UnsupportedError, ONNX_RESIDUAL, False),
    ("residual-init", OK): (UnsupportedError, ONNX_RESIDUAL, False),
    ("residual-init", P): (
        UnsupportedError,
        f"{Q}: init_lora_weights='pissa' must be reconstructed first (reconstruct-residual)",
        False,
    ),
    ("initial-factors", P): (
        UnsupportedError,
        f"{Q}: init_lora_weights='true' must be reconstructed first (reconstruct-residual)",
        False,
    ),
    ("unfolded-scale", P): (
        UnsupportedError,
        f"{Q}: scale 0.5 not folded (fold-scaling) before writing",
        False,
    ),
    ("experts", P): (
        UnsupportedError,
        f"{Q}: writing 3-D expert parameter sites is not supported",
        False,
    ),
    ("shared-owner", P): (
        UnsupportedError,
        "mlp.experts: several target_parameters on one module (peft nests their wrappers); "
        "writing them is not supported",
        False,
    ),
}

CELLS = [(f.name, t) for f in FEATURES for t in Target]


def test_the_table_has_every_cell_and_the_tests_every_feature():
    assert set(TABLE) == {f.name for f in FEATURES} == set(USES)
    assert all(set(row) == set(Target) for row in TABLE.values())


@pytest.mark.parametrize("target", list(Target), ids=[t.value for t in Target])
def test_plain_folded_lora_lowers_everywhere(target):
    require(PLAIN, target)
    require(PLAIN, target, before_passes=True)


@pytest.mark.parametrize(("feature", "target"), CELLS, ids=[f"{f}-{t.value}" for f, t in CELLS])
def test_cell(feature, target):
    build, base = USES[feature]
    adapter = build()
    refused = REFUSED.get((feature, target))
    if refused is None:
        require(adapter, target, base=base)
        require(adapter, target, base=base, before_passes=True)
        return
    error, message, early = refused
    with pytest.raises(error) as info:
        require(adapter, target, base=base)
    assert str(info.value) == message
    assert type(info.value) is error
    if early:
        with pytest.raises(error):
            require(adapter, target, base=base, before_passes=True)
    else:
        require(adapter, target, base=base, before_passes=True)


def test_the_first_offending_site_is_named():
    """Site by site: the second site's DoRA is not reported before the first site's residual."""
    adapter = replace(
        PLAIN, sites=(_site(init="olora"), _site("layers.0.v_proj", magnitude=torch.ones(OUT)))
    )
    with pytest.raises(UnsupportedError, match=f"^{Q}: init_lora_weights='olora'"):
        require(adapter, Target.MERGE)


def test_split_experts_needs_the_base():
    """Without the base, nothing says the target is stored per expert."""
    require(PLAIN, Target.PEFT_ADAPTER)
