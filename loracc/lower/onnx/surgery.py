"""Graph surgery before a lowering edits initializers.

:func:`lift_weight_constants` turns ``Constant`` nodes feeding a weight operand into initializers
(so the index sees them); :func:`privatize` splits an initializer that other nodes also read
(tied weights, deduplicated constants) before the nodes of one site change it.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import count

import onnx_ir as ir

from loracc.io.onnx_model import tensor_dims
from loracc.lower.onnx.index import COMPUTE_OPS, PASS_OPS, GraphIndex

__all__ = ["lift_weight_constants", "privatize", "unique_name"]


def lift_weight_constants(graph: ir.Graph) -> None:
    """Turn ``Constant`` nodes that feed a compute node's weight operand into initializers."""
    taken = set(graph.initializers) | {v.name for node in graph for v in node.outputs if v.name}
    for node in list(graph):
        operand = COMPUTE_OPS.get(node.op_type)
        if operand is None or len(node.inputs) <= operand:
            continue
        value = node.inputs[operand]
        if value is None:
            continue
        producer = value.producer()
        if producer is None or producer.op_type != "Constant" or producer.domain not in ("",):
            continue
        attr = producer.attributes.get("value")
        if attr is None:
            continue
        tensor = attr.as_tensor()
        name = value.name or unique_name(taken, f"{node.name or node.op_type}.weight")
        lifted = ir.Value(
            name=unique_name(taken, name + ".lifted"), shape=ir.Shape(tensor_dims(tensor.shape))
        )
        lifted.type = ir.TensorType(tensor.dtype)
        lifted.const_value = tensor
        graph.register_initializer(lifted)
        value.replace_all_uses_with(lifted, replace_graph_outputs=True)
        graph.remove(producer, safe=True)


def unique_name(taken: set[str], name: str) -> str:
    """``name``, or ``name.1``, ``name.2``, ... : the first not in ``taken`` (added to it)."""
    if name not in taken:
        taken.add(name)
        return name
    for i in count(1):
        candidate = f"{name}.{i}"
        if candidate not in taken:
            taken.add(candidate)
            return candidate
    raise AssertionError


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
        if producer is None or producer.op_type not in PASS_OPS or not producer.inputs:
            return None
        chain.insert(0, producer)
        value = producer.inputs[0]  # type: ignore[assignment]
        if value is None:
            return None
    return chain
