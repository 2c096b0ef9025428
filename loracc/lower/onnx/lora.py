"""Keep-LoRA lowering: explicit LoRA branches whose weights are onnxruntime adapter slots.

For each bound compute node the graph gains a branch added to the node's output, in the node's
dtype (``x`` the node's input, ``y`` its output):

============  ===================================================================
node          branch
============  ===================================================================
MatMul/Gemm   ``y + MatMul(MatMul(x, A), B)`` with A (in, r), B (r, out)
Gather        ``y + MatMul(Gather(A, ids), B)`` with A (num, r), B (r, dim)
Conv          ``y + Conv(Conv(x, A), B)`` with A (r, in, *k) (the node's strides and pads,
              dilation 1, as peft's lora_A), B (out, r, 1, ...)
============  ===================================================================

The MatMul/Gemm branch is emitted as ``Gemm(MatMul(x, A), B, C=y)`` on ``x`` and ``y`` flattened
to 2-D and reshaped back: the sum happens inside the Gemm (onnxruntime does not fuse an ``Add``
of two activations), and rank-0 slots fill no zero tensor (docs/BENCHMARKS.md). Expert reads
(:mod:`loracc.lower.onnx.experts`) keep ``y + branch``.

This is peft's unmerged forward ``base(x) + s·B(A(x))`` with the scale folded into B:
A = lora_Aᵀ, B = (s·lora_B)ᵀ (conv factors keep their layout). ``lora_bias`` adds a bias slot
to the branch (``s·b``). DoRA multiplies ``y + branch`` by a per-output-channel scale slot
``m/‖W+ΔW‖`` before the node's own bias is added (the bias is moved out of Gemm/Conv for that).

**Slots** are graph inputs that also have initializers of the same name, with a symbolic rank
dimension, named ``<module>.lora_A.weight``, ``<module>.lora_B.weight``, ``<module>.dora_scale``
and ``<module>.lora_B.bias``. Their initializers are empty slots by default: rank 0
(``A (in, 0)``, ``B (0, out)``), ones and zeros, so the plain model is the base and a file that
names only some slots is exactly its adapter; with filled slots they hold the export's adapter.
An adapter file loracc writes names every slot: slots its adapter does not use hold rank 0.

Slotted models other tools wrote (Olive, onnxruntime-genai's builder) have no manifest:
:mod:`loracc.lower.onnx.foreign` reads their slot pairs from the graph and maps an adapter's
modules onto them in the model's naming, splitting or fusing q/k/v as its slots are.

**MoE experts** (3-D target parameters, :mod:`loracc.lower.onnx.experts`): the slots are the
per-expert factors, ``A (E, in, r)`` and ``B (E, r, out)``, gathered with the base weight's expert
index beside each of its ``MatMul`` reads.

**Fused weights**: sites bound to blocks of one fused weight (q/k/v in a ``qkv_proj``) share
one branch with block-structured factors: A stacks the members' A along the rank axis, B is
block-diagonal, each member's (s·B)ᵀ at its rows of the rank axis and its columns of the output.

The slot layout is recorded in the model's metadata (``loracc.slots``, JSON) so that
:func:`pack_params` can check and write adapter files for the model later.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir
import torch

from loracc.errors import FormatError, LoweringError, UnsupportedError
from loracc.io.onnx_model import tensor_to_torch, torch_to_tensor
from loracc.ir import Adapter, Site, SiteKind
from loracc.lower.onnx.bind import BindingTable
from loracc.lower.onnx.experts import ExpertRead, branch_factors, expert_slot_values
from loracc.lower.onnx.index import GraphIndex, WeightUse
from loracc.lower.onnx.quant import QUANT_OPS, scheme_of
from loracc.lower.onnx.slots import (
    MANIFEST_KEY,
    MANIFEST_VERSION,
    Member,
    SlotGroup,
)
from loracc.lower.onnx.surgery import unique_name
from loracc.lower.onnx.weights import BaseEntry, OnnxBase

__all__ = [
    "elem_type",
    "insert_slots",
    "pack_params",
    "plan_groups",
]


def elem_type(dtype: ir.DataType | None) -> int:
    return int(dtype) if dtype is not None else int(ir.DataType.FLOAT)


def _graph_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.initializers.values() if v.name}
    names |= {v.name for v in graph.inputs if v.name}
    for node in graph:
        names |= {v.name for v in node.outputs if v.name}
        if node.name:
            names.add(node.name)
    return names


def plan_groups(table: BindingTable, adapters: Sequence[Adapter]) -> list[SlotGroup]:
    """One slot group per bound module (per fused weight), over the union of the adapters."""
    taken = _graph_names(table.index.graph)
    groups: dict[str, SlotGroup] = {}
    for adapter in adapters:
        for site in adapter.sites:
            b = table.sites[site.module]
            key = b.fused or site.module
            use = b.uses[0]
            w_shape = list(use.shape)
            ref = w_shape[::-1] if use.transposed else w_shape
            group = groups.get(key)
            if group is None:
                dtype = _branch_dtype(use)
                group = SlotGroup(
                    key=key,
                    op=use.op,
                    fan_in=ref[1],
                    fan_out=ref[0],
                    kernel=ref[2:],
                    dtype=dtype,
                    A=unique_name(taken, f"{key}.lora_A.weight"),
                    B=unique_name(taken, f"{key}.lora_B.weight"),
                    rank_dim=f"{key}.lora_r",
                    members=[],
                    weight=use.init.name or "",
                    weight_transposed=use.transposed,
                    nodes=[u.node_name for u in b.uses],
                )
                if use.op == "Gather":  # reference (num, dim): A looks rows up, B maps r -> dim
                    group.fan_in, group.fan_out = ref[0], ref[1]
                if use.expert is not None:  # (E, out, in): one branch of MatMuls per read
                    group.op, group.experts, group.kernel = "MatMul", w_shape[0], []
                    group.fan_in, group.fan_out = site.lora_A.shape[1], site.lora_B.shape[0]
                groups[key] = group
            if group.member(site.module) is None:
                start, stop = b.block or (0, group.fan_out)
                group.members.append(Member(site.module, site.kind.value, start, stop))
            if (site.magnitude is not None or site.channel_scale is not None) and not group.scale:
                group.scale = unique_name(taken, f"{key}.dora_scale")
            if site.lora_bias is not None and not group.bias:
                group.bias = unique_name(taken, f"{key}.lora_B.bias")
    return list(groups.values())


def _branch_dtype(use: WeightUse) -> int:
    """The dtype the node computes in: its activation input, else its weight after casts
    (a quantized weight: its float input, else its scales' dtype)."""
    if use.expert is not None and use.expert.x.dtype is not None:
        return elem_type(use.expert.x.dtype)
    if use.quant is not None:
        x = use.quant.activation
        return elem_type(x.dtype if x.dtype is not None else use.quant.float_dtype)
    if use.op != "Gather":
        first = use.node.inputs[0]
        if first is not None and first.dtype is not None:
            return elem_type(first.dtype)
    operand = use.node.inputs[use.operand]
    if operand is not None and operand.dtype is not None:
        return elem_type(operand.dtype)
    return elem_type(use.init.const_value.dtype if use.init.const_value else None)


# -- slot values ------------------------------------------------------------------------------


def group_params(group: SlotGroup, sites: Mapping[str, Site]) -> dict[str, torch.Tensor]:
    """Slot values (fp32) of ``group`` for the sites of one compiled adapter (rank 0 where none).

    DoRA sites hold ``channel_scale`` (fold-dora always runs before this lowering).
    """
    present = [(m, sites[m.module]) for m in group.members if m.module in sites]
    for _, site in present:
        assert site.magnitude is None, f"{site.module}: DoRA magnitude not folded (fold-dora)"
    out: dict[str, torch.Tensor] = {}
    if group.experts:  # one member: the expert weight is never fused with another
        out[group.A], out[group.B] = expert_slot_values(
            present[0][1] if present else None, group.experts, group.fan_in, group.fan_out
        )
        return out
    rank = sum(s.rank for _, s in present)
    if group.op == "Conv":
        k = group.kernel
        A = torch.zeros(rank, group.fan_in, *k)
        B = torch.zeros(group.fan_out, rank, *[1] * len(k))
    else:
        A = torch.zeros(group.fan_in, rank)
        B = torch.zeros(rank, group.fan_out)
    r0 = 0
    for m, site in present:
        r = site.rank
        a = site.lora_A.to(torch.float32)
        sb = site.lora_B.to(torch.float32) * site.scale
        if group.op == "Conv":
            A[r0 : r0 + r] = a
            B[m.start : m.stop, r0 : r0 + r] = sb
        else:
            A[:, r0 : r0 + r] = a.T
            B[r0 : r0 + r, m.start : m.stop] = sb.T
        r0 += r
    out[group.A], out[group.B] = A, B
    if group.scale:
        scale = torch.ones(group.fan_out)
        for m, site in present:
            if site.channel_scale is not None:
                scale[m.start : m.stop] = site.channel_scale.to(torch.float32).flatten()
        out[group.scale] = scale.reshape(group.channel_shape)
    if group.bias:
        bias = torch.zeros(group.fan_out)
        for m, site in present:
            if site.lora_bias is not None:
                bias[m.start : m.stop] = site.lora_bias.to(torch.float32) * site.scale
        out[group.bias] = bias
    return out


def check_fits(group_of: Mapping[str, SlotGroup], adapter: Adapter, where: str) -> None:
    """Refuse an adapter whose sites have no slot, or do not fit theirs."""
    missing = sorted(s.module for s in adapter.sites if s.module not in group_of)
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise UnsupportedError(
            f"{adapter.name}: targets {', '.join(repr(m) for m in missing[:8])}{more}, which "
            f"{'has' if len(missing) == 1 else 'have'} no adapter slot in {where} (export the "
            "model with --keep-lora and an adapter that targets them)"
        )
    for site in adapter.sites:
        group = group_of[site.module]
        m = group.member(site.module)
        assert m is not None
        A, B = site.lora_A, site.lora_B
        fits = A.shape[1] == group.fan_in and B.shape[0] == m.stop - m.start
        if group.op == "Conv":
            fits = fits and list(A.shape[2:]) == group.kernel
        if group.experts:
            fits = fits and A.shape[0] % group.experts == 0
        if not fits:
            raise UnsupportedError(
                f"{adapter.name}: module '{site.module}' has factors {tuple(A.shape)}/"
                f"{tuple(B.shape)}; its slot in {where} takes in={group.fan_in}, "
                f"out={m.stop - m.start}"
                + (f", kernel {group.kernel}" if group.kernel else "")
                + (f", {group.experts} experts" if group.experts else "")
            )
        if (site.magnitude is not None or site.channel_scale is not None) and not group.scale:
            raise UnsupportedError(
                f"{adapter.name}: module '{site.module}' uses DoRA; its slot in {where} has no "
                "DoRA scale (export the model with a DoRA adapter)"
            )
        if site.lora_bias is not None and not group.bias:
            raise UnsupportedError(
                f"{adapter.name}: module '{site.module}' has lora_bias; its slot in {where} has "
                "no bias slot"
            )


def pack_params(
    groups: Sequence[SlotGroup], adapter: Adapter | None
) -> dict[str, tuple[torch.Tensor, int]]:
    """Every slot's value for the compiled ``adapter`` (None: empty slots), with its ONNX
    element type."""
    sites = {s.module: s for s in adapter.sites} if adapter is not None else {}
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for group in groups:
        for name, value in group_params(group, sites).items():
            out[name] = (value, group.dtype)
    return out


# -- graph rewriting --------------------------------------------------------------------------


def _slot(
    graph: ir.Graph, name: str, dims: list[int | str], dtype: int, value: torch.Tensor
) -> ir.Value:
    shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in dims])
    v = ir.Value(name=name, shape=shape, type=ir.TensorType(ir.DataType(dtype)))
    v.const_value = torch_to_tensor(value, ir.DataType(dtype), name=name)
    graph.inputs.append(v)
    graph.register_initializer(v)
    return v


def _slot_dims(group: SlotGroup) -> dict[str, list[int | str]]:
    r = group.rank_dim
    dims: dict[str, list[int | str]]
    if group.op == "Conv":
        dims = {
            group.A: [r, group.fan_in, *group.kernel],
            group.B: [group.fan_out, r, *[1] * len(group.kernel)],
        }
    elif group.experts:
        E = group.experts
        dims = {group.A: [E, group.fan_in, r], group.B: [E, r, group.fan_out]}
    else:
        dims = {group.A: [group.fan_in, r], group.B: [r, group.fan_out]}
    if group.scale:
        dims[group.scale] = list(group.channel_shape)
    if group.bias:
        dims[group.bias] = [group.fan_out]
    return dims


def insert_slots(
    index: GraphIndex,
    table: BindingTable,
    groups: Sequence[SlotGroup],
    defaults: Mapping[str, tuple[torch.Tensor, int]],
) -> None:
    """Add the slots and the branches to the graph, and record the manifest."""
    graph = index.graph
    taken = _graph_names(graph)
    uses_of: dict[str, list[WeightUse]] = {}
    for b in table.sites.values():
        uses_of.setdefault(b.fused or b.module, b.uses)
    for group in groups:
        slots = {
            name: _slot(graph, name, dims, group.dtype, defaults[name][0])
            for name, dims in _slot_dims(group).items()
        }
        for use in uses_of[group.key]:
            if use.expert is not None:  # after the MatMul that multiplies the gathered experts
                expert = (use.expert, use.transposed)
                _branch(graph, taken, use.expert.matmul, group, slots, expert=expert)
            elif use.quant is not None:  # float input and output around the quantized node(s)
                _branch(graph, taken, use.quant.output_node, group, slots, use.quant.activation)
            else:
                _branch(graph, taken, use.node, group, slots)
    index.model.metadata_props[MANIFEST_KEY] = json.dumps(
        {"version": MANIFEST_VERSION, "groups": [g.to_json() for g in groups]}, sort_keys=True
    )


def _const(
    graph: ir.Graph, taken: set[str], name: str, value: torch.Tensor, dtype: int
) -> ir.Value:
    v = ir.Value(name=unique_name(taken, name), shape=ir.Shape(list(value.shape)))
    v.type = ir.TensorType(ir.DataType(dtype))
    v.const_value = torch_to_tensor(value, ir.DataType(dtype), name=v.name)
    graph.register_initializer(v)
    return v


def _flat_shape(graph: ir.Graph, taken: set[str], width: int) -> ir.Value:
    """The Reshape target ``[-1, width]`` that flattens an activation to 2-D for Gemm (one
    initializer per width, shared by the branches)."""
    name = f"loracc.flatten.{width}"
    known = graph.initializers.get(name)
    value = known.const_value if known is not None else None
    if known is not None and value is not None and value.numpy().tolist() == [-1, width]:
        return known
    v = ir.Value(name=unique_name(taken, name), shape=ir.Shape([2]))
    v.type = ir.TensorType(ir.DataType.INT64)
    v.const_value = ir.tensor([-1, width], dtype=ir.DataType.INT64, name=v.name)
    graph.register_initializer(v)
    return v


def _branch(
    graph: ir.Graph,
    taken: set[str],
    node: ir.Node,
    group: SlotGroup,
    slots: dict[str, ir.Value],
    x: ir.Value | None = None,
    expert: tuple[ExpertRead, bool] | None = None,
) -> None:
    """Add the branch of ``x`` (default: ``node``'s first input) to ``node``'s output; for an
    expert read, (read, whether its weight holds the logical (E, out, in) transposed)."""
    op = "MatMul" if group.op in QUANT_OPS else node.op_type
    prefix = f"/{group.key.replace('.', '/')}/lora"
    new: list[ir.Node] = []

    def emit(op_type: str, inputs: Sequence[ir.Value | None], tag: str, **attrs: Any) -> ir.Value:
        n = ir.Node(
            "",
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(attrs),
            name=unique_name(taken, f"{prefix}/{tag}"),
        )
        n.outputs[0].name = unique_name(taken, f"{prefix}/{tag}_output_0")
        new.append(n)
        return n.outputs[0]

    A, B = slots[group.A], slots[group.B]
    y = node.outputs[0]
    fused_add = expert is None and op in ("MatMul", "Gemm")
    if expert is not None:
        b = branch_factors(*expert, A, B, emit)
    elif fused_add:
        # Gemm's C input adds the base output inside the kernel: no separate Add pass over y,
        # and with empty (rank-0) slots no zero-filled x·A·B tensor either. Gemm is 2-D, so a
        # MatMul's activations are flattened to (tokens, in) and the sum shaped back as y.
        x_in = x if x is not None else node.inputs[0]
        assert x_in is not None
        y_in: ir.Value = y
        if op == "MatMul":
            x_in = emit("Reshape", [x_in, _flat_shape(graph, taken, group.fan_in)], "x/Reshape")
            y_in = emit("Reshape", [y, _flat_shape(graph, taken, group.fan_out)], "y/Reshape")
        a = emit("MatMul", [x_in, A], "A/MatMul")
        alpha = node.attributes.get("alpha")
        gemm_alpha = {"alpha": alpha.as_float()} if op == "Gemm" and alpha is not None else {}
        b = emit("Gemm", [a, B, y_in], "B/Gemm", **gemm_alpha)
        if group.bias:
            b = emit("Add", [b, slots[group.bias]], "bias/Add")
        if op == "MatMul":
            b = emit("Reshape", [b, emit("Shape", [y], "y/Shape")], "Reshape")
    elif op == "Gather":
        a = emit("Gather", [A, node.inputs[1]], "A/Gather", axis=0)
        b = emit("MatMul", [a, B], "B/MatMul")
    elif op == "Conv":
        attrs: dict[str, Any] = {}
        for k in ("strides", "pads", "auto_pad"):
            if k in node.attributes:
                attrs[k] = node.attributes[k].value
        group_attr = node.attributes.get("group")
        if group_attr is not None and group_attr.as_int() != 1:
            raise LoweringError(f"{group.key}: LoRA on a grouped convolution (group > 1)")
        a = emit("Conv", [node.inputs[0], A], "A/Conv", **attrs)
        b = emit("Conv", [a, B] + ([slots[group.bias]] if group.bias else []), "B/Conv")
    else:  # pragma: no cover - binding only yields the four ops
        raise LoweringError(f"{group.key}: no keep-lora branch for {op}")
    if group.bias and not fused_add and op != "Conv":
        b = emit("Add", [b, slots[group.bias]], "bias/Add")

    moved_bias: ir.Value | None = None
    if (
        group.scale
        and op in ("Gemm", "Conv")
        and len(node.inputs) > 2
        and node.inputs[2] is not None
    ):
        beta = node.attributes.get("beta")
        if beta is not None and beta.as_float() != 1.0:
            raise LoweringError(f"{group.key}: DoRA on a Gemm with beta != 1")
        moved_bias = node.inputs[2]
        node.resize_inputs(2)
        if op == "Conv":
            source = moved_bias.const_value if moved_bias.is_initializer() else None
            if source is None:
                raise LoweringError(f"{group.key}: DoRA on a Conv whose bias is computed")
            shape = [group.fan_out] + [1] * len(group.kernel)
            moved_bias = _const(
                graph,
                taken,
                f"{moved_bias.name}.channels",
                tensor_to_torch(source).reshape(shape),
                elem_type(source.dtype),
            )
    out = b if fused_add else emit("Add", [y, b], "Add")
    if group.scale:
        out = emit("Mul", [out, slots[group.scale]], "dora/Mul")
    if moved_bias is not None:
        out = emit("Add", [out, moved_bias], "bias_moved/Add")
    base_readers = [(n, i) for n in new for i, v in enumerate(n.inputs) if v is y]
    graph.insert_after(node, new)
    if y.is_graph_output():  # keep the graph output's name, type and named dims
        name = y.name
        y.name = unique_name(taken, f"{name}.base")
        out.name = name
        out.type, out.shape = y.type, y.shape  # callers size buffers from them (IOBinding)
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    for reader, i in base_readers:  # the branch itself still reads the base output
        reader.replace_input_with(i, y)


def manifest_base(model: ir.Model, groups: Sequence[SlotGroup], where: str) -> OnnxBase:
    """The base weights behind the slots, for passes (DoRA norms, PiSSA reconstruction), and
    the expert count of expert slots (apply-graph-layout makes their sites expert sites)."""
    entries: dict[str, BaseEntry] = {}
    experts: dict[str, tuple[int, bool, str]] = {}
    for g in groups:
        init = model.graph.initializers.get(g.weight)
        if init is None:
            raise FormatError(f"{where}: base weight '{g.weight}' of slot '{g.key}' is missing")
        if g.experts:  # no pass reads an expert weight
            shown = (g.experts, g.weight_transposed, f"slot manifest of {where}")
            experts.update(dict.fromkeys((m.module for m in g.members), shown))
            continue
        quant = next((q for n in init.consumers() if (q := scheme_of(n)) is not None), None)
        for m in g.members:
            kind = SiteKind(m.kind)
            rows = m.stop - m.start
            shape = (rows, g.fan_in, *g.kernel) if g.op != "Gather" else (g.fan_in, g.fan_out)
            block = None if (m.start, m.stop) == (0, g.fan_out) else (m.start, m.stop)
            entries[f"{m.module}.weight"] = BaseEntry(
                init, g.weight_transposed, block, kind, shape, quant
            )
    return OnnxBase(entries, where, experts=experts)
