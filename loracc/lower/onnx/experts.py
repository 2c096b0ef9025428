"""Fused 3-D expert parameters (``target_parameters`` on MoE experts) in exported graphs.

An expert weight ``I`` (E, d1, d2) is read per token through the routing's expert index: a
``Gather`` (axis 0) or ``GatherND`` (``batch_dims=0``, index depth 1) picks ``I[e]``, possibly
through ``Identity``/``Cast``, and a ``MatMul`` multiplies it, possibly through a ``Transpose`` of
its last two axes:

=============================  ==============================================================
exporter                       pattern (transformers' ``batched_mm`` experts)
=============================  ==============================================================
torch.onnx TorchScript         ``MatMul(Gather(I, ids), x)``: operand 0, ``W[e] @ x``
torch.onnx dynamo              ``MatMul(GatherND(I, ids[:, None]), x)``: operand 0
TorchScript, eager experts     ``MatMul(x, Transpose(Gather(I, e)))``: operand 1, ``x @ W[e]ᵀ``
``is_transposed`` (GPT-OSS)    ``MatMul(x, Gather(I, ids))``: operand 1, ``x @ W[e]``
=============================  ==============================================================

Every reader of ``I`` must be such a read; anything else between the gather and its ``MatMul``
(a reshape, a slice, a second consumer), or a gather on another axis, leaves the weight unbound
with the reason recorded, and the sites on it are refused.

The merged lowering adds PEFT's per-expert delta (``ΔP[e] = s·B3[e]@A3[e]``, transposed for
``is_transposed`` owners: :func:`loracc.kernels.site_delta`) to ``I`` (through a view of its
last two axes when the graph holds the parameter transposed). The keep-lora lowering gathers
per-expert factor slots with the same index and multiplies them with ``x`` beside the base
``MatMul``: with ``L[e] = s·B3[e]@A3[e]`` (out, in), the slots hold ``A (E, in, r)`` with
``A[e] = A3[e]ᵀ`` and ``B (E, r, out)`` with ``B[e] = (s·B3[e])ᵀ``, so ``L[e]ᵀ = A[e]@B[e]``, the
2-D slots' convention per expert. The ``MatMul`` reads ``R = L[e]`` or ``L[e]ᵀ``:

===========  ==========  ===========================
operand      R           branch
===========  ==========  ===========================
1 (x @ R)    ``L[e]ᵀ``   ``(x @ A[e]) @ B[e]``
1 (x @ R)    ``L[e]``    ``(x @ B[e]ᵀ) @ A[e]ᵀ``
0 (R @ x)    ``L[e]``    ``B[e]ᵀ @ (A[e]ᵀ @ x)``
0 (R @ x)    ``L[e]ᵀ``   ``A[e] @ (B[e] @ x)``
===========  ==========  ===========================

The transposes apply to the (E, ·, ·) slots before the gather, so the gathered factors have the
index's batch shape whatever its rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import torch

from loracc.ir import Site

__all__ = [
    "GATHERS",
    "ExpertRead",
    "branch_factors",
    "expert_slot_values",
    "trace_expert",
]

GATHERS = frozenset({"Gather", "GatherND"})
_THROUGH = frozenset({"Identity", "Cast"})


@dataclass(frozen=True, eq=False)
class ExpertRead:
    """How one gather of a 3-D expert weight reaches its ``MatMul``.

    Attributes:
        gather: the ``Gather``/``GatherND`` node that picks the experts.
        indices: its expert index input (the branch gathers its slots with it).
        matmul: the ``MatMul`` that multiplies the gathered weight.
        operand: which ``MatMul`` input the gathered weight is (0: ``W @ x``, 1: ``x @ W``).
        swapped: whether a ``Transpose`` of the last two axes sits between them.
    """

    gather: ir.Node
    indices: ir.Value
    matmul: ir.Node
    operand: int
    swapped: bool

    @property
    def in_out(self) -> bool:
        """Whether the graph reads the stored ``I[e]`` as (in, out), i.e. computes ``x @ I[e]``."""
        return (self.operand == 1) != self.swapped

    @property
    def x(self) -> ir.Value:
        """The ``MatMul``'s activation input (the operand that is not the weight)."""
        value = self.matmul.inputs[1 - self.operand]
        assert value is not None
        return value


def _initializer(value: ir.Value | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """The initializer ``value`` comes from through Identity/Cast, and those nodes in order."""
    path: list[ir.Node] = []
    while value is not None and not value.is_initializer():
        producer = value.producer()
        if producer is None or producer.op_type not in _THROUGH or producer.domain != "":
            return None
        path.insert(0, producer)
        value = producer.inputs[0]
    if value is None or value.const_value is None:
        return None
    return value, path


def _swaps_last_two(node: ir.Node, index_rank: int | None) -> bool:
    perm_attr = node.attributes.get("perm")
    if perm_attr is None:  # reverses every axis: the last two only when there are two
        return index_rank == 0
    perm = list(perm_attr.as_ints())
    n = len(perm)
    return n >= 2 and perm == [*range(n - 2), n - 1, n - 2]


def trace_expert(
    gather: ir.Node,
) -> tuple[ir.Value, tuple[ir.Node, ...], ExpertRead] | str | None:
    """The 3-D expert weight ``gather`` reads and how it reaches its ``MatMul``.

    Returns None when ``gather`` does not read a 3-D float initializer (not an expert weight),
    a reason string when it does but the pattern cannot be bound (module docstring), else
    (initializer, Identity/Cast path, read).
    """
    if gather.op_type not in GATHERS or gather.domain != "" or len(gather.inputs) < 2:
        return None
    found = _initializer(gather.inputs[0])
    if found is None:
        return None
    init, path = found
    tensor = init.const_value
    assert tensor is not None
    if len(tensor.shape) != 3 or not tensor.dtype.is_floating_point():
        return None
    indices = gather.inputs[1]
    assert indices is not None
    index_rank = len(indices.shape) if indices.shape is not None else None
    name = gather.name or gather.op_type
    if gather.op_type == "Gather":
        axis = gather.attributes.get("axis")
        if axis is not None and axis.as_int() != 0:
            return f"{name} gathers the expert weight on axis {axis.as_int()}, not 0"
    else:
        batch = gather.attributes.get("batch_dims")
        depth = indices.shape[-1] if indices.shape is not None and index_rank else None
        if (batch is not None and batch.as_int() != 0) or depth != 1:
            return f"{name} is a GatherND that does not pick whole experts (batch_dims 0, depth 1)"
        index_rank = index_rank - 1 if index_rank is not None else None
    value = gather.outputs[0]
    swapped = False
    while True:
        consumers = value.consumers()
        if len(consumers) != 1 or value.is_graph_output():
            return (
                f"{name}: the gathered expert weight has {len(consumers)} readers, not one MatMul"
            )
        node = consumers[0]
        if node.domain != "":
            return f"{name}: the gathered expert weight goes to {node.op_type}, not a MatMul"
        if node.op_type == "MatMul":
            operand = next(i for i, v in enumerate(node.inputs) if v is value)
            read = ExpertRead(gather, indices, node, operand, swapped)
            return init, tuple(path), read
        if node.op_type in _THROUGH:
            value = node.outputs[0]
            continue
        if node.op_type == "Transpose" and _swaps_last_two(node, index_rank):
            swapped = not swapped
            value = node.outputs[0]
            continue
        return f"{name}: the gathered expert weight goes through {node.op_type} before its MatMul"


# -- keep-lora --------------------------------------------------------------------------------


def expert_slot_values(
    site: Site | None, experts: int, fan_in: int, fan_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots ``A (E, in, r)`` and ``B (E, r, out)`` of ``site`` (None: rank 0), fp32.

    PEFT splits the expert axis of its factors asymmetrically (ParamWrapper):
    ``A3 = lora_A.reshape(E, r, in)`` and ``B3 = lora_B.reshape(out, r, E).permute(2, 0, 1)``.
    """
    if site is None:
        return torch.zeros(experts, fan_in, 0), torch.zeros(experts, 0, fan_out)
    r = site.rank
    a3 = site.lora_A.to(torch.float32).reshape(experts, r, fan_in)
    b3 = site.lora_B.to(torch.float32).reshape(fan_out, r, experts).permute(2, 0, 1)
    return a3.transpose(1, 2).contiguous(), (b3 * site.scale).transpose(1, 2).contiguous()


Emit = Callable[..., ir.Value]


def branch_factors(
    read: ExpertRead, logical_transposed: bool, A: ir.Value, B: ir.Value, emit: Emit
) -> ir.Value:
    """The branch ``ΔR·x`` (or ``x·ΔR``) of one expert read (module docstring's table).

    Args:
        read: the gather and its MatMul.
        logical_transposed: whether the initializer holds PEFT's (E, out, in) transposed.
        A: the (E, in, r) slot.
        B: the (E, r, out) slot.
        emit: adds one node (op type, inputs, tag, attributes) and returns its output.
    """
    r_is_lt = logical_transposed != read.swapped  # the MatMul reads R = L[e]ᵀ (in, out)
    if r_is_lt:  # (x @ A) @ B, or A @ (B @ x)
        first, second = (A, B) if read.operand == 1 else (B, A)
    else:  # (x @ Bᵀ) @ Aᵀ, or Bᵀ @ (Aᵀ @ x)
        swap = {"perm": [0, 2, 1]}
        bt = emit("Transpose", [B], "B/Transpose", **swap)
        at = emit("Transpose", [A], "A/Transpose", **swap)
        first, second = (bt, at) if read.operand == 1 else (at, bt)
    gather_attrs: dict[str, Any] = {
        k: v.value for k, v in read.gather.attributes.items() if k in ("axis", "batch_dims")
    }
    op = read.gather.op_type
    g1 = emit(op, [first, read.indices], "first/" + op, **gather_attrs)
    g2 = emit(op, [second, read.indices], "second/" + op, **gather_attrs)
    if read.operand == 1:
        return emit("MatMul", [emit("MatMul", [read.x, g1], "first/MatMul"), g2], "MatMul")
    return emit("MatMul", [g2, emit("MatMul", [g1, read.x], "first/MatMul")], "MatMul")
