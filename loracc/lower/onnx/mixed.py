"""Mixed-adapter batches: one graph, each row of the batch with its own adapter (or the base).

The graph gains an int64 input ``lora_ids`` (shape ``[batch]``): row ``i`` runs adapter slot
``lora_ids[i]`` (0 … N−1), or the base model for −1. Each bound MatMul/Gemm ``y = x·W`` becomes
(``x`` viewed as ``[batch, rows, in]``, the node's leading axes batch-major as HF exports are)::

    idx   = Where(−1 <= lora_ids < N, lora_ids + 1, N + 1)       (once per graph)
    A_sel = Gather(A_stack, idx)              [batch, in, R]
    B_sel = Gather(B_stack, idx)              [batch, R, out]
    h     = MatMul(MatMul(x, A_sel), B_sel) (+ Gather(bias_stack, idx))     [batch, rows, out]
    y'    = y + Reshape(h, Shape(y))
    DoRA: y' = Reshape((y + h) · Gather(scale_stack, idx), Shape(y)) (+ Gemm's C, moved after)

Standard ONNX ops only, so it runs on every execution provider. The **stacks** are onnxruntime
adapter slots ``<module>.lora_A.stacked`` ``[N+2, in, R]``, ``<module>.lora_B.stacked``
``[N+2, R, out]`` (and ``<module>.lora_B.bias_stacked`` ``[N+2, 1, out]`` with lora_bias,
``<module>.dora_scale_stacked`` ``[N+2, 1, out]`` with DoRA: ``m/‖W+ΔW‖``, ones for the base and
adapters without DoRA there):

* row 0 is the base: zeros, so a base row's output is the base's exactly (``y + 0``);
* rows 1 … N are the adapters in order, each as keep-lora's factors (scale folded into B,
  fused q/k/v block-structured), zero-padded to the group's rank R (the largest of its
  adapters'); zero rank columns add nothing;
* row N+1, and the rows of slots a packed set leaves unfilled, hold zeros in A and NaN in B:
  an id outside −1 … N−1, or of an unfilled slot, gives NaN in that row (0·NaN = NaN), on every
  execution provider, never another row's adapter or silently the base.

N and each group's R are fixed by the export (manifest ``loracc.mixed`` in the model's
metadata): :func:`stack_params` refuses more adapters or a larger rank than the slots hold.
Refused, each with its reason: adapters that replace base tensors (:func:`refuse_replacements`),
embedding (Gather) and Conv sites, and quantized bases.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from loracc.errors import FormatError, LoweringError, UnsupportedError
from loracc.ir import Adapter
from loracc.lower.onnx.bind import BindingTable
from loracc.lower.onnx.index import GraphIndex, WeightUse
from loracc.lower.onnx.lora import (
    MANIFEST_KEY,
    SlotGroup,
    _const,
    _graph_names,
    _slot,
    group_params,
    plan_groups,
)
from loracc.lower.onnx.surgery import unique_name

__all__ = [
    "IDS_INPUT",
    "MIXED_KEY",
    "MixedLayout",
    "insert_mixed",
    "plan_mixed",
    "read_mixed",
    "refuse_replacements",
    "stack_params",
]

MIXED_KEY = "loracc.mixed"
MIXED_VERSION = 1
IDS_INPUT = "lora_ids"
NO_REPLACEMENTS = (
    "a mixed-batch graph holds only LoRA branches (a replaced tensor cannot differ per row)"
)
_MIXED_OPS = ("MatMul", "Gemm")


@dataclass
class MixedLayout:
    """The stacked slots of a mixed-batch graph: ``slots`` adapters, a rank per group."""

    slots: int
    groups: list[SlotGroup]
    ranks: dict[str, int]
    adapters: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MIXED_VERSION,
            "ids": IDS_INPUT,
            "slots": self.slots,
            "ranks": self.ranks,
            "adapters": self.adapters,
            "groups": [g.to_json() for g in self.groups],
        }

    def stack_bytes(self) -> int:
        """Bytes of the stacked slots (fp32 sizes; the slots' own dtype may halve them)."""
        total = 0
        for g in self.groups:
            r = self.ranks[g.key]
            per_row = g.fan_in * r + r * g.fan_out
            per_row += g.fan_out * ((1 if g.bias else 0) + (1 if g.scale else 0))
            total += (self.slots + 2) * per_row
        return 4 * total


def refuse_replacements(adapter: Adapter) -> None:
    """Refuse an adapter that replaces base tensors, with the reason."""
    if adapter.replacements or adapter.token_rows:
        names = [r.target for r in adapter.replacements] + [t.target for t in adapter.token_rows]
        raise UnsupportedError(
            f"{adapter.name}: replaces base tensors ({', '.join(names)}); {NO_REPLACEMENTS}"
        )


def _check_uses(group: SlotGroup, uses: Sequence[WeightUse]) -> None:
    for use in uses:
        if use.quant is not None:
            raise UnsupportedError(
                f"{group.key}: --mixed-batch on a quantized weight ({use.node.op_type}) is not "
                "supported; export a float base, or --keep-lora without --mixed-batch"
            )
        if use.op not in _MIXED_OPS:
            kind = "an embedding (Gather)" if use.op == "Gather" else f"a {use.op}"
            raise UnsupportedError(
                f"{group.key}: --mixed-batch supports LoRA on MatMul/Gemm (Linear, Conv1D) only; "
                f"this module is {kind}; leave it out of the adapters' target_modules"
            )


def _uses_of(table: BindingTable) -> dict[str, list[WeightUse]]:
    uses: dict[str, list[WeightUse]] = {}
    for b in table.sites.values():
        uses.setdefault(b.fused or b.module, b.uses)
    return uses


def plan_mixed(table: BindingTable, adapters: Sequence[Adapter], where: str) -> MixedLayout:
    """One stacked slot group per bound module over the union of ``adapters`` (in order), each
    group's rank the largest of its adapters'."""
    for adapter in adapters:
        refuse_replacements(adapter)
    groups = plan_groups(table, adapters)
    uses = _uses_of(table)
    taken = _graph_names(table.index.graph)
    if IDS_INPUT in taken:
        raise UnsupportedError(f"{where}: already has a value named '{IDS_INPUT}'")
    for g in groups:
        _check_uses(g, uses[g.key])
        g.A = unique_name(taken, f"{g.key}.lora_A.stacked")
        g.B = unique_name(taken, f"{g.key}.lora_B.stacked")
        if g.bias:
            g.bias = unique_name(taken, f"{g.key}.lora_B.bias_stacked")
        if g.scale:
            g.scale = unique_name(taken, f"{g.key}.dora_scale_stacked")
    ranks = {g.key: max(_rank(g, a) for a in adapters) for g in groups}
    return MixedLayout(len(adapters), groups, ranks, [a.name for a in adapters])


def _rank(group: SlotGroup, adapter: Adapter) -> int:
    """The group's rank for ``adapter``: its members' ranks summed (fused q/k/v), 0 if none."""
    sites = {s.module: s for s in adapter.sites}
    return sum(sites[m.module].rank for m in group.members if m.module in sites)


def stack_params(
    layout: MixedLayout, adapters: Sequence[Adapter], where: str
) -> dict[str, tuple[torch.Tensor, int]]:
    """Every stacked slot's value for ``adapters`` in slot order (compiled, checked against the
    groups), with its ONNX element type; slots past ``len(adapters)`` are unfilled (NaN rows)."""
    n = layout.slots
    if len(adapters) > n:
        raise UnsupportedError(
            f"{where}: {len(adapters)} adapters for a mixed-batch graph with {n} adapter slots "
            "(export the graph with at least as many --adapter)"
        )
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for g in layout.groups:
        R = layout.ranks[g.key]
        A = torch.zeros(n + 2, g.fan_in, R)
        B = torch.zeros(n + 2, R, g.fan_out)
        bias = torch.zeros(n + 2, 1, g.fan_out) if g.bias else None
        scale = torch.ones(n + 2, 1, g.fan_out) if g.scale else None
        for i, adapter in enumerate(adapters, start=1):
            p = group_params(g, {s.module: s for s in adapter.sites})
            r = p[g.A].shape[1]
            if r > R:
                raise UnsupportedError(
                    f"{adapter.name}: rank {r} for '{g.key}', whose stacked slot in {where} "
                    f"holds rank {R} (export the graph with an adapter of that rank)"
                )
            A[i, :, :r] = p[g.A]
            B[i, :r, :] = p[g.B]
            if bias is not None and g.bias:
                bias[i, 0] = p[g.bias]
            if scale is not None and g.scale:
                scale[i, 0] = p[g.scale].flatten()
        B[len(adapters) + 1 :] = float("nan")  # unfilled slots and out-of-range ids
        out[g.A], out[g.B] = (A, g.dtype), (B, g.dtype)
        if bias is not None and g.bias:
            bias[len(adapters) + 1 :] = float("nan")
            out[g.bias] = (bias, g.dtype)
        if scale is not None and g.scale:
            out[g.scale] = (scale, g.dtype)  # unfilled rows: B's NaN already poisons them
    return out


def _batch_dim(graph: ir.Graph) -> int | str:
    """The first graph input's leading dimension (the exporter's batch symbol), else 'batch'."""
    for v in graph.inputs:
        if v.shape is not None and len(v.shape) > 0:
            d = v.shape[0]
            if isinstance(d, int):
                return d
            if d.value is not None:
                return str(d.value)
    return "batch"


class _Emitter:
    """Builds nodes with unique names; they are inserted into the graph by the caller."""

    def __init__(self, graph: ir.Graph, taken: set[str]) -> None:
        self.graph, self.taken = graph, taken
        self.nodes: list[ir.Node] = []

    def __call__(
        self, op: str, inputs: Sequence[ir.Value | None], tag: str, **attrs: Any
    ) -> ir.Value:
        n = ir.Node(
            "", op, inputs, attributes=ir.convenience.convert_attributes(attrs),
            name=unique_name(self.taken, tag),
        )  # fmt: skip
        n.outputs[0].name = unique_name(self.taken, f"{tag}_output_0")
        self.nodes.append(n)
        return n.outputs[0]

    def const(self, name: str, value: torch.Tensor, dtype: int) -> ir.Value:
        return _const(self.graph, self.taken, name, value, dtype)

    def ints(self, name: str, *values: int) -> ir.Value:
        """An int64 initializer: a scalar for one value, else a vector."""
        array = np.array(values if len(values) > 1 else values[0], dtype=np.int64)
        v = ir.Value(name=unique_name(self.taken, name), shape=ir.Shape(list(array.shape)))
        v.type = ir.TensorType(ir.DataType.INT64)
        v.const_value = ir.tensor(array, name=v.name)
        self.graph.register_initializer(v)
        return v


def insert_mixed(
    index: GraphIndex,
    table: BindingTable,
    layout: MixedLayout,
    defaults: Mapping[str, tuple[torch.Tensor, int]],
) -> None:
    """Add ``lora_ids``, the row index, the stacked slots and the branches; record the manifest."""
    graph = index.graph
    taken = _graph_names(graph)
    ids = ir.Value(
        name=IDS_INPUT, shape=ir.Shape([_batch_dim(graph)]), type=ir.TensorType(ir.DataType.INT64)
    )
    graph.inputs.append(ids)
    emit = _Emitter(graph, taken)
    n = layout.slots

    def scalar(name: str, v: int) -> ir.Value:
        return emit.ints(f"lora_ids.{name}", v)

    valid = emit(
        "And",
        [
            emit("Greater", [ids, scalar("min_minus_1", -2)], "/lora_ids/above"),
            emit("Less", [ids, scalar("slots", n)], "/lora_ids/below"),
        ],
        "/lora_ids/valid",
    )
    shifted = emit("Add", [ids, scalar("one", 1)], "/lora_ids/shift")
    idx = emit("Where", [valid, shifted, scalar("invalid_row", n + 1)], "/lora_ids/row")
    batch = emit("Shape", [ids], "/lora_ids/batch")
    first = next(iter(graph))
    graph.insert_before(first, emit.nodes)

    uses = _uses_of(table)
    for g in layout.groups:
        R = layout.ranks[g.key]
        dims: dict[str, list[int | str]] = {
            g.A: [n + 2, g.fan_in, R],
            g.B: [n + 2, R, g.fan_out],
        }
        if g.bias:
            dims[g.bias] = [n + 2, 1, g.fan_out]
        if g.scale:
            dims[g.scale] = [n + 2, 1, g.fan_out]
        slots = {
            name: _slot(graph, name, d, g.dtype, defaults[name][0]) for name, d in dims.items()
        }
        for use in uses[g.key]:
            _branch(graph, taken, use.node, g, slots, idx, batch)
    index.model.metadata_props[MIXED_KEY] = json.dumps(layout.to_json(), sort_keys=True)


def _branch(
    graph: ir.Graph,
    taken: set[str],
    node: ir.Node,
    g: SlotGroup,
    slots: dict[str, ir.Value],
    idx: ir.Value,
    batch: ir.Value,
) -> None:
    """Add the rows' selected branch of ``node``'s input to its output."""
    prefix = f"/{g.key.replace('.', '/')}/lora_mixed"
    emit = _Emitter(graph, taken)
    x, y = node.inputs[0], node.outputs[0]
    rows = emit.ints(f"{g.key}.lora_mixed.rows_in", -1, g.fan_in)
    x3 = emit(
        "Reshape", [x, emit("Concat", [batch, rows], f"{prefix}/in_shape", axis=0)], f"{prefix}/x"
    )
    a = emit("Gather", [slots[g.A], idx], f"{prefix}/A/Gather", axis=0)
    b = emit("Gather", [slots[g.B], idx], f"{prefix}/B/Gather", axis=0)
    h = emit("MatMul", [emit("MatMul", [x3, a], f"{prefix}/A/MatMul"), b], f"{prefix}/B/MatMul")
    if g.bias:
        bias = emit("Gather", [slots[g.bias], idx], f"{prefix}/bias/Gather", axis=0)
        h = emit("Add", [h, bias], f"{prefix}/bias/Add")
    alpha = node.attributes.get("alpha")
    if node.op_type == "Gemm" and alpha is not None and alpha.as_float() != 1.0:
        c = emit.const(f"{g.key}.gemm_alpha", torch.tensor(alpha.as_float()), g.dtype)
        h = emit("Mul", [h, c], f"{prefix}/alpha/Mul")
    y_shape = emit("Shape", [y], f"{prefix}/out_shape")
    if g.scale:  # DoRA: (y + branch) · the row's scale, then the node's own bias
        moved = _take_gemm_bias(node, g)
        rows_out = emit.ints(f"{g.key}.lora_mixed.rows_out", -1, g.fan_out)
        shape3 = emit("Concat", [batch, rows_out], f"{prefix}/out_shape3", axis=0)
        y3 = emit("Reshape", [y, shape3], f"{prefix}/y")
        scale = emit("Gather", [slots[g.scale], idx], f"{prefix}/dora/Gather", axis=0)
        out3 = emit("Mul", [emit("Add", [y3, h], f"{prefix}/Add"), scale], f"{prefix}/dora/Mul")
        out = emit("Reshape", [out3, y_shape], f"{prefix}/out")
        if moved is not None:
            out = emit("Add", [out, moved], f"{prefix}/bias_moved/Add")
    else:
        h = emit("Reshape", [h, y_shape], f"{prefix}/out")
        out = emit("Add", [y, h], f"{prefix}/Add")
    graph.insert_after(node, emit.nodes)
    if y.is_graph_output():  # keep the graph output's name on the adapted value
        name = y.name
        y.name = unique_name(taken, f"{name}.base")
        out.name = name
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    for n in emit.nodes:  # the branch itself still reads the base output
        for i, value in enumerate(n.inputs):
            if value is out:
                n.replace_input_with(i, y)


def _take_gemm_bias(node: ir.Node, g: SlotGroup) -> ir.Value | None:
    """A Gemm's C input, removed from the node (DoRA scales the output before the bias)."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    beta = node.attributes.get("beta")
    if beta is not None and beta.as_float() != 1.0:
        raise LoweringError(f"{g.key}: DoRA on a Gemm with beta != 1")
    bias = node.inputs[2]
    node.resize_inputs(2)
    return bias


def read_mixed(model: ir.Model, where: str) -> MixedLayout:
    """The stacked slot layout a ``--mixed-batch`` export recorded in ``model``."""
    text = model.metadata_props.get(MIXED_KEY)
    if text is None:
        hint = (
            " (a keep-lora model: pack without --mixed-batch)"
            if MANIFEST_KEY in model.metadata_props
            else ""
        )
        raise FormatError(
            f"{where}: no '{MIXED_KEY}' metadata; not a model written by "
            f"`loracc export --onnx --keep-lora --mixed-batch`{hint}"
        )
    try:
        data = json.loads(text)
        if data.get("version") != MIXED_VERSION:
            raise FormatError(
                f"{where}: mixed-batch manifest version {data.get('version')} is unknown"
            )
        layout = MixedLayout(
            int(data["slots"]),
            [SlotGroup.from_json(g) for g in data["groups"]],
            {str(k): int(v) for k, v in data["ranks"].items()},
            [str(a) for a in data.get("adapters", [])],
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FormatError(f"{where}: mixed-batch manifest is malformed ({e})") from e
    inputs = {v.name for v in model.graph.inputs}
    for g in layout.groups:
        if g.key not in layout.ranks:
            raise FormatError(f"{where}: mixed-batch manifest has no rank for '{g.key}'")
        for name in (g.A, g.B, g.bias, g.scale):
            if name and (name not in inputs or name not in model.graph.initializers):
                raise FormatError(f"{where}: slot '{name}' is not a graph input with a default")
    return layout
