"""Keep-lora and merge on quantized ONNX bases (int4/int8 ``MatMulNBits``, int8 ``MatMulInteger``).

The bases are a tiny Llama exported by TorchScript (as in test_onnx_export.py) and quantized by
onnxruntime's own tools: ``MatMulNBitsQuantizer`` (int4, block 16, asymmetric or symmetric) and
``quantize_dynamic`` (int8 weights, dynamic uint8 activations).

**Reference** (independent of loracc): the quantized base computes with dequantized weights, so
the float model whose Linear weights are replaced by those dequantized weights (dequantized here
from MatMulNBits' definition, in numpy) *is* the int4 base in float. PEFT's unmerged forward with
the adapter on that float model is then exactly "the int4 base plus PEFT's LoRA branch" through
the whole network; the int4 keep-lora export must match it to fp32 tolerance. (The int4 base's
own output minus the float base's is not a valid reference: LoRA's effect is not additive through
the network.) For int8 dynamic quantization the activations are quantized too, so the same
reference carries the base's activation-quantization error; the keep-lora error must stay at that
level while the adapter's effect is far above it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import loracc
from loracc.errors import UnsupportedError
from tests.support import onnx_oracle as te
from tests.support import peft_oracle as po
from tests.support.nbits import dequantize

pytest.importorskip("onnxruntime")

SPECS = {
    "lora": po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    ),
    # DoRA: the scale m/‖W+ΔW‖ uses the dequantized base weight, as PEFT on that base does.
    "dora": po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"]),
    ),
}
BLOCK = 16
KEEP_LORA_RTOL = 1e-4


def _nbits(path: Path, out: Path, *, symmetric: bool, bits: int = 4) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=symmetric, bits=bits)
    q = MatMulNBitsQuantizer(onnx.load(str(path)), algo_config=config)
    q.process()
    q.model.save_model_to_file(str(out))
    return out


def _qdq(path: Path, out: Path) -> Path:
    """Every MatMul weight (K, N) as ``DequantizeLinear(int8, per-column scale, axis=1)``, the
    QDQ layout of per-channel static quantization (onnxruntime's int4 QDQ needs opset 21 blocked
    DequantizeLinear, which this opset-17 TorchScript graph cannot take)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            w = onnx.numpy_helper.to_array(inits[node.input[1]])
            scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            name = node.input[1]
            model.graph.initializer.remove(inits[name])
            model.graph.initializer.extend(
                [
                    onnx.numpy_helper.from_array(q, f"{name}_q"),
                    onnx.numpy_helper.from_array(scale, f"{name}_scale"),
                ]
            )
            nodes.append(
                onnx.helper.make_node(
                    "DequantizeLinear",
                    [f"{name}_q", f"{name}_scale"],
                    [f"{name}_dq"],
                    axis=1,
                    name=node.name.replace("/MatMul", "/DequantizeLinear"),
                )
            )
            node.input[1] = f"{name}_dq"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))
    return out


def _dynamic(path: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


def _module(node_name: str) -> str:
    """``/m/model/layers.0/self_attn/q_proj/MatMul_Q4`` → ``model.layers.0.self_attn.q_proj``."""
    parts = [p for p in node_name.split("/")[1:-1] if p]
    return ".".join(parts[1:])  # drop the export wrapper's ``m``


def dequantized_weights(path: Path, *, steps: bool = False) -> dict[str, torch.Tensor]:
    """``<module>.weight`` (out, in) of every quantized node, dequantized as the ops define
    (``steps``: each MatMulNBits element's quantization step |scale| instead)."""
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    out: dict[str, torch.Tensor] = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            N, K = attrs["N"], attrs["K"]
            w = dequantize(node, inits, steps=steps).astype(np.float32)
            module = _module(node.name)
            if module.endswith(".attn.qkv_proj"):  # fused q/k/v rows: q is (hidden, hidden)
                parent = module.removesuffix(".attn.qkv_proj") + ".self_attn"
                kv = (N - K) // 2
                blocks = np.split(w, [K, K + kv])
                for proj, rows in zip(("q_proj", "k_proj", "v_proj"), blocks, strict=True):
                    out[f"{parent}.{proj}.weight"] = torch.from_numpy(rows.astype(np.float32))
                continue
            out[module + ".weight"] = torch.from_numpy(w.astype(np.float32))
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits and not steps:
            q = inits[node.input[0]].astype(np.float32)  # (K, N), one scale per column
            w = np.ascontiguousarray((q * inits[node.input[1]].astype(np.float32)).T)
            out[_module(node.name) + ".weight"] = torch.from_numpy(w)
        elif node.op_type == "MatMulInteger":
            w = inits[node.input[1]].astype(np.float32)
            zp = inits[node.input[3]].astype(np.float32) if len(node.input) > 3 else 0.0
            scale_name = node.input[1].removesuffix("_quantized") + "_scale"
            w = (w - zp) * inits[scale_name].astype(np.float32)
            out[_module(node.name) + ".weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
    return out


def reference_logits(case: po.Case, weights: dict[str, torch.Tensor], adapter: Path | None) -> Any:
    """Logits of the float model holding ``weights`` (PEFT unmerged with ``adapter``)."""
    from peft import PeftModel

    model = po.load_model(case.base_dir, case.arch)
    state = model.state_dict()
    assert set(weights) <= set(state), sorted(set(weights) - set(state))
    with torch.no_grad():
        for key, w in weights.items():
            state[key].copy_(w)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return po.model_output(model, case.inputs)


class QuantCases:
    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = tmp.mktemp("quant")
            self.case = po.build_case("llama_quant", root / "case", SPECS["lora"])
            self.float_path = te.export_torchscript(self.case, root / "model.onnx")
        self.root = root
        self._bases: dict[str, Path] = {}
        self._cases: dict[str, po.Case] = {"lora": self.case}

    def adapter(self, name: str) -> po.Case:
        """The case of adapter ``name`` (same seeded base as ``self.case``)."""
        if name not in self._cases:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._cases[name] = po.build_case(name, self.root / name, SPECS[name])
            assert po.rel_err(self._cases[name].base_logits, self.case.base_logits) == 0
        return self._cases[name]

    def base(self, how: str) -> Path:
        if how not in self._bases:
            out = self.root / f"{how}.onnx"
            if how == "int4":
                _nbits(self.float_path, out, symmetric=False)
            elif how == "int4sym":
                _nbits(self.float_path, out, symmetric=True)
            elif how == "int8nbits":
                _nbits(self.float_path, out, symmetric=False, bits=8)
            elif how == "int8qdq":
                _qdq(self.float_path, out)
            elif how == "int4fused":  # onnxruntime-genai's layout: one qkv_proj per layer
                fused = self.root / "fused.onnx"
                te.fuse_qkv(self.float_path, fused)
                _nbits(fused, out, symmetric=False)
            elif how == "int8dyn":
                _dynamic(self.float_path, out)
            else:
                raise AssertionError(how)
            self._bases[how] = out
        return self._bases[how]


@pytest.fixture(scope="module")
def qc(tmp_path_factory: pytest.TempPathFactory) -> QuantCases:
    return QuantCases(tmp_path_factory)


@pytest.mark.parametrize(
    "how,name",
    [
        ("int4", "lora"),
        ("int4sym", "lora"),
        ("int8nbits", "lora"),
        ("int4", "dora"),
        ("int4fused", "lora"),
    ],
)
def test_keep_lora_on_nbits_matches_peft_on_dequantized_base(
    qc: QuantCases, tmp_path: Path, how: str, name: str
) -> None:
    base, case = qc.base(how), qc.adapter(name)
    weights = dequantized_weights(base)
    assert len(weights) == 2 * 7 + 1  # every Linear of both layers and lm_head
    float_base = reference_logits(case, weights, None)
    te.assert_close(te.run(base, case), float_base, f"{how} base vs dequantized float")
    ref = reference_logits(case, weights, case.adapter_dir)
    assert po.rel_err(ref, float_base) > 1e-2  # the adapter matters

    out = tmp_path / "out.onnx"
    report = loracc.export_onnx(base, case.adapter_dir, out, keep_lora=True, empty_slots=False)
    assert {b["op"] for b in report.bindings} == {"MatMulNBits"}
    te.assert_close(te.run(out, case), ref, f"{how} keep-lora", KEEP_LORA_RTOL)
    count = [
        sum(n.op_type == "MatMulNBits" for n in onnx.load(str(p)).graph.node) for p in (base, out)
    ]
    assert count[0] == count[1] == (11 if how == "int4fused" else 15)  # the quantized nodes stay

    empty = tmp_path / "empty.onnx"
    loracc.export_onnx(base, case.adapter_dir, empty, keep_lora=True, empty_slots=True)
    te.assert_close(te.run(empty, case), float_base, f"{how} empty slots", KEEP_LORA_RTOL)
    adapter_file = empty.with_suffix(".onnx_adapter")
    te.assert_close(te.run(empty, case, adapter_file), ref, f"{how} file", KEEP_LORA_RTOL)
    packed = tmp_path / "packed.onnx_adapter"  # pack reads the base through the manifest
    loracc.pack(empty, case.adapter_dir, packed)
    te.assert_close(te.run(empty, case, packed), ref, f"{how} pack", KEEP_LORA_RTOL)


@pytest.mark.parametrize("how,op", [("int8dyn", "MatMulInteger"), ("int8qdq", "MatMul")])
def test_keep_lora_on_int8_weights(qc: QuantCases, tmp_path: Path, how: str, op: str) -> None:
    """int8 weights run with dynamically quantized activations: ``quantize_dynamic``'s
    MatMulInteger, and a QDQ weight (DequantizeLinear → MatMul, which onnxruntime's CPU EP fuses
    into a dynamic-quantization MatMul): the keep-lora error stays at the base's own level."""
    base = qc.base(how)
    weights = dequantized_weights(base)
    assert len(weights) == 2 * 7 + 1
    float_base = reference_logits(qc.case, weights, None)
    base_err = po.rel_err(te.run(base, qc.case), float_base)  # activation quantization
    ref = reference_logits(qc.case, weights, qc.case.adapter_dir)
    effect = po.rel_err(ref, float_base)

    out = tmp_path / "out.onnx"
    report = loracc.export_onnx(base, qc.case.adapter_dir, out, keep_lora=True, empty_slots=False)
    assert {b["op"] for b in report.bindings} == {op}
    err = po.rel_err(te.run(out, qc.case), ref)
    assert err <= 2 * base_err + KEEP_LORA_RTOL, (err, base_err)
    assert effect > 10 * err, (effect, err)
    if how == "int8qdq":  # unoptimized, DequantizeLinear → MatMul is exact float: so is the branch
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        plain = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        te.assert_close(te.run(plain, qc.case), ref, "QDQ keep-lora, unoptimized", KEEP_LORA_RTOL)
    # The branch reads the float input: with empty slots the model is the int8 base bit for bit.
    empty = tmp_path / "empty.onnx"
    loracc.export_onnx(base, qc.case.adapter_dir, empty, keep_lora=True, empty_slots=True)
    assert torch.equal(te.run(empty, qc.case), te.run(base, qc.case))


@pytest.mark.parametrize(
    "how,what", [("int8dyn", "MatMulInteger"), ("int8qdq", "DequantizeLinear")]
)
def test_merge_into_dynamic_int8_or_qdq_is_refused(
    qc: QuantCases, tmp_path: Path, how: str, what: str
) -> None:
    out = tmp_path / "out.onnx"
    with pytest.raises(UnsupportedError, match=rf"model\.layers\.0\.\S+: .*{what}"):
        loracc.export_onnx(qc.base(how), qc.case.adapter_dir, out)
    assert not out.exists()


def _nbits_nodes(path: Path) -> dict[str, Any]:
    """module → (MatMulNBits node, {input name: array}) of a quantized model."""
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        _module(n.name): (n, {name: inits[name] for name in n.input[1:] if name in inits})
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }


@pytest.mark.parametrize("how", ["int4", "int4sym", "int8nbits"])
def test_requantizing_the_float_weight_gives_onnxruntime_bytes(qc: QuantCases, how: str) -> None:
    """loracc's requantization is onnxruntime's: the float base weights, quantized by the
    scheme loracc reads off each node, equal the quantizer's tensors byte for byte; and the
    dequantized weight, requantized on the node's grid, gives the node's bytes back."""
    import onnx_ir as ir

    from loracc.lower.onnx.index import GraphIndex, read_ref

    index = GraphIndex(ir.load(str(qc.base(how))))
    state = qc.case.base_tensors
    uses = [u for u in index.uses if u.quant is not None]
    assert len(uses) == 15
    want = _nbits_nodes(qc.base(how))
    for use in uses:
        module = _module(use.node.name)
        packed, scales, zero_points = use.quant.quantize(state[f"{module}.weight"])
        _, arrays = want[module]
        got = [packed, scales] + ([zero_points] if zero_points is not None else [])
        assert len(got) == len(arrays), module
        for mine, theirs in zip(got, arrays.values(), strict=True):
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, module
            assert mine.tobytes() == theirs.tobytes(), module
        # an unchanged dequantized weight stays on the node's grid: the same bytes again
        kept = use.quant.requantize(read_ref(use), use.quant.tensors())
        kept_arrays = [a for a in kept if a is not None]
        assert [a.tobytes() for a in kept_arrays] == [a.tobytes() for a in arrays.values()]


@pytest.mark.parametrize("how", ["int4", "int4sym", "int8nbits", "int4fused"])
def test_merge_requantizes_nbits(qc: QuantCases, tmp_path: Path, how: str) -> None:
    """Merged into an int4/int8 base: each targeted weight is dequant(base) + ΔW (PEFT's
    s·B@A) requantized by the node's own scheme, every element within half a quantization step
    of the float merge (a full step when symmetric: the range [-2^(b-1), 2^(b-1)-1] is lopsided,
    so the side of the block's absolute maximum that is not mapped to -2^(b-1) clips by up to
    one step); untargeted weights (k_proj's rows of a fused qkv_proj too) stay as they were,
    nodes with no target keep their bytes; the model's output is within the requantization
    error of PEFT on the dequantized float base (the float merge)."""
    base = qc.base(how)
    out = tmp_path / "merged.onnx"
    report = loracc.export_onnx(base, qc.case.adapter_dir, out)
    assert {b["op"] for b in report.bindings} == {"MatMulNBits"}
    old_w, new_w = dequantized_weights(base), dequantized_weights(out)
    step = dequantized_weights(out, steps=True)
    targeted = {f"{m}.weight" for m in qc.case.sites}
    assert targeted and targeted <= set(new_w) and set(new_w) == set(old_w)
    for key, w in new_w.items():
        if key not in targeted:
            assert torch.equal(w, old_w[key]), key
            continue
        float_merge = old_w[key] + po.linear_delta(qc.case, key.removesuffix(".weight"))
        bound = step[key] if how == "int4sym" else step[key] / 2
        assert bool(((w - float_merge).abs() <= bound * (1 + 1e-5) + 1e-7).all()), key
    before, after = _nbits_nodes(base), _nbits_nodes(out)
    for module, (_, arrays) in after.items():
        if not any(t.startswith(module.removesuffix("attn.qkv_proj")) for t in targeted):
            old_bytes = [a.tobytes() for a in before[module][1].values()]
            assert [a.tobytes() for a in arrays.values()] == old_bytes, module

    ref = reference_logits(qc.case, old_w, qc.case.adapter_dir)  # the float merge, unmerged
    got = te.run(out, qc.case)
    requant_err = po.rel_err(got, ref)
    base_err = po.rel_err(te.run(base, qc.case), reference_logits(qc.case, old_w, None))
    quant_err = po.rel_err(te.run(base, qc.case), qc.case.base_logits)  # int vs float base
    print(f"{how}: merged-requantized vs float merge {requant_err:.3g}; base {base_err:.3g}; "
          f"int base vs float base {quant_err:.3g}")  # fmt: skip
    assert requant_err <= 2 * quant_err, (requant_err, quant_err)  # same order as quantizing
    assert po.rel_err(got, te.run(base, qc.case)) > 5 * requant_err  # the merge did something


def test_merge_refuses_g_idx(qc: QuantCases, tmp_path: Path) -> None:
    """A MatMulNBits with g_idx (GPTQ act-order) cannot be requantized: refused, naming it."""
    model = onnx.load(str(qc.base("int4")))
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "q_proj" in n.name)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    g_idx = np.arange(attrs["K"], dtype=np.int32) // attrs["block_size"]
    model.graph.initializer.append(onnx.numpy_helper.from_array(g_idx, "q_g_idx"))
    node.input.append("q_g_idx")
    src = tmp_path / "gidx.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "out.onnx"
    with pytest.raises(UnsupportedError, match="g_idx"):
        loracc.export_onnx(src, qc.case.adapter_dir, out)
    assert not out.exists()
    keep = tmp_path / "keep.onnx"  # keep-lora does not touch the weight
    loracc.export_onnx(src, qc.case.adapter_dir, keep, keep_lora=True)
    assert keep.exists()


def test_replacing_a_quantized_weight_is_refused(qc: QuantCases, tmp_path: Path) -> None:
    """LoRA on lm_head as PEFT saves it by default (the full lm_head weight too): the saved
    weight would replace an int4 one; refused naming the tensor and the node, nothing written."""
    spec = po.CaseSpec("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = po.build_case("lm_head", tmp_path / "case", spec)
    assert "base_model.model.lm_head.base_layer.weight" in case.adapter_tensors
    out = tmp_path / "out.onnx"
    for keep_lora in (False, True):
        with pytest.raises(UnsupportedError, match=r"lm_head\.weight.*MatMulNBits.*lm_head"):
            loracc.export_onnx(qc.base("int4"), case.adapter_dir, out, keep_lora=keep_lora)
        assert not out.exists()


def test_keep_lora_on_fp16_int4(tmp_path: Path) -> None:
    """An fp16 graph quantized to int4 (fp16 scales): the branch and its slots are fp16 (the
    activations' dtype); the output matches PEFT on the dequantized base in fp32 to fp16 noise,
    the same as the int4 base alone."""
    spec = po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        base_dtype=torch.float16,
        seed=3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = po.build_case("fp16_int4", tmp_path / "case", spec)
        float_path = te.export_torchscript(case, tmp_path / "model.onnx", torch.float16)
    base = _nbits(float_path, tmp_path / "int4.onnx", symmetric=False)
    weights = dequantized_weights(base)
    float_base = reference_logits(case, weights, None)
    ref = reference_logits(case, weights, case.adapter_dir)
    base_err = po.rel_err(te.run(base, case), float_base)
    assert base_err < 2e-3
    out = tmp_path / "out.onnx"
    report = loracc.export_onnx(base, case.adapter_dir, out, keep_lora=True, empty_slots=False)
    assert {s["dtype"] for s in report.slots} == {onnx.TensorProto.FLOAT16}
    te.assert_close(te.run(out, case), ref, "fp16 int4 keep-lora", max(2 * base_err, 1e-3))
    assert po.rel_err(ref, float_base) > 1e-1


@pytest.mark.parametrize("layout", ["tensor", "axis1", "blocked0"])
def test_dequantize_linear_scheme_matches_onnxruntime(tmp_path: Path, layout: str) -> None:
    """The QDQ scheme's dequantized weight (what DoRA's norm reads) equals onnxruntime's
    DequantizeLinear output, per tensor, per axis and blocked (opset 21)."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from loracc.lower.onnx.index import GraphIndex, read_ref

    rng = np.random.default_rng(0)
    K, N, bs = 40, 24, 16  # K not a multiple of the block
    q = rng.integers(-128, 127, (K, N), dtype=np.int8)
    shapes = {"tensor": (), "axis1": (N,), "blocked0": (-(-K // bs), N)}
    scale = (rng.random(shapes[layout]) * 0.1 + 0.01).astype(np.float32)
    zp = rng.integers(-5, 5, shapes[layout], dtype=np.int8)
    attrs = {"tensor": {}, "axis1": {"axis": 1}, "blocked0": {"axis": 0, "block_size": bs}}
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], **attrs[layout]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="/lin/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, N]),
        ],
        [numpy_helper.from_array(a, n) for a, n in ((q, "q"), (scale, "s"), (zp, "z"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / "dq.onnx"
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    want = sess.run(["w"], {"x": np.zeros((1, K), np.float32)})[0]
    (use,) = GraphIndex(ir.load(str(path))).uses
    assert use.quant is not None and use.scope == "lin"
    assert torch.equal(read_ref(use), torch.from_numpy(want).T)
