"""The binding rules of loracc.lower.onnx.bind, one by one, on hand-built graphs.

Each graph is a few nodes written with onnx.helper, named the way one exporter names them
(dynamo metadata, TorchScript node paths, ModelBuilder, parameter names, nothing at all), so each
test exercises exactly one rule and checks what it found: the nodes, the initializer, whether it
is stored transposed to the site's (out, in) reference orientation, and the rule's name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from loracc.errors import LoweringError
from loracc.ir import Adapter, Replacement, Site, SiteKind
from loracc.lower.onnx.bind import Binding, bind_adapter
from loracc.lower.onnx.index import GraphIndex
from loracc.lower.onnx.surgery import lift_weight_constants, privatize
from loracc.lower.onnx.weights import OnnxBase
from loracc.passes import PassContext
from loracc.passes.apply_graph_layout import ApplyGraphLayout
from loracc.passes.drop_noop_replacements import DropNoopReplacements
from loracc.pipeline import onnx_pipeline, run_pipeline

_FLOAT = TensorProto.FLOAT


def _weight(shape: Sequence[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _model(
    nodes: list, initializers: dict[str, np.ndarray], inputs: dict[str, Sequence]
) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, _FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", _FLOAT, None)],
        [numpy_helper.from_array(v, n) for n, v in initializers.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(proto)
    lift_weight_constants(model.graph)
    return model


def _site(
    module: str,
    fan_in: int,
    fan_out: int,
    kind: SiteKind = SiteKind.LINEAR,
    kernel: tuple[int, ...] = (),
    **kw,
) -> Site:
    """A rank-2 site whose factors give the weight (fan_out, fan_in, *kernel); an embedding's
    (num, dim) is (fan_in, fan_out)."""
    A, B = torch.ones(2, fan_in, *kernel), torch.ones(fan_out, 2, *kernel)
    return Site(module, f"{module}.weight", kind, A, B, 2.0, 1.0, **kw)


def _found(b: Binding) -> tuple[str, str, str | None, bool]:
    """What a binding found: the rule, the op, the initializer, stored transposed or not."""
    use = b.uses[0]
    return b.how, use.op, use.init.name, use.transposed


def _bind(model: ir.Model, *sites: Site, base: object = None, **kw):
    adapter = Adapter("a", sites, **kw)
    return bind_adapter(GraphIndex(model), [adapter], base=base), adapter  # type: ignore[arg-type]


def _scoped(node, *scopes: str):
    entry = node.metadata_props.add()
    entry.key = "pkg.torch.onnx.name_scopes"
    entry.value = repr(["", *scopes, "linear"])
    return node


def test_rule_1_node_scope_from_dynamo_metadata():
    """A folded constant ``val_0`` (in, out) whose MatMul carries name_scopes binds by scope."""
    node = helper.make_node("MatMul", ["x", "val_0"], ["y"], name="node_linear")
    _scoped(node, "model", "model.layers.0", "model.layers.0.q_proj")
    model = _model([node], {"val_0": _weight((4, 6), 0)}, {"x": [1, 4]})
    table, _ = _bind(model, _site("model.layers.0.q_proj", 4, 6))
    b = table.sites["model.layers.0.q_proj"]
    assert _found(b) == ("scope", "MatMul", "val_0", True)
    assert [u.node.name for u in b.uses] == ["node_linear"] and (b.block, b.fused) == (None, None)


def test_rule_1_node_scope_from_torchscript_names_on_conv_and_gather():
    """TorchScript paths (``/model/conv/Conv``) bind a Conv (out, in, k) and a Gather table."""
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h"], name="/model/embed_tokens/Gather"),
        helper.make_node("Conv", ["img", "onnx::Conv_1"], ["y"], name="/model/conv/Conv"),
    ]
    inits = {"emb": _weight((10, 4), 1), "onnx::Conv_1": _weight((6, 3, 1, 1), 2)}
    model = _model(nodes, inits, {"ids": [1], "img": [1, 3, 2, 2]})
    embed = _site("model.embed_tokens", 10, 4, SiteKind.EMBEDDING)
    conv = _site("model.conv", 3, 6, SiteKind.CONV, kernel=(1, 1))
    table, _ = _bind(model, embed, conv)
    e, c = table.sites["model.embed_tokens"], table.sites["model.conv"]
    assert _found(e) == ("scope", "Gather", "emb", False)
    assert _found(c) == ("scope", "Conv", "onnx::Conv_1", False)


def test_rule_2_parameter_name_on_gemm_and_transposed_matmul():
    """No node names: ``<module>.weight`` binds a Gemm(transB=1) as stored (out, in), and a
    MatMul reading it through a Transpose as not transposed either (the Transpose flips it)."""
    nodes = [
        helper.make_node("Gemm", ["x", "m.a.weight"], ["h"], transB=1),
        helper.make_node("Transpose", ["m.b.weight"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "wt"], ["y"]),
    ]
    inits = {"m.a.weight": _weight((6, 4), 3), "m.b.weight": _weight((5, 6), 4)}
    model = _model(nodes, inits, {"x": [1, 4]})
    table, _ = _bind(model, _site("m.a", 4, 6), _site("m.b", 6, 5))
    a, b = table.sites["m.a"], table.sites["m.b"]
    assert _found(a) == ("name", "Gemm", "m.a.weight", False)
    assert _found(b) == ("name", "MatMul", "m.b.weight", False)
    assert [p.op_type for p in b.uses[0].path] == ["Transpose"]


def test_rule_2_conv1d_parameter_is_shown_to_apply_graph_layout():
    """GPT-2's Conv1D: a named (in, out) parameter fed to MatMul with no Transpose binds by
    name as transposed, the graph shows CONV1D, and apply-graph-layout marks a guessed LINEAR
    site so (but not one the architecture table decided)."""
    node = helper.make_node("MatMul", ["x", "h.0.attn.c_attn.weight"], ["y"])
    model = _model([node], {"h.0.attn.c_attn.weight": _weight((4, 12), 5)}, {"x": [1, 4]})
    guessed = _site("h.0.attn.c_attn", 4, 12, layout_source="fan_in_fan_out")
    table, adapter = _bind(model, guessed)
    b = table.sites["h.0.attn.c_attn"]
    assert (b.how, b.uses[0].transposed, b.uses[0].reads_conv1d) == ("name", True, True)
    kind, why = b.graph_layout()  # type: ignore[misc]
    assert kind is SiteKind.CONV1D and "h.0.attn.c_attn.weight" in why
    base = OnnxBase.from_table(table, [adapter])
    result = ApplyGraphLayout()(adapter, PassContext(base=base))
    assert result.changed == ("h.0.attn.c_attn",)
    assert result.adapter.sites[0].kind is SiteKind.CONV1D
    # The base reads the weight as HF stores a Conv1D: (in, out), exactly the initializer.
    assert torch.equal(base.read("h.0.attn.c_attn.weight"), torch.from_numpy(_weight((4, 12), 5)))
    decided = _site("h.0.attn.c_attn", 4, 12, layout_source="architecture llama")
    table, adapter = _bind(model, decided)
    result = ApplyGraphLayout()(adapter, PassContext(base=OnnxBase.from_table(table, [adapter])))
    assert not result.changed and result.adapter.sites[0].kind is SiteKind.LINEAR


def test_rule_3_alias_binds_self_attn_to_modelbuilder_attn():
    """onnxruntime-genai writes ``attn`` where transformers has ``self_attn``."""
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/attn/q_proj/MatMul")
    model = _model([node], {"w": _weight((4, 6), 6)}, {"x": [1, 4]})
    table, _ = _bind(model, _site("model.layers.0.self_attn.q_proj", 4, 6))
    b = table.sites["model.layers.0.self_attn.q_proj"]
    assert _found(b) == ("scope+alias", "MatMul", "w", True)


class _Base:
    """Base weights as the binder reads them: ``in``, ``read`` and ``shape`` by HF key."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def read(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def shape(self, key: str) -> tuple[int, ...] | None:
        t = self.tensors.get(key)
        return None if t is None else tuple(t.shape)


def test_rule_4_fingerprint_finds_an_anonymous_weight_by_value():
    """Two anonymous MatMuls of the same shape: only the base tensor's values tell them apart,
    and without base weights the site is refused with the hint to pass them."""
    w1, w2 = _weight((4, 4), 7), _weight((4, 4), 8)
    nodes = [
        helper.make_node("MatMul", ["x", "val_1"], ["h"]),
        helper.make_node("MatMul", ["h", "val_2"], ["y"]),
    ]
    model = _model(nodes, {"val_1": w1, "val_2": w2}, {"x": [1, 4]})
    stored = torch.from_numpy(w2).T.contiguous()  # HF stores (out, in); the graph (in, out)
    table, _ = _bind(model, _site("m.o_proj", 4, 4), base=_Base({"m.o_proj.weight": stored}))
    b = table.sites["m.o_proj"]
    assert _found(b) == ("fingerprint", "MatMul", "val_2", True)
    with pytest.raises(LoweringError, match=r"m\.o_proj: cannot bind.*--base-weights"):
        _bind(model, _site("m.o_proj", 4, 4))


def test_rule_5_fused_qkv_gives_each_projection_its_rows():
    """q/k/v onto one ``qkv_proj`` (out 4+2+2): each site owns its block of output rows, in
    order; v's size is the rest when its sibling k is in the adapter."""
    node = helper.make_node(
        "MatMul", ["x", "w"], ["y"], name="/model/layers.0/attn/qkv_proj/MatMul"
    )
    model = _model([node], {"w": _weight((4, 8), 9)}, {"x": [1, 4]})
    parent = "model.layers.0.self_attn"
    sites = (_site(f"{parent}.q_proj", 4, 4), _site(f"{parent}.k_proj", 4, 2))
    table, _ = _bind(model, *sites)
    q, k = table.sites[f"{parent}.q_proj"], table.sites[f"{parent}.k_proj"]
    assert (q.how, q.block, k.block) == ("fused", (0, 4), (4, 6))
    assert q.fused == k.fused == "model.layers.0.attn.qkv_proj"
    assert q.uses[0].node is k.uses[0].node and q.uses[0].transposed


def test_a_bound_weight_of_the_wrong_shape_is_refused():
    node = helper.make_node("MatMul", ["x", "m.q.weight"], ["y"])
    model = _model([node], {"m.q.weight": _weight((4, 6), 10)}, {"x": [1, 4]})
    with pytest.raises(LoweringError, match=r"m\.q: bound to .* is \[4, 6\].*\[5, 4\]"):
        _bind(model, _site("m.q", 4, 5))


def test_constant_weights_are_lifted_and_shared_initializers_privatized():
    """A Constant node feeding a weight becomes an initializer; privatize gives one reader its
    own copy (through its Transpose) and leaves the other reading the original."""
    w = _weight((4, 4), 11)
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(w, "c")),
        helper.make_node("MatMul", ["x", "c"], ["h"], name="/m/a/MatMul"),
        helper.make_node("Transpose", ["c"], ["ct"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "ct"], ["y"], name="/m/b/MatMul"),
    ]
    model = _model(nodes, {}, {"x": [1, 4]})
    assert "Constant" not in [n.op_type for n in model.graph]
    index = GraphIndex(model)
    init = index.uses[0].init
    assert index.uses[1].init is init and init.name in model.graph.initializers
    b_node = index.uses[1].node
    copy = privatize(index, init, {b_node}, "b")
    assert copy is not init and index.consumers(init) == {index.uses[0].node}
    assert index.consumers(copy) == {b_node}
    assert privatize(index, init, {index.uses[0].node}, "a") is init


def test_drop_noop_replacements_drops_only_equal_tensors():
    """A replaced embedding equal to the graph's table is dropped with a note; a changed one
    stays; without an ONNX base the pass skips."""
    table_w = _weight((10, 4), 12)
    node = helper.make_node("Gather", ["m.embed.weight", "ids"], ["y"])
    model = _model([node], {"m.embed.weight": table_w}, {"ids": [1]})
    same = Replacement("m.embed.weight", torch.from_numpy(table_w.copy()), "modules_to_save")
    changed = Replacement("m.embed.weight", torch.from_numpy(table_w + 1), "modules_to_save")
    for rep, dropped in ((same, True), (changed, False)):
        table, adapter = _bind(model, replacements=(rep,))
        assert table.tensors["m.embed.weight"].places[0].init.name == "m.embed.weight"
        base = OnnxBase.from_table(table, [adapter])
        result = DropNoopReplacements()(adapter, PassContext(base=base))
        assert (result.adapter.replacements == ()) is dropped
        assert any("equal to the model's tensor" in n for n in result.adapter.notes) is dropped
    skipped = DropNoopReplacements()(adapter, PassContext())
    assert skipped.adapter is adapter and skipped.skipped[0].reason.startswith("the base is not")


def test_the_onnx_pipeline_runs_the_graph_passes_first_and_last_verified():
    """The ONNX pipeline names both graph passes, and a GPT-2-style graph's correction shows in
    its steps (with the IR verified around every pass)."""
    node = helper.make_node("MatMul", ["x", "h.0.mlp.c_fc.weight"], ["y"])
    model = _model([node], {"h.0.mlp.c_fc.weight": _weight((4, 8), 13)}, {"x": [1, 4]})
    table, adapter = _bind(model, _site("h.0.mlp.c_fc", 4, 8, layout_source="fan_in_fan_out"))
    passes = onnx_pipeline()
    assert passes[0].name == "apply-graph-layout"
    assert passes[-1].name == "drop-noop-replacements"
    ctx = PassContext(base=OnnxBase.from_table(table, [adapter]))
    result = run_pipeline(adapter, passes, ctx, check=True)
    changed = {spec: step.changed for spec, step in result.steps}
    assert changed["apply-graph-layout"] == ("h.0.mlp.c_fc",)
    assert result.adapter.sites[0].kind is SiteKind.CONV1D
