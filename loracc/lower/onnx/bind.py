"""Binding: the ONNX node and initializer each adapter site changes.

A *weight use* is a compute node together with the initializer its weight operand comes from,
possibly through ``Identity``, ``Cast`` or a 2-D ``Transpose`` (``Constant`` nodes feeding a
weight are lifted to initializers first):

=========  =======  ==================================================================
op         operand  what the node consumes, in the site's reference orientation
=========  =======  ==================================================================
MatMul     1        Wᵀ, (in, out)
Gemm       1        W (out, in) with ``transB=1``; Wᵀ with ``transB=0``
Gather     0        the embedding table (num, dim)
Conv       1        W (out, in, *k)
=========  =======  ==================================================================

The reference orientation is the site's logical one: (out, in) for Linear, Conv1D and 2-D
target parameters (ΔW = s·B@A), (num, dim) for embeddings, (out, in, *k) for convolutions. A use
records whether its initializer is stored transposed to it.

A site binds by the first rule that finds its weight:

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

A site no rule binds is an error naming the module. An initializer that other nodes also read
(tied weights, deduplicated constants) is split before the site's nodes change it
(:func:`privatize`).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

import onnx_ir as ir
import torch

from loracc.arch import FUSED_PROJECTIONS
from loracc.errors import FormatError, LoweringError
from loracc.io.onnx_model import tensor_to_torch, torch_dtype
from loracc.ir import Adapter, Site, SiteKind

if TYPE_CHECKING:
    from loracc.io.checkpoint import Checkpoint
    from loracc.weights import ExpertSplit

__all__ = [
    "BaseEntry",
    "Binding",
    "BindingTable",
    "GraphIndex",
    "OnnxBase",
    "Place",
    "TensorBinding",
    "WeightUse",
    "bind_adapter",
    "drop_noop_replacements",
    "graph_layout",
    "privatize",
    "read_ref",
    "unique_name",
    "with_tied",
]

COMPUTE_OPS = {"MatMul": 1, "Gemm": 1, "Gather": 0, "Conv": 1}
_PASS_OPS = frozenset({"Identity", "Cast", "Transpose"})
_KIND_OPS = {
    SiteKind.LINEAR: ("MatMul", "Gemm"),
    SiteKind.CONV1D: ("MatMul", "Gemm"),
    SiteKind.PARAMETER: ("MatMul", "Gemm"),
    SiteKind.EMBEDDING: ("Gather",),
    SiteKind.CONV: ("Conv",),
}
_QUANTIZED = frozenset({"MatMulNBits", "MatMulInteger", "QLinearMatMul", "DequantizeLinear"})
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
_PARAM_SUFFIXES = (".MatMul.weight", ".Gemm.weight", ".weight")
_ALIASES = {"self_attn": "attn"}
_SIGNATURE = 64


# -- weight uses ------------------------------------------------------------------------------


@dataclass(eq=False)
class WeightUse:
    """A compute node and the initializer its weight comes from.

    Attributes:
        node: the MatMul, Gemm, Gather or Conv node.
        operand: the input index that carries the weight.
        init: the initializer value.
        path: Identity/Cast/Transpose nodes from the initializer to the node, in order.
        transposed: whether the initializer holds the reference orientation transposed.
        scope: the node's module path, when the graph says it.
        names: parameter names the initializer is known by (its name, folded_from).
    """

    node: ir.Node
    operand: int
    init: ir.Value
    path: tuple[ir.Node, ...]
    transposed: bool
    scope: str | None
    names: tuple[str, ...]

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def node_name(self) -> str:
        return self.node.name or f"<{self.node.op_type}>"

    @property
    def named(self) -> bool:
        """Whether the initializer carries a parameter name (not a folded constant)."""
        name = self.init.name or ""
        return bool(name) and not _generic(name) and _FOLDED_FROM not in self.init.metadata_props

    @property
    def reads_conv1d(self) -> bool:
        """Whether the graph shows a Conv1D parameter: one kept under its own name and read as
        (in, out) without a Transpose is stored so (the graph's Linear-or-Conv1D evidence)."""
        transposes = any(p.op_type == "Transpose" for p in self.path)
        return self.named and self.transposed and not transposes


def _generic(name: str) -> bool:
    return name.startswith("onnx::") or bool(re.fullmatch(r"(val|_val|const|init)_?\d+", name))


def _literal_list(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [v for v in value if isinstance(v, str)] if isinstance(value, (list, tuple)) else []


def node_scope(node: ir.Node) -> str | None:
    """The module path a node belongs to, from dynamo metadata or a TorchScript-style name."""
    scopes = _literal_list(node.metadata_props.get(_NAME_SCOPES))
    if len(scopes) >= 2:
        inner = [s for s in scopes[:-1] if s]
        if inner:
            return inner[-1]
    name = node.name or ""
    if name.startswith("/") and name.count("/") >= 2:
        parts = [p for p in name.split("/")[1:-1] if p]
        return ".".join(parts) or None
    return None


def _param_modules(names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        for suffix in _PARAM_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                out.append(name[: -len(suffix)])
                break
    return out


def _common_suffix(a: str, b: str) -> int:
    """Dotted segments ``a`` and ``b`` share at the end when one ends with the other, else 0."""
    if not a or not b:
        return 0
    if a == b or a.endswith("." + b) or b.endswith("." + a):
        return min(a.count("."), b.count(".")) + 1
    return 0


def _alias(path: str) -> str:
    return ".".join(_ALIASES.get(p, p) for p in path.split("."))


def _expects_transposed(node: ir.Node) -> bool:
    """Whether the node consumes the reference orientation transposed (MatMul, Gemm transB=0)."""
    if node.op_type == "MatMul":
        return True
    if node.op_type == "Gemm":
        attr = node.attributes.get("transB")
        return not (attr is not None and attr.as_int())
    return False


class GraphIndex:
    """Every weight use of a model's main graph, with scopes and names (built once)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        _lift_weight_constants(self.graph)
        self.uses: list[WeightUse] = []
        self.near_misses: dict[str, list[str]] = defaultdict(list)
        for node in self.graph:
            if node.domain not in ("", "ai.onnx"):
                if node.op_type in _QUANTIZED:
                    self._note(node, f"{node.op_type} (quantized weights)")
                continue
            if node.op_type in _QUANTIZED:
                self._note(node, f"{node.op_type} (quantized weights)")
                continue
            operand = COMPUTE_OPS.get(node.op_type)
            if operand is None or len(node.inputs) <= operand:
                continue
            use = self._trace(node, operand)
            if use is not None:
                self.uses.append(use)
            else:
                self._note(node, f"{node.op_type} whose weight is computed, not an initializer")

    def _note(self, node: ir.Node, what: str) -> None:
        scope = node_scope(node)
        if scope:
            self.near_misses[scope].append(f"{node.name or node.op_type}: {what}")

    def _trace(self, node: ir.Node, operand: int) -> WeightUse | None:
        value = node.inputs[operand]
        path: list[ir.Node] = []
        flipped = False
        while value is not None and not value.is_initializer():
            producer = value.producer()
            if producer is None or producer.op_type not in _PASS_OPS:
                return None
            if producer.domain not in ("", "ai.onnx"):
                return None
            if producer.op_type == "Transpose":
                perm = producer.attributes.get("perm")
                perm_list = list(perm.as_ints()) if perm is not None else None
                if perm_list not in (None, [1, 0]):
                    return None
                flipped = not flipped
            path.insert(0, producer)
            value = producer.inputs[0]
        if value is None or value.const_value is None:
            return None
        if node.op_type == "Gather":
            axis = node.attributes.get("axis")
            if axis is not None and axis.as_int() != 0:
                return None
            if len(value.const_value.shape) != 2 or not value.const_value.dtype.is_floating_point():
                return None
        if node.op_type == "Gemm":
            trans_a = node.attributes.get("transA")
            if trans_a is not None and trans_a.as_int():
                return None
        if node.op_type in ("MatMul", "Gemm") and len(value.const_value.shape) != 2:
            return None
        if not value.const_value.dtype.is_floating_point():
            return None
        names = [value.name or ""]
        names += _literal_list(value.metadata_props.get(_FOLDED_FROM))
        return WeightUse(
            node=node,
            operand=operand,
            init=value,
            path=tuple(path),
            transposed=_expects_transposed(node) != flipped,
            scope=node_scope(node),
            names=tuple(n for n in names if n),
        )

    def consumers(self, init: ir.Value) -> set[ir.Node]:
        """Nodes that read ``init``, looking through Identity/Cast/Transpose."""
        out: set[ir.Node] = set()
        stack = [init]
        while stack:
            value = stack.pop()
            for node in value.consumers():
                if node.op_type in _PASS_OPS and node.domain in ("", "ai.onnx"):
                    stack.extend(node.outputs)
                else:
                    out.add(node)
        return out


def _lift_weight_constants(graph: ir.Graph) -> None:
    """Turn ``Constant`` nodes that feed a compute node's weight operand into initializers."""
    taken = {v.name for v in graph.initializers.values()} | {
        v.name for node in graph for v in node.outputs if v.name
    }
    for node in list(graph):
        operand = COMPUTE_OPS.get(node.op_type)
        if operand is None or len(node.inputs) <= operand or node.inputs[operand] is None:
            continue
        value = node.inputs[operand]
        producer = value.producer()
        if producer is None or producer.op_type != "Constant" or producer.domain not in ("",):
            continue
        attr = producer.attributes.get("value")
        if attr is None:
            continue
        tensor = attr.as_tensor()
        name = value.name or unique_name(taken, f"{node.name or node.op_type}.weight")
        lifted = ir.Value(name=unique_name(taken, name + ".lifted"), shape=tensor.shape)
        lifted.type = ir.TensorType(tensor.dtype)
        lifted.const_value = tensor
        graph.register_initializer(lifted)
        value.replace_all_uses_with(lifted, replace_graph_outputs=True)
        graph.remove(producer, safe=True)


def unique_name(taken: set[str], name: str) -> str:
    """``name``, or ``name.1``, ``name.2``, ... : the first not in ``taken``, which it joins."""
    if name not in taken:
        taken.add(name)
        return name
    for i in count(1):
        candidate = f"{name}.{i}"
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise AssertionError


# -- bindings ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Place:
    """One initializer an edit changes, the nodes that must see the change, and its orientation.

    ``transposed`` is relative to the edit's orientation (the site's reference orientation for
    deltas, the Hugging Face stored orientation for whole-tensor edits).
    """

    init: ir.Value
    nodes: set[ir.Node]
    transposed: bool


@dataclass(eq=False)
class Binding:
    """Where one site's delta goes.

    Attributes:
        site: the adapter site (as loaded; passes may replace its factors later).
        uses: the weight uses the site changes (one per call of its module).
        how: which rule bound it (scope, name, alias, fingerprint, fused).
        block: for a fused weight, the site's rows [start, stop) of the output axis.
        fused: the slot key of a fused weight (its module path), else None.
        bias: the base bias places for ``lora_bias`` (Gemm C, Conv B, or a following Add).
    """

    site: Site
    uses: list[WeightUse]
    how: str
    block: tuple[int, int] | None = None
    fused: str | None = None
    bias: list[Place] = field(default_factory=list)

    @property
    def module(self) -> str:
        return self.site.module

    def places(self) -> list[Place]:
        """The initializers this site changes, each with the nodes that read it for the site."""
        by_init: dict[int, Place] = {}
        for u in self.uses:
            place = by_init.setdefault(id(u.init), Place(u.init, set(), u.transposed))
            place.nodes.add(u.node)
        return list(by_init.values())

    def describe(self) -> dict[str, Any]:
        use = self.uses[0]
        return {
            "module": self.site.module,
            "kind": self.site.kind.value,
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
    notes: list[str] = field(default_factory=list)

    def describe(self) -> list[dict[str, Any]]:
        return [b.describe() for b in sorted(self.sites.values(), key=lambda b: b.module)]


def _match_quality(use: WeightUse, module: str, aliases: bool) -> tuple[int, str]:
    """How well ``use`` matches ``module``: (common dotted suffix, "scope" or "name")."""
    norm = _alias if aliases else (lambda s: s)
    scope = 0
    if use.scope:
        scope = _common_suffix(norm(use.scope.removesuffix(".base_layer")), norm(module))
    name = max(
        (
            _common_suffix(norm(m.removesuffix(".base_layer")), norm(module))
            for m in _param_modules(use.names)
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
    have = tuple(int(d) for d in use.init.const_value.shape)  # type: ignore[union-attr]
    if use.transposed:
        return len(shape) == 2 and have == shape[::-1]
    return have == shape


class _Binder:
    def __init__(self, index: GraphIndex, base: Checkpoint | None) -> None:
        self.index = index
        self.base = base
        self.by_op: dict[str, list[WeightUse]] = defaultdict(list)
        for use in index.uses:
            self.by_op[use.op].append(use)
        self._signatures: dict[int, tuple[float, ...]] = {}

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
                if not _shape_fits(use, shape):
                    continue
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
                    named = _param_modules(uses[0].names)
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
        shape = tuple(int(d) for d in use.init.const_value.shape)  # type: ignore[union-attr]
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
    # 3-D expert sites never get here: loracc.legality refuses them for ONNX targets on reading.
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
                f"'{u.init.name}' is {list(u.init.const_value.shape)} "  # type: ignore[union-attr]
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
    binding = Binding(site=site, uses=uses, how=how, block=block, fused=fused)
    if site.lora_bias is not None:
        if block is not None:
            raise LoweringError(f"{site.module}: lora_bias on a fused weight is not supported")
        binding.bias = [b for u in uses if (b := find_bias(binder.index, u)) is not None]
        if len(binding.bias) != len(uses):
            raise LoweringError(
                f"{site.module}: lora_bias needs the base bias, and no bias initializer is added "
                f"to the output of '{uses[0].node_name}'"
            )
    return binding


def find_bias(index: GraphIndex, use: WeightUse) -> Place | None:
    """The bias initializer added to ``use``'s output: Gemm C, Conv B or a following Add."""
    node = use.node
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
        init = _trace_plain(node.inputs[2])
        return Place(init, {node}, False) if init is not None else None
    if node.op_type == "MatMul":
        consumers = node.outputs[0].consumers()
        if len(consumers) == 1 and consumers[0].op_type == "Add":
            add = consumers[0]
            for value in add.inputs:
                if value is node.outputs[0] or value is None:
                    continue
                init = _trace_plain(value)
                if init is not None and len(init.const_value.shape) == 1:  # type: ignore[union-attr]
                    return Place(init, {add}, False)
    return None


def _trace_plain(value: ir.Value) -> ir.Value | None:
    while not value.is_initializer():
        producer = value.producer()
        if producer is None or producer.op_type not in ("Identity", "Cast"):
            return None
        value = producer.inputs[0]  # type: ignore[assignment]
        if value is None:
            return None
    return value if value.const_value is not None else None


def _named_places(index: GraphIndex, key: str) -> list[Place]:
    """Initializers named ``key``; only the readers inside ``key``'s module when the graph
    says where nodes belong (TorchScript deduplicates equal tensors under one name)."""
    module = key.rpartition(".")[0]
    places = []
    for value in index.graph.initializers.values():
        if not value.name or not _common_suffix(value.name, key):
            continue
        readers = index.consumers(value)
        scoped = {n for n in readers if node_scope(n)}
        mine = {n for n in scoped if _common_suffix(node_scope(n) or "", module)}
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
        places = [b for u in uses if (b := find_bias(index, u)) is not None]
        if places:
            return TensorBinding(key, places, "bias")
    else:
        for aliases in (False, True):
            uses, how = binder.by_path(module, tuple(COMPUTE_OPS), aliases)
            if uses:
                return TensorBinding(key, _stored_places(uses), how)
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
        named = any(_common_suffix(m, module) for m in _param_modules(use.names))
        if not named and not _shape_fits(use, tuple(reference.shape)):
            continue
        if named or torch.equal(read_ref(use, dtype=torch.float32), reference):
            places.append(Place(use.init, {use.node}, use.transposed))
            seen.add(id(use.init))
    return TensorBinding(
        tb.key, places, tb.how + "+tied" if len(places) > len(tb.places) else tb.how
    )


def drop_noop_replacements(table: BindingTable, adapter: Adapter) -> tuple[Adapter, list[str]]:
    """Drop whole replacements equal to what the graph already holds (peft saves a targeted
    embedding whole even when it did not change)."""
    from dataclasses import replace

    keep, notes = [], []
    for r in adapter.replacements:
        tb = table.tensors.get(r.target)
        if tb is not None and tb.places and all(_holds(p, r.tensor) for p in tb.places):
            notes.append(f"{r.target}: saved whole but equal to the model's tensor; ignored")
        else:
            keep.append(r)
    if len(keep) == len(adapter.replacements):
        return adapter, notes
    return replace(adapter, replacements=tuple(keep)), notes


def _holds(place: Place, tensor: torch.Tensor) -> bool:
    stored = place.init.const_value
    assert stored is not None
    t = tensor_to_torch(stored)
    view = t.T if place.transposed else t
    return tuple(view.shape) == tuple(tensor.shape) and torch.equal(view, tensor.to(view.dtype))


# -- reading weights --------------------------------------------------------------------------


def read_ref(use: WeightUse, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The use's initializer in the reference orientation (a fresh tensor)."""
    tensor = use.init.const_value
    assert tensor is not None
    t = tensor_to_torch(tensor, dtype)
    return t.T.contiguous() if use.transposed else t


@dataclass(frozen=True)
class BaseEntry:
    """A base weight as a pass sees it: where it lives in the graph and how it is oriented."""

    init: ir.Value
    transposed: bool
    block: tuple[int, int] | None
    kind: SiteKind
    ref_shape: tuple[int, ...]


class OnnxBase:
    """The ONNX model's base weights as :class:`~loracc.weights.BaseWeights`.

    Passes that read base weights (DoRA folding, PiSSA/OLoRA reconstruction) get the bound
    initializers under their Hugging Face keys, in the stored orientation of each site's kind.
    ``tied_embeddings`` is always None: every ONNX use has its own binding, and shared
    initializers are split before one user changes.
    """

    def __init__(self, entries: dict[str, BaseEntry], path: str = "<onnx>") -> None:
        self.folder = path
        self.config: dict[str, Any] = {}
        self._entries = entries

    @classmethod
    def from_table(cls, table: BindingTable, path: str = "<onnx>") -> OnnxBase:
        entries: dict[str, BaseEntry] = {}
        for b in table.sites.values():
            use = b.uses[0]
            entries.setdefault(
                b.site.target,
                BaseEntry(use.init, use.transposed, b.block, b.site.kind, b.site.logical_shape()),
            )
        return cls(entries, path)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def tied_embeddings(self) -> tuple[str, str] | None:
        return None

    @property
    def expert_splits(self) -> dict[str, ExpertSplit]:
        return {}

    def resolve(self, key: str) -> str | None:
        return key if key in self._entries else None

    def _entry(self, key: str) -> BaseEntry:
        try:
            return self._entries[key]
        except KeyError:
            raise FormatError(f"{self.folder}: no bound ONNX weight for '{key}'") from None

    def shape(self, key: str) -> tuple[int, ...] | None:
        e = self._entries.get(key)
        if e is None:
            return None
        return e.kind.stored_shape(e.ref_shape)

    def read_ref(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight of ``key`` in the reference orientation."""
        e = self._entry(key)
        tensor = e.init.const_value
        assert tensor is not None
        t = tensor_to_torch(tensor, dtype or torch_dtype(tensor.dtype))
        ref = t.T if e.transposed else t
        if e.block is not None:
            ref = ref[e.block[0] : e.block[1]]
        return ref.contiguous()

    def read(self, key: str) -> torch.Tensor:
        return self._entry(key).kind.to_stored(self.read_ref(key)).contiguous()


# Layout sources (Site.layout_source) the graph does not overrule: loracc.io.layout's
# architecture table and the user's --layout.
_DECIDED = ("architecture", "--layout")


def graph_layout(site: Site, kind: SiteKind, why: str) -> Site:
    """``site`` with the 2-D layer kind the ONNX graph shows, unless the architecture table or
    ``--layout`` decided it (the same order as the PEFT reader's, loracc.io.layout)."""
    from dataclasses import replace

    if site.kind is kind or site.layout_source.startswith(_DECIDED):
        return site
    return replace(site, kind=kind, layout_source=why)


def correct_kinds(adapter: Adapter, table: BindingTable) -> Adapter:
    """Mark LINEAR sites bound to a parameter stored (in, out) as CONV1D (GPT-2 style).

    A parameter kept under its own name and fed to MatMul (or Gemm with transB=0) without a
    Transpose is stored (in, out): that is transformers' Conv1D, whatever the adapter's
    ``fan_in_fan_out`` says, unless the architecture table or ``--layout`` decided the site.
    """
    from dataclasses import replace

    sites = []
    changed = False
    for site in adapter.sites:
        b = table.sites.get(site.module)
        if (
            b is not None
            and site.kind is SiteKind.LINEAR
            and b.block is None
            and all(u.reads_conv1d for u in b.uses)
            and any(_common_suffix(m, site.module) for m in _param_modules(b.uses[0].names))
        ):
            graph = f"ONNX graph: '{b.uses[0].init.name}' is read as (in, out)"
            new = graph_layout(site, SiteKind.CONV1D, graph)
            changed = changed or new is not site
            site = b.site = new
        sites.append(site)
    return replace(adapter, sites=tuple(sites)) if changed else adapter


def privatize(index: GraphIndex, init: ir.Value, nodes: Iterable[ir.Node], suffix: str) -> ir.Value:
    """Give ``nodes`` their own copy of ``init`` when other nodes read it too.

    Returns the initializer ``nodes`` read afterwards (``init`` itself when nobody else reads
    it). The copy shares the tensor object until a lowering replaces it, so nothing is read.
    """
    nodes = set(nodes)
    readers = index.consumers(init)
    if readers <= nodes:
        return init
    graph = index.graph
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs if v.name}
    copy = ir.Value(
        name=unique_name(taken, f"{init.name}.{suffix}"),
        shape=init.shape,
        type=init.type,
        const_value=init.const_value,
    )
    graph.register_initializer(copy)
    for node in nodes:
        for i, value in enumerate(node.inputs):
            if value is None:
                continue
            chain = _chain_to(value, init)
            if chain is None:
                continue
            new_value = copy
            clones = []
            for step in chain:
                clone = ir.Node(
                    step.domain,
                    step.op_type,
                    [new_value],
                    attributes=list(step.attributes.values()),
                    name=unique_name(taken, f"{step.name or step.op_type}.{suffix}"),
                )
                clone.outputs[0].name = unique_name(taken, f"{step.outputs[0].name}.{suffix}")
                clone.outputs[0].type = step.outputs[0].type
                clone.outputs[0].shape = step.outputs[0].shape
                clones.append(clone)
                new_value = clone.outputs[0]
            if clones:
                graph.insert_before(node, clones)
            node.replace_input_with(i, new_value)
    return copy


def _chain_to(value: ir.Value, init: ir.Value) -> list[ir.Node] | None:
    """The pass-through nodes from ``init`` to ``value`` (empty when ``value is init``)."""
    chain: list[ir.Node] = []
    while value is not init:
        producer = value.producer()
        if producer is None or producer.op_type not in _PASS_OPS or not producer.inputs:
            return None
        chain.insert(0, producer)
        value = producer.inputs[0]  # type: ignore[assignment]
        if value is None:
            return None
    return chain
