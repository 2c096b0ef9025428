"""The graph index: every weight use of an ONNX model's main graph.

A *weight use* is a compute node together with the initializer its weight operand comes from,
possibly through ``Identity``, ``Cast`` or a 2-D ``Transpose`` (``Constant`` nodes feeding a
weight are lifted to initializers first, :func:`loracc.lower.onnx.surgery.lift_weight_constants`):

=========  =======  ==================================================================
op         operand  what the node consumes, in the site's reference orientation
=========  =======  ==================================================================
MatMul     1        Wᵀ, (in, out)
Gemm       1        W (out, in) with ``transB=1``; Wᵀ with ``transB=0``
Gather     0        the embedding table (num, dim)
Conv       1        W (out, in, *k)
=========  =======  ==================================================================

Fused 3-D MoE expert weights are uses too: the ``Gather``/``GatherND`` that picks experts by
the routing's index (operand 0), with how its output reaches a ``MatMul``
(:mod:`~loracc.lower.onnx.experts`); ``transposed`` then says whether the graph reads each
expert as (in, out), until binding relates it to the site's (E, out, in).

Quantized Linear weights (``MatMulNBits``, ``quantize_dynamic``'s ``MatMulInteger``) are uses
too, with their :mod:`~loracc.lower.onnx.quant` scheme: their reference weight is the dequantized
one (``MatMulNBits``: (N, K), not transposed; ``MatMulInteger``: (K, N), transposed).

The reference orientation is the site's logical one: (out, in) for Linear, Conv1D and 2-D
target parameters (ΔW = s·B@A), (num, dim) for embeddings, (out, in, *k) for convolutions. A use
records whether its initializer is stored transposed to it. The index only reads the graph;
:mod:`loracc.lower.onnx.bind` matches sites against it.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import onnx_ir as ir
import torch

from loracc.io.onnx_model import tensor_dims, tensor_to_torch
from loracc.lower.onnx.experts import GATHERS, ExpertRead, trace_expert
from loracc.lower.onnx.quant import NBitsScheme, QuantScheme, scheme_of

__all__ = [
    "COMPUTE_OPS",
    "PASS_OPS",
    "GraphIndex",
    "Place",
    "WeightUse",
    "common_suffix",
    "find_bias",
    "node_scope",
    "param_modules",
    "read_ref",
]

COMPUTE_OPS = {"MatMul": 1, "Gemm": 1, "Gather": 0, "Conv": 1}
PASS_OPS = frozenset({"Identity", "Cast", "Transpose"})
_QUANTIZED = frozenset({"MatMulNBits", "MatMulInteger", "QLinearMatMul", "DequantizeLinear"})
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"
# onnxruntime-genai's model builder names the weight it made for a node ``<module>.<Op>.weight``:
# its own copy, transposed for the MatMul, not the module's parameter as transformers stores it.
_BUILDER_SUFFIXES = (".MatMul.weight", ".Gemm.weight")
_PARAM_SUFFIXES = (*_BUILDER_SUFFIXES, ".weight")


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
        quant: the quantization scheme of a quantized weight, else None.
        expert: for a 3-D expert weight, how the gather reaches its MatMul, else None.
    """

    node: ir.Node
    operand: int
    init: ir.Value
    path: tuple[ir.Node, ...]
    transposed: bool
    scope: str | None
    names: tuple[str, ...]
    quant: QuantScheme | None = None
    expert: ExpertRead | None = None

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def node_name(self) -> str:
        return self.node.name or f"<{self.node.op_type}>"

    @property
    def shape(self) -> tuple[int, ...]:
        """The initializer's shape as a float weight (``MatMulNBits``: (N, K))."""
        if isinstance(self.quant, NBitsScheme):
            return self.quant.shape
        return tensor_dims(self.init.const_value.shape)  # type: ignore[union-attr]

    @property
    def named(self) -> bool:
        """Whether the initializer carries a parameter name (not a folded constant)."""
        name = self.init.name or ""
        return bool(name) and not _generic(name) and _FOLDED_FROM not in self.init.metadata_props

    @property
    def own_parameter(self) -> bool:
        """Whether the initializer is the module's parameter as the model stores it: kept under
        its own name, not a folded constant or a builder's ``<module>.MatMul.weight`` copy."""
        return self.named and not (self.init.name or "").endswith(_BUILDER_SUFFIXES)

    @property
    def reads_conv1d(self) -> bool:
        """Whether the graph shows a Conv1D parameter: one kept as it is stored (its own name)
        and read as (in, out) without a Transpose is stored so (the graph's Linear-or-Conv1D
        evidence). A builder's ``lm_head.MatMul.weight`` read the same way shows nothing: the
        builder transposed it when it wrote the graph."""
        transposes = any(p.op_type == "Transpose" for p in self.path)
        return (
            self.quant is None
            and self.expert is None
            and self.own_parameter
            and self.transposed
            and not transposes
        )


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


def param_modules(names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        for suffix in _PARAM_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                out.append(name[: -len(suffix)])
                break
    return out


def common_suffix(a: str, b: str) -> int:
    """Dotted segments ``a`` and ``b`` share at the end when one ends with the other, else 0."""
    if not a or not b:
        return 0
    if a == b or a.endswith("." + b) or b.endswith("." + a):
        return min(a.count("."), b.count(".")) + 1
    return 0


def _names(init: ir.Value) -> tuple[str, ...]:
    """The names an initializer is known by: its own, then those it was folded from."""
    names = [init.name or "", *_literal_list(init.metadata_props.get(_FOLDED_FROM))]
    return tuple(n for n in names if n)


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
        self.uses: list[WeightUse] = []
        self.near_misses: dict[str, list[str]] = defaultdict(list)
        # Expert weights left unbound, by every name they are known by: why.
        self.expert_refusals: dict[str, str] = {}
        experts: dict[int, list[WeightUse]] = defaultdict(list)
        for node in self.graph:
            if node.op_type in GATHERS and (traced := trace_expert(node)) is not None:
                if isinstance(traced, str):
                    self._refuse_expert(node.inputs[0], traced)
                else:
                    experts[id(traced[0])].append(self._expert_use(*traced))
                continue
            if node.op_type in _QUANTIZED | {"MatMul"} and (use := self._quantized(node)):
                self.uses.append(use)
                continue
            if node.op_type in _QUANTIZED:
                self._note(node, f"{node.op_type} whose quantized weights loracc cannot read")
                continue
            if node.domain not in ("", "ai.onnx"):
                continue
            operand = COMPUTE_OPS.get(node.op_type)
            if operand is None or len(node.inputs) <= operand:
                continue
            use = self._trace(node, operand)
            if use is not None:
                self.uses.append(use)
            else:
                self._note(node, f"{node.op_type} whose weight is computed, not an initializer")

        for uses in experts.values():
            if self.consumers(uses[0].init) == {u.node for u in uses}:
                self.uses.extend(uses)
            else:
                self._refuse_expert(
                    uses[0].init, "it is also read other than by gathers of whole experts"
                )

    def _expert_use(self, init: ir.Value, path: tuple[ir.Node, ...], read: ExpertRead) -> WeightUse:
        return WeightUse(
            node=read.gather,
            operand=0,
            init=init,
            path=path,
            transposed=read.in_out,
            scope=node_scope(read.matmul) or node_scope(read.gather),
            names=_names(init),
            expert=read,
        )

    def _refuse_expert(self, value: ir.Value | None, why: str) -> None:
        while value is not None and not value.is_initializer():
            producer = value.producer()
            value = producer.inputs[0] if producer is not None and producer.inputs else None
        if value is not None:
            for name in _names(value):
                self.expert_refusals.setdefault(name, why)

    def _note(self, node: ir.Node, what: str) -> None:
        scope = node_scope(node)
        if scope:
            self.near_misses[scope].append(f"{node.name or node.op_type}: {what}")

    def _quantized(self, node: ir.Node) -> WeightUse | None:
        scheme = scheme_of(node)
        weight = scheme.weight_input if scheme is not None else None
        if (
            scheme is None
            or weight is None
            or not weight.is_initializer()
            or weight.const_value is None
        ):
            return None
        return WeightUse(
            node=node,
            operand=1,
            init=weight,
            path=(),
            transposed=scheme.transposed,
            scope=node_scope(scheme.output_node) or node_scope(node),
            names=(weight.name,) if weight.name else (),
            quant=scheme,
        )

    def _trace(self, node: ir.Node, operand: int) -> WeightUse | None:
        value = node.inputs[operand]
        path: list[ir.Node] = []
        flipped = False
        while value is not None and not value.is_initializer():
            producer = value.producer()
            if producer is None or producer.op_type not in PASS_OPS:
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
        return WeightUse(
            node=node,
            operand=operand,
            init=value,
            path=tuple(path),
            transposed=_expects_transposed(node) != flipped,
            scope=node_scope(node),
            names=_names(value),
        )

    def expert_shape(self, param: str) -> tuple[int, ...] | None:
        """The shape of the 3-D expert weight named after target parameter ``param``
        (``<module>.<param>``), or None when none or several shapes are."""
        scored = [
            (max((common_suffix(n, param) for n in u.names), default=0), u.shape)
            for u in self.uses
            if u.expert is not None
        ]
        top = max((q for q, _ in scored), default=0)
        shapes = {shape for q, shape in scored if q == top and q}
        return shapes.pop() if len(shapes) == 1 else None

    def consumers(self, init: ir.Value) -> set[ir.Node]:
        """Nodes that read ``init``, looking through Identity/Cast/Transpose."""
        out: set[ir.Node] = set()
        stack = [init]
        while stack:
            value = stack.pop()
            for node in value.consumers():
                if node.op_type in PASS_OPS and node.domain in ("", "ai.onnx"):
                    stack.extend(node.outputs)
                else:
                    out.add(node)
        return out


@dataclass(eq=False)
class Place:
    """One initializer an edit changes, the nodes that must see the change, and its orientation.

    ``transposed`` is relative to the edit's orientation (the site's reference orientation for
    deltas, the Hugging Face stored orientation for whole-tensor edits).
    """

    init: ir.Value
    nodes: set[ir.Node]
    transposed: bool


def find_bias(use: WeightUse) -> Place | None:
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


def read_ref(use: WeightUse, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The use's initializer in the reference orientation (a fresh tensor; dequantized)."""
    tensor = use.init.const_value
    assert tensor is not None
    if use.quant is not None:
        t = use.quant.dequantize(tensor).to(dtype)
    else:
        t = tensor_to_torch(tensor, dtype)
    return t.mT.contiguous() if use.transposed else t
