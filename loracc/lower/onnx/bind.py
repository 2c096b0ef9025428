"""Binding: the ONNX node and initializer each adapter site changes.

A site binds to the weight uses of :class:`~loracc.lower.onnx.index.GraphIndex` by the first rule
that finds its weight:

1. **node scope**: the node's module path equals the site's module, or one ends with the other
   at a ``.`` boundary. The path comes from the dynamo exporter's ``pkg.torch.onnx.name_scopes``
   node metadata, or from TorchScript/ModelBuilder node names (``/model/layers.0/mlp/up_proj/
   MatMul``). The longest common dotted suffix wins.
2. **parameter name**: the initializer's name, or a name in its
   ``pkg.onnxscript.optimizer.folded_from`` value metadata, is ``<module>.weight`` (ModelBuilder's
   ``<module>.MatMul.weight`` too), compared the same way.
3. **aliases**: rules 1-2 again with ``self_attn`` read as ``attn`` (onnxruntime-genai names).
4. **fingerprint** (with base weights): an initializer equal to the base tensor, either
   orientation; a 64-entry diagonal signature picks the candidates before a full comparison.
5. **fused**: ``q_proj``/``k_proj``/``v_proj`` onto one ``qkv_proj`` (``query_key_value``,
   ``Wqkv``, ``qkv``) weight and ``gate_proj``/``up_proj`` onto ``gate_up_proj``: the site owns
   a block of output rows, in that order (sizes from the adapter, a missing sibling takes the
   rest; with base weights the block is checked by value).

A 3-D expert site (``target_parameters`` on fused MoE experts; a target parameter the graph
holds as one) binds by name only: the initializer read through ``Gather``/``GatherND`` and
``MatMul`` (:mod:`~loracc.lower.onnx.experts`) whose name, or a name in its ``folded_from``,
ends with the site's ``<module>.<param>``; its shape and the graph's per-expert reading fix the
orientation (:func:`_expert_layout`, :func:`_expert_flip`).

A site no rule binds is an error naming the module. Bindings are keyed by module name and hold
no copy of the site: passes replace sites, so a lowering reads the current site from its adapter.
An initializer that other nodes also read (tied weights, deduplicated constants) is split before
the site's nodes change it (:func:`loracc.lower.onnx.surgery.privatize`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import onnx_ir as ir
import torch

from loracc.arch import FUSED_PROJECTIONS
from loracc.errors import LoweringError, UnsupportedError
from loracc.io.onnx_model import tensor_to_torch
from loracc.ir import Adapter, Site, SiteKind
from loracc.lower.onnx.index import (
    COMPUTE_OPS,
    GraphIndex,
    Place,
    WeightUse,
    common_suffix,
    find_bias,
    node_scope,
    param_modules,
    read_ref,
)
from loracc.lower.onnx.quant import QUANT_OPS

if TYPE_CHECKING:
    from loracc.io.checkpoint import Checkpoint

__all__ = [
    "Binding",
    "BindingTable",
    "TensorBinding",
    "bind_adapter",
    "with_tied",
]

_KIND_OPS = {
    SiteKind.LINEAR: ("MatMul", "Gemm", *QUANT_OPS),
    SiteKind.CONV1D: ("MatMul", "Gemm", *QUANT_OPS),
    SiteKind.PARAMETER: ("MatMul", "Gemm"),
    SiteKind.EMBEDDING: ("Gather",),
    SiteKind.CONV: ("Conv",),
}
_ALIASES = {"self_attn": "attn"}
_SIGNATURE = 64


def _alias(path: str) -> str:
    return ".".join(_ALIASES.get(p, p) for p in path.split("."))


@dataclass(eq=False)
class Binding:
    """Where the delta of the site of ``module`` goes.

    Attributes:
        module: the site's module path; the site itself is the adapter's (passes replace it).
        uses: the weight uses the site changes (one per call of its module).
        how: which rule bound it (scope, name, alias, fingerprint, fused).
        block: for a fused weight, the site's rows [start, stop) of the output axis.
        fused: the slot key of a fused weight (its module path), else None.
        bias: the base bias places for ``lora_bias`` (Gemm C, Conv B, or a following Add).
        experts: (E, stored (E, in, out), why) the graph shows for a 3-D target parameter the
            adapter was read without (no base): apply-graph-layout makes the site an expert one.
    """

    module: str
    uses: list[WeightUse]
    how: str
    block: tuple[int, int] | None = None
    fused: str | None = None
    bias: list[Place] = field(default_factory=list)
    experts: tuple[int, bool, str] | None = None

    def places(self) -> list[Place]:
        """The initializers this site changes, each with the nodes that read it for the site."""
        by_init: dict[int, Place] = {}
        for u in self.uses:
            place = by_init.setdefault(id(u.init), Place(u.init, set(), u.transposed))
            place.nodes.add(u.node)
        return list(by_init.values())

    def graph_experts(self) -> tuple[int, bool, str] | None:
        """(E, stored (E, in, out), why) when the graph shows the site's parameter is a 3-D
        expert weight the adapter was read without (no base)."""
        return self.experts

    def graph_layout(self) -> tuple[SiteKind, str] | None:
        """(CONV1D, why) when the graph reads the module's own parameter as (in, out) with no
        Transpose, as transformers' Conv1D stores it (GPT-2); None when it shows nothing."""
        if (
            self.block is None
            and all(u.reads_conv1d for u in self.uses)
            and any(common_suffix(m, self.module) for m in param_modules(self.uses[0].names))
        ):
            return SiteKind.CONV1D, f"ONNX graph: '{self.uses[0].init.name}' is read as (in, out)"
        return None

    def describe(self, site: Site) -> dict[str, Any]:
        """The report row of this binding; ``site`` is the adapter's current site."""
        use = self.uses[0]
        return {
            "module": self.module,
            "kind": site.kind.value,
            "op": use.op,
            "nodes": [u.node_name for u in self.uses],
            "initializer": use.init.name,
            "transposed": use.transposed,
            "dtype": use.init.const_value.dtype.name if use.init.const_value else None,
            "how": self.how,
            "block": list(self.block) if self.block else None,
            "fused": self.fused,
        }


@dataclass(eq=False)
class TensorBinding:
    """Where a whole-tensor edit (replacement, trainable-token rows, bias) of ``key`` goes."""

    key: str
    places: list[Place]
    how: str

    def describe(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "initializers": [p.init.name for p in self.places],
            "transposed": [p.transposed for p in self.places],
            "how": self.how,
        }


@dataclass(eq=False)
class BindingTable:
    """Every site's binding plus the bindings of whole-tensor edits."""

    index: GraphIndex
    sites: dict[str, Binding]
    tensors: dict[str, TensorBinding]

    def describe(self, adapters: Sequence[Adapter]) -> list[dict[str, Any]]:
        """Every site's binding by module, with the site as ``adapters`` hold it (a module in
        several adapters: the last one's)."""
        current = {s.module: s for a in adapters for s in a.sites}
        return [
            b.describe(current[b.module])
            for b in sorted(self.sites.values(), key=lambda b: b.module)
        ]


def _match_quality(use: WeightUse, module: str, aliases: bool) -> tuple[int, str]:
    """How well ``use`` matches ``module``: (common dotted suffix, "scope" or "name")."""
    norm = _alias if aliases else (lambda s: s)
    scope = 0
    if use.scope:
        scope = common_suffix(norm(use.scope.removesuffix(".base_layer")), norm(module))
    name = max(
        (
            common_suffix(norm(m.removesuffix(".base_layer")), norm(module))
            for m in param_modules(use.names)
        ),
        default=0,
    )
    if scope and scope >= name:
        return scope, "scope"
    return name, "name"


def _owner(site: Site) -> str:
    if site.kind is SiteKind.PARAMETER:
        return site.target.rsplit(".", 1)[0]
    return site.module


def _shape_fits(use: WeightUse, shape: tuple[int, ...]) -> bool:
    have = use.shape
    if use.transposed:
        return len(shape) == 2 and have == shape[::-1]
    return have == shape


class _Binder:
    def __init__(self, index: GraphIndex, base: Checkpoint | None) -> None:
        self.index = index
        self.base = base
        self.by_op: dict[str, list[WeightUse]] = defaultdict(list)
        for use in index.uses:
            self.by_op["experts" if use.expert is not None else use.op].append(use)
        self._signatures: dict[int, tuple[float, ...]] = {}

    def expert_named(self, module: str) -> bool:
        """Whether an expert weight, bound or refused, is named after ``module``."""
        names = [n for u in self.by_op["experts"] for n in u.names]
        names += list(self.index.expert_refusals)
        return any(common_suffix(n, module) for n in names)

    # -- rules 1-3 ---------------------------------------------------------------------------

    def by_path(
        self, module: str, ops: Sequence[str], aliases: bool
    ) -> tuple[list[WeightUse], str]:
        scored: list[tuple[tuple[int, str], WeightUse]] = []
        for op in ops:
            for use in self.by_op[op]:
                quality = _match_quality(use, module, aliases)
                if quality[0]:
                    scored.append((quality, use))
        if not scored:
            return [], ""
        top = max(q[0] for q, _ in scored)
        best = [(q, u) for q, u in scored if q[0] == top]
        how = "scope" if any(q[1] == "scope" for q, _ in best) else "name"
        if how == "scope":
            best = [(q, u) for q, u in best if q[1] == "scope"]
        return [u for _, u in best], how + ("+alias" if aliases else "")

    # -- rule 4 ------------------------------------------------------------------------------

    def signature(self, init: ir.Value) -> tuple[float, ...]:
        key = id(init)
        if key not in self._signatures:
            t = init.const_value
            assert t is not None
            array = t.numpy()
            flat = array.reshape(array.shape[0], -1)
            n = min(_SIGNATURE, *flat.shape)
            diag = [float(flat[i, i]) for i in range(n)]
            if isinstance(t, ir.ExternalTensor):
                t.release()
            self._signatures[key] = tuple(diag)
        return self._signatures[key]

    def by_value(self, expected: torch.Tensor, ops: Sequence[str]) -> list[WeightUse]:
        """Uses whose initializer equals ``expected`` (reference orientation), either way round."""
        shape = tuple(expected.shape)
        flat = expected.reshape(shape[0], -1)
        n = min(_SIGNATURE, *flat.shape)
        want = tuple(float(flat[i, i]) for i in range(n))
        found = []
        for op in ops:
            for use in self.by_op[op]:
                if use.quant is not None or not _shape_fits(use, shape):
                    continue  # a quantized weight never equals the float base
                if self.signature(use.init) != want:
                    continue
                got = read_ref(use, dtype=expected.dtype)
                if torch.equal(got, expected):
                    found.append(use)
        return found

    # -- rule 5 ------------------------------------------------------------------------------

    def fused(
        self, site: Site, siblings: dict[str, Site], ops: Sequence[str]
    ) -> tuple[list[WeightUse], tuple[int, int], str] | None:
        parent, _, leaf = site.module.rpartition(".")
        for members, fused_leaves in FUSED_PROJECTIONS.items():
            if leaf not in members:
                continue
            for fused_leaf in fused_leaves:
                uses, _ = self.by_path(f"{parent}.{fused_leaf}", ops, aliases=False)
                if not uses:
                    uses, _ = self.by_path(f"{parent}.{fused_leaf}", ops, aliases=True)
                if not uses:
                    continue
                block = self._block(site, members, siblings, uses[0], parent)
                if block is not None:
                    named = param_modules(uses[0].names)
                    key = uses[0].scope or (named[0] if named else uses[0].node_name)
                    return uses, block, key
        return None

    def _block(
        self,
        site: Site,
        members: tuple[str, ...],
        siblings: dict[str, Site],
        use: WeightUse,
        parent: str,
    ) -> tuple[int, int] | None:
        shape = use.shape
        total = shape[1] if use.transposed else shape[0]
        fan_in = shape[0] if use.transposed else shape[1]
        if fan_in != site.lora_A.shape[1]:
            return None
        sizes: list[int | None] = []
        for m in members:
            key = f"{parent}.{m}.weight"
            if self.base is not None and self.base.shape(key) is not None:
                sizes.append(self.base.shape(key)[0])  # type: ignore[index]
            elif f"{parent}.{m}" in siblings:
                sizes.append(int(siblings[f"{parent}.{m}"].lora_B.shape[0]))
            else:
                sizes.append(None)
        unknown = [i for i, s in enumerate(sizes) if s is None]
        rest = total - sum(s for s in sizes if s is not None)
        if unknown:
            if rest <= 0 or rest % len(unknown):
                return None
            for i in unknown:  # equal split: k and v of grouped-query attention
                sizes[i] = rest // len(unknown)
        elif rest != 0:
            return None
        i = members.index(site.module.rpartition(".")[2])
        start = sum(s for s in sizes[:i])  # type: ignore[misc]
        return (start, start + sizes[i])  # type: ignore[operator]


def bind_adapter(
    index: GraphIndex,
    adapters: Sequence[Adapter],
    *,
    base: Checkpoint | None = None,
    table: BindingTable | None = None,
) -> BindingTable:
    """Bind every site and whole-tensor edit of ``adapters`` to the graph.

    With ``table``, only what it does not bind yet is bound, into it.

    Raises:
        LoweringError: a site or tensor that no rule binds, or binds ambiguously.
    """
    binder = _Binder(index, base)
    if table is None:
        table = BindingTable(index=index, sites={}, tensors={})
    for adapter in adapters:
        siblings = {s.module: s for s in adapter.sites}
        for site in adapter.sites:
            if site.module in table.sites:
                continue
            table.sites[site.module] = _bind_site(binder, site, siblings)
        for key in _tensor_keys(adapter):
            if key not in table.tensors:
                table.tensors[key] = _bind_tensor(binder, key, table)
    return table


def _tensor_keys(adapter: Adapter) -> list[str]:
    return [key for key, edits in adapter.edits_by_target().items() if edits.whole_tensor]


def _bind_site(binder: _Binder, site: Site, siblings: dict[str, Site]) -> Binding:
    if site.experts or (site.kind is SiteKind.PARAMETER and binder.expert_named(site.module)):
        return _bind_experts(binder, site)
    ops = _KIND_OPS[site.kind]
    module = _owner(site)
    shape = site.logical_shape()
    for aliases in (False, True):
        uses, how = binder.by_path(module, ops, aliases)
        if uses:
            fitting = [u for u in uses if _shape_fits(u, shape)]
            if fitting:
                return _finish(binder, site, fitting, how)
            fused = binder.fused(site, siblings, ops)
            if fused is not None:
                return _finish(binder, site, fused[0], "fused", fused[1], fused[2])
            u = uses[0]
            raise LoweringError(
                f"{site.module}: bound to node '{u.node_name}' by {how}, but its weight "
                f"'{u.init.name}' is {list(u.shape)} "
                f"and the adapter's factors give {list(shape)}"
            )
    if binder.base is not None and site.target in binder.base:
        expected = site.to_logical(binder.base.read(site.target))
        uses = binder.by_value(expected, ops)
        if uses:
            return _finish(binder, site, uses, "fingerprint")
    fused = binder.fused(site, siblings, ops)
    if fused is not None:
        return _finish(binder, site, fused[0], "fused", fused[1], fused[2])
    hint = "; ".join(binder.index.near_misses.get(module, [])) or (
        "no node scope, parameter name or value matches"
        + ("" if binder.base is not None else " (try --base-weights HF_DIR)")
    )
    raise LoweringError(f"{site.module}: cannot bind to the ONNX graph: {hint}")


def _bind_experts(binder: _Binder, site: Site) -> Binding:
    """The expert weight named after ``site.module``; each use gets ``transposed``:
    whether its initializer holds the site's (E, out, in) with the last two axes swapped."""
    scored = [
        (max((common_suffix(n, site.module) for n in u.names), default=0), u)
        for u in binder.by_op["experts"]
    ]
    top = max((q for q, _ in scored), default=0)
    refused = [
        (name, why)
        for name, why in binder.index.expert_refusals.items()
        if common_suffix(name, site.module) >= max(top, 1)
    ]
    if refused:
        name, why = refused[0]
        raise LoweringError(f"{site.module}: cannot bind the expert weight '{name}': {why}")
    if not top:
        raise LoweringError(
            f"{site.module}: cannot bind to the ONNX graph: no 3-D initializer named after it "
            "is read per expert through Gather/GatherND and MatMul"
        )
    uses = [u for q, u in scored if q == top]
    if site.experts:
        bound = [replace(u, transposed=_expert_flip(site, u)) for u in uses]
        return Binding(site.module, bound, "name")
    shown = [_expert_layout(site, u) for u in uses]
    if len({(e, t) for e, t, _ in shown}) > 1:
        raise LoweringError(
            f"{site.module}: the graph reads its expert weights in different layouts"
        )
    experts, transposed, why = shown[0]
    bound = [replace(u, transposed=transposed) for u in uses]
    return Binding(site.module, bound, "name", experts=(experts, transposed, why))


def _expert_layout(site: Site, use: WeightUse) -> tuple[int, bool, str]:
    """(E, stored (E, in, out), why) of a target parameter read without a base, from the
    initializer's shape; for a square one, from how the graph's MatMul reads it (the model's
    forward, which PEFT's ``is_transposed`` follows for every architecture but Llama 4)."""
    assert use.expert is not None
    experts, d1, d2 = use.shape
    fan_in, fan_out = int(site.lora_A.shape[1]), int(site.lora_B.shape[0])
    name = use.init.name
    if site.lora_A.shape[0] % experts or {(d1, d2)} - {(fan_out, fan_in), (fan_in, fan_out)}:
        raise LoweringError(
            f"{site.module}: expert weight '{name}' is {list(use.shape)}; the adapter's factors "
            f"{tuple(site.lora_A.shape)}/{tuple(site.lora_B.shape)} fit neither (E, out, in) nor "
            "(E, in, out)"
        )
    if d1 != d2:
        return experts, (d1, d2) == (fan_in, fan_out), f"ONNX graph: '{name}' shape"
    graph = "in, out" if use.expert.in_out else "out, in"
    why = f"ONNX graph: '{use.expert.matmul.name}' reads square '{name}' as ({graph})"
    return experts, use.expert.in_out, why


def _expert_flip(site: Site, use: WeightUse) -> bool:
    """``transposed`` of ``use`` for a site whose layout the reader decided (``site.transposed``
    from the architecture table or ``--layout``, the base's shape). The initializer's shape
    decides; a square one must be read by its MatMul the way that layout says, or refused."""
    assert use.expert is not None
    stored = site.stored_shape()
    have = use.shape
    layout = "in, out" if site.transposed else "out, in"
    if have[0] != stored[0] or sorted(have[1:]) != sorted(stored[1:]):
        raise LoweringError(
            f"{site.module}: expert weight '{use.init.name}' is {list(have)} and the adapter's "
            f"factors give {list(stored)} (E, {layout})"
        )
    if have[1] != have[2]:
        return (have != stored) != site.transposed
    if use.expert.in_out != site.transposed:
        graph = "in, out" if use.expert.in_out else "out, in"
        raise LoweringError(
            f"{site.module}: '{use.expert.matmul.name}' reads the square expert weight "
            f"'{use.init.name}' as ({graph}) per expert, but the adapter's layout "
            f"({site.layout_source}) stores it as ({layout}); loracc cannot tell whether the "
            "export transposed it"
        )
    return site.transposed


def _finish(
    binder: _Binder,
    site: Site,
    uses: list[WeightUse],
    how: str,
    block: tuple[int, int] | None = None,
    fused: str | None = None,
) -> Binding:
    if block is not None and binder.base is not None and site.target in binder.base:
        expected = site.to_logical(binder.base.read(site.target))
        got = read_ref(uses[0], dtype=expected.dtype)[block[0] : block[1]]
        if not torch.equal(got, expected):
            raise LoweringError(
                f"{site.module}: rows {block[0]}:{block[1]} of fused weight "
                f"'{uses[0].init.name}' do not equal the base weight '{site.target}'"
            )
    binding = Binding(site.module, uses, how, block=block, fused=fused)
    if site.lora_bias is not None:
        if block is not None:
            raise LoweringError(f"{site.module}: lora_bias on a fused weight is not supported")
        binding.bias = [b for u in uses if (b := find_bias(u)) is not None]
        if len(binding.bias) != len(uses):
            raise LoweringError(
                f"{site.module}: lora_bias needs the base bias, and no bias initializer is added "
                f"to the output of '{uses[0].node_name}'"
            )
    return binding


def _named_places(index: GraphIndex, key: str) -> list[Place]:
    """Initializers named ``key``; only the readers inside ``key``'s module when the graph
    says where nodes belong (TorchScript deduplicates equal tensors under one name)."""
    module = key.rpartition(".")[0]
    places = []
    for value in index.graph.initializers.values():
        if not value.name or not common_suffix(value.name, key):
            continue
        readers = index.consumers(value)
        scoped = {n for n in readers if node_scope(n)}
        mine = {n for n in scoped if common_suffix(node_scope(n) or "", module)}
        places.append(Place(value, mine if scoped else readers, False))
    return places


def _bind_tensor(binder: _Binder, key: str, table: BindingTable) -> TensorBinding:
    """Bind a whole-tensor edit of base key ``key`` (``<module>.weight`` or ``.bias``)."""
    module, _, param = key.rpartition(".")
    index = binder.index
    if param == "bias":
        site = table.sites.get(module)
        uses = (
            site.uses if site is not None else binder.by_path(module, tuple(COMPUTE_OPS), False)[0]
        )
        places = [b for u in uses if (b := find_bias(u)) is not None]
        if places:
            return TensorBinding(key, places, "bias")
    else:
        for aliases in (False, True):
            uses, how = binder.by_path(module, tuple(COMPUTE_OPS), aliases)
            if uses:
                return TensorBinding(key, _stored_places(uses), how)
        quantized, _ = binder.by_path(module, QUANT_OPS, False)
        if quantized:
            raise UnsupportedError(
                f"{key}: the adapter replaces this tensor, which the ONNX graph holds quantized "
                f"({quantized[0].op} '{quantized[0].node_name}'); a whole-tensor replacement is "
                "not requantized (save the adapter without it, e.g. save_embedding_layers=False)"
            )
        if binder.base is not None and key in binder.base:
            stored = binder.base.read(key)
            for op in COMPUTE_OPS:
                uses = binder.by_value(stored, (op,))
                if not uses and stored.dim() == 2:
                    uses = binder.by_value(stored.T.contiguous(), (op,))
                if uses:
                    return TensorBinding(key, _stored_places(uses), "fingerprint")
    places = _named_places(index, key)
    if not places:
        raise LoweringError(
            f"{key}: the adapter replaces this tensor; no ONNX initializer holds it"
        )
    return TensorBinding(key, places, "name")


def _stored_places(uses: list[WeightUse]) -> list[Place]:
    """Places of ``uses`` oriented against the Hugging Face stored tensor.

    The reference orientation of a Linear is its stored one, so ``transposed`` carries over;
    a parameter kept under its own name without a Transpose is stored as the node reads it.
    """
    by_init: dict[int, Place] = {}
    for u in uses:
        transposed = u.transposed and not u.reads_conv1d
        place = by_init.setdefault(id(u.init), Place(u.init, set(), transposed))
        place.nodes.add(u.node)
    return list(by_init.values())


def with_tied(index: GraphIndex, tb: TensorBinding) -> TensorBinding:
    """``tb`` plus the weights that hold the same embedding table (a tied output embedding).

    An edit of a tied table (trainable tokens, a resized or replaced embedding) changes the
    output embedding too. A MatMul/Gemm weight holds the table when its parameter name says so
    or when it equals the table (either orientation).
    """
    gathers = [p for p in tb.places if any(n.op_type == "Gather" for n in p.nodes)]
    if not gathers:
        return tb
    table = gathers[0].init.const_value
    assert table is not None
    reference = tensor_to_torch(table, torch.float32)
    places = list(tb.places)
    seen = {id(p.init) for p in places}
    module = tb.key.rpartition(".")[0]
    by_init = {id(p.init): p for p in places}
    for use in index.uses:
        if use.op not in ("MatMul", "Gemm"):
            continue
        if id(use.init) in by_init:  # the table itself, read by the output layer too
            by_init[id(use.init)].nodes.add(use.node)
            continue
        if id(use.init) in seen:
            continue
        named = any(common_suffix(m, module) for m in param_modules(use.names))
        if not named and not _shape_fits(use, tuple(reference.shape)):
            continue
        if named or torch.equal(read_ref(use, dtype=torch.float32), reference):
            places.append(Place(use.init, {use.node}, use.transposed))
            seen.add(id(use.init))
    return TensorBinding(
        tb.key, places, tb.how + "+tied" if len(places) > len(tb.places) else tb.how
    )
