"""apply-graph-layout: take a 2-D site's layer kind (Linear or Conv1D) from the ONNX graph.

Identity: the delta each site adds, read in the orientation the base stores. A parameter kept
under its own name and fed to MatMul (or Gemm with transB=0) without a Transpose is stored
(in, out): that is transformers' Conv1D (GPT-2), whatever the adapter's ``fan_in_fan_out`` says.
The pass marks such a LINEAR site CONV1D, so the delta ``s·B@A`` (out, in) is transposed before it
is added; left LINEAR, it would be added to the wrong axes (or refused for a non-square weight).
The architecture table and ``--layout`` decide before the graph does (the order of
:mod:`loracc.io.layout`): a site whose ``layout_source`` names them is left alone.

A target parameter read without a base is 2-D to the reader; when the graph holds it as a fused
3-D expert weight (E, d1, d2), the pass makes it an expert site (``Site.experts``,
``Site.transposed``): the delta is then PEFT's per-expert one, not a rank r·E matrix.

Fields read: ``Site.kind``, ``Site.layout_source``, ``Site.experts``; from the base, the kind (and
expert weights) the graph shows for each module (:class:`GraphLayouts`, which the ONNX base
weights provide; any other base: skipped).
PEFT fields read: fan_in_fan_out (through ``Site.kind`` and ``Site.layout_source``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, runtime_checkable

from loracc.ir import Adapter, Site, SiteKind
from loracc.passes.base import PassContext, Rewritten, SitePass, Skip

__all__ = [
    "ApplyGraphLayout",
    "GraphLayouts",
    "graph_layout",
    "with_graph_experts",
    "with_graph_layout",
]

# Layout sources (Site.layout_source) the graph does not overrule: loracc.io.layout's
# architecture table and the user's --layout.
_DECIDED = ("architecture", "--layout")


@runtime_checkable
class GraphLayouts(Protocol):
    """Base weights that know the layer kind a graph shows for a module."""

    def graph_layout(self, module: str) -> tuple[SiteKind, str] | None:
        """The kind the graph shows for ``module`` and why, or None when it shows nothing."""

    def graph_experts(self, module: str) -> tuple[int, bool, str] | None:
        """(E, stored (E, in, out), why) when the graph holds ``module``'s parameter as a
        fused 3-D expert weight, or None."""


def graph_layout(site: Site, kind: SiteKind, why: str) -> Site:
    """``site`` with the 2-D layer kind the ONNX graph shows, unless the architecture table or
    ``--layout`` decided it (the same order as the PEFT reader's, loracc.io.layout)."""
    if site.kind is kind or site.layout_source.startswith(_DECIDED):
        return site
    return replace(site, kind=kind, layout_source=why)


def with_graph_layout(site: Site, shown: tuple[SiteKind, str] | None) -> Site:
    """``site`` after this pass, given what the graph ``shown`` for its module."""
    if shown is None or site.kind is not SiteKind.LINEAR:
        return site
    return graph_layout(site, *shown)


def with_graph_experts(site: Site, shown: tuple[int, bool, str] | None) -> Site:
    """``site`` as the expert site the graph ``shown`` (a target parameter read without them):
    its rank is per expert, and so is its scale (alpha/r, alpha/sqrt(r) with rsLoRA)."""
    if shown is None or site.kind is not SiteKind.PARAMETER or site.experts:
        return site
    experts, transposed, why = shown
    rank = site.lora_A.shape[0] // experts
    scale = site.alpha / (math.sqrt(rank) if site.use_rslora else rank)
    return replace(site, experts=experts, transposed=transposed, layout_source=why, scale=scale)


@dataclass(frozen=True, slots=True)
class ApplyGraphLayout(SitePass):
    """Mark LINEAR sites whose ONNX weight is stored (in, out) as CONV1D."""

    name: ClassVar[str] = "apply-graph-layout"

    def rewrite(self, site: Site, adapter: Adapter, ctx: PassContext) -> Rewritten | Skip:
        base = ctx.base
        if not isinstance(base, GraphLayouts):
            return Skip(site.module, "the base is not an ONNX graph")
        shown = base.graph_layout(site.module)
        new = with_graph_experts(with_graph_layout(site, shown), base.graph_experts(site.module))
        if new is not site:
            what = f"{new.experts} experts" if new.experts != site.experts else new.kind.value
            return Rewritten(new, f"{site.module}: {what} ({new.layout_source})")
        if shown is None or site.kind is not SiteKind.LINEAR:
            return Skip(site.module, f"the graph shows no other kind than {site.kind.value}")
        return Skip(site.module, f"decided by {site.layout_source}")
