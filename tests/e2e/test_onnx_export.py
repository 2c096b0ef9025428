"""loracc ONNX export vs PEFT, on tiny models exported by torch three ways.

Every ONNX model loracc writes is run with onnxruntime (CPU) and compared with PEFT, never with
loracc itself:

* merged exports vs PEFT's ``merge_and_unload`` forward (and, for fp32/bf16 Linear, the merged
  initializers bit for bit vs PEFT's merged state dict, mapped through the TorchScript node
  names by this file, not by loracc's binding),
* keep-lora exports (filled slots, or empty slots plus an activated adapter file) vs the
  unmerged ``PeftModel`` forward,
* empty slots without an adapter vs the base model.

Base graphs: TorchScript with constant folding (weights become ``onnx::MatMul_<n>``, node names
keep the module path), the dynamo exporter (``val_<n>`` weights, module path in node metadata),
TorchScript graphs whose weights keep their parameter names (Gemm transB=1 in the conv net,
Gemm transB=0 on GPT-2's Conv1D), a graph with fused q/k/v (rewritten here from the TorchScript
export the way onnxruntime-genai lays it out), and one whose names were all stripped (bound only
by value with ``base_weights``). Each export runs once per session.
"""

from __future__ import annotations

import ctypes
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from peft.tuners.lora.config import KasaConfig

import loracc
from loracc.errors import LoweringError, UnsupportedError
from tests.support import peft_oracle as po
from tests.support.onnx_oracle import (
    assert_close,
    export_dynamo,
    export_torchscript,
    fuse_qkv,
    run,
    session,
)

MIN_EFFECT = 1e-2

# The second llama adapter: other rank, other modules, other alpha (same seed-0 base).
SPECS = {
    "llama_r4_qv": po.CaseSpec(
        "llama", dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "o_proj"])
    ),
    "llama_dora": po.CaseSpec(
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            use_dora=True,
            target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        ),
    ),
    # DoRA on Conv2d (bias moved after the scale) and on the Gemm with bias.
    "conv_dora": po.CaseSpec(
        "conv", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["conv1", "conv3", "fc"])
    ),
    # PiSSA: trained on the residual base; the export's base is the original one.
    "llama_pissa": po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "o_proj"]),
    ),
    "llama_fp16": po.CaseSpec(
        "llama",
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        base_dtype=torch.float16,
        seed=3,
    ),
    "llama_olora": po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, init_lora_weights="olora", target_modules=["v_proj", "up_proj"]),
    ),
    # KaSA: lora_diag between the factors, the base truncated by its r smallest singular values.
    "llama_kasa": po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, kasa_config=KasaConfig(), target_modules=["q_proj", "down_proj"]),
    ),
}


# --------------------------------------------------------------------------------------------
# Exports (torch) and runs (onnxruntime), independent of loracc


def assert_effect(case: po.Case) -> None:
    effect = po.rel_err(case.peft_logits, case.base_logits)
    assert effect > MIN_EFFECT, f"{case.name}: the adapter barely changes the output ({effect:.3g})"


def initializers(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def raw_initializers(path: Path) -> dict[str, bytes]:
    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i).tobytes() for i in model.graph.initializer}


def node_weights(path: Path) -> dict[str, str]:
    """TorchScript node name -> name of the initializer feeding its weight (through Identity)."""
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Gather", "Conv"):
            continue
        name = n.input[0] if n.op_type == "Gather" else n.input[1]
        while name not in inits and name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        if name in inits:
            out[n.name] = name
    return out


def slot_inputs(path: Path) -> dict[str, list[Any]]:
    """Overridable initializers (slots) with their declared shapes, as onnxruntime sees them."""
    return {i.name: i.shape for i in session(path).get_overridable_initializers()}


# --------------------------------------------------------------------------------------------
# Session fixtures


class OnnxCases:
    """PEFT cases (conftest's factory plus SPECS) and their base exports, each built once."""

    def __init__(self, peft_cases: Any, tmp: pytest.TempPathFactory) -> None:
        self._peft = peft_cases
        self._tmp = tmp
        self._custom: dict[str, po.Case] = {}
        self._exports: dict[tuple[str, str], Path] = {}
        self._outs: dict[tuple[Any, ...], tuple[Path, Any]] = {}

    def case(self, name: str) -> po.Case:
        if name in SPECS:
            if name not in self._custom:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    root = self._tmp.mktemp(f"case_{name}")
                    self._custom[name] = po.build_case(name, root, SPECS[name])
            return self._custom[name]
        return self._peft.get(name)

    def base(self, how: str, name: str) -> Path:
        """The base graph of case ``name`` exported ``how`` (shared by cases of one base)."""
        case = self.case(name)
        key = (how, f"{case.arch.name}-{case.spec.seed}-{case.spec.base_dtype}")
        if key not in self._exports:
            folder = self._tmp.mktemp(f"onnx_{how}_{case.arch.name}")
            path = folder / "model.onnx"
            if how == "ts":
                export_torchscript(case, path, case.spec.base_dtype)
            elif how == "dyn":
                export_dynamo(case, path)
            elif how == "fused":
                fuse_qkv(self.base("ts", name), path)
            elif how == "anon":
                anonymize(self.base("ts", name), path)
            else:
                raise AssertionError(how)
            self._exports[key] = path
        return self._exports[key]

    def export(
        self, how: str, name: str, *, adapters: tuple[str, ...] | None = None, **kw: Any
    ) -> tuple[Path, Any]:
        """loracc's export of case ``name`` (or ``adapters``) into the ``how`` base graph."""
        adapters = adapters or (name,)
        key = (how, name, adapters, tuple(sorted(kw.items())))
        if key not in self._outs:
            out = self._tmp.mktemp(f"out_{how}_{name}") / "out.onnx"
            dirs = [self.case(a).adapter_dir for a in adapters]
            report = loracc.export_onnx(
                self.base(how, name), dirs if len(dirs) > 1 else dirs[0], out, **kw
            )
            self._outs[key] = (out, report)
        return self._outs[key]


@pytest.fixture(scope="session")
def oc(peft_cases: Any, tmp_path_factory: pytest.TempPathFactory) -> OnnxCases:
    return OnnxCases(peft_cases, tmp_path_factory)


# --------------------------------------------------------------------------------------------
# Graph rewrites that stand in for other exporters (written with onnx, not loracc)


def anonymize(src: Path, dst: Path) -> None:
    """Strip every name that says where a weight belongs: initializers w<i>, nodes n<i>."""
    model = onnx.load(str(src))
    graph = model.graph
    rename = {init.name: f"w{i}" for i, init in enumerate(graph.initializer)}
    for init in graph.initializer:
        init.name = rename[init.name]
    for i, node in enumerate(graph.node):
        node.name = f"n{i}"
        node.input[:] = [rename.get(v, v) for v in node.input]
        del node.metadata_props[:]
    onnx.save(model, str(dst))


# --------------------------------------------------------------------------------------------
# Merged


@pytest.mark.parametrize("how", ["ts", "dyn"])
def test_merged_llama_matches_peft_merge(oc: OnnxCases, how: str) -> None:
    case = oc.case("llama_linear")
    assert_effect(case)
    out, report = oc.export(how, "llama_linear")
    assert case.peft_merged_logits is not None
    assert_close(run(out, case), case.peft_merged_logits, f"{how} merged vs PEFT merge")
    assert_close(run(out, case), case.peft_logits, f"{how} merged vs PEFT unmerged")
    assert len(report.bindings) == len(case.sites)
    rule = {"ts": "scope", "dyn": "scope"}[how]
    assert {b["how"] for b in report.bindings} == {rule}


def test_merged_torchscript_bits_and_untouched_bytes(oc: OnnxCases) -> None:
    """Each merged weight equals PEFT's merged tensor bit for bit (transposed as the graph keeps
    it); every other initializer keeps its bytes."""
    case = oc.case("llama_linear")
    base_path = oc.base("ts", "llama_linear")
    out, _ = oc.export("ts", "llama_linear")
    assert case.merged_state is not None
    weights = node_weights(out)
    got = initializers(out)
    checked = set()
    for node, init in weights.items():
        m = re.fullmatch(r"/m/(.+)/(MatMul|Gemm)", node)
        if not m:
            continue
        key = m.group(1).replace("/", ".") + ".weight"
        if key.removesuffix(".weight") not in case.sites:
            continue
        ref = case.merged_state[key].T.contiguous().numpy()
        assert got[init].dtype == ref.dtype
        assert np.array_equal(got[init], ref), f"{key}: merged bits differ from PEFT"
        checked.add(init)
    assert len(checked) == len(case.sites)
    before = raw_initializers(base_path)
    after = raw_initializers(out)
    untouched = set(before) - checked
    assert untouched <= set(after)
    assert all(before[k] == after[k] for k in untouched)
    assert onnx.load(str(out)).ir_version <= 10


@pytest.mark.parametrize(
    "how,name", [("ts", "llama_linear"), ("dyn", "llama_linear"), ("ts", "conv2d")]
)
def test_keep_lora_default_slots_match_unmerged(oc: OnnxCases, how: str, name: str) -> None:
    case = oc.case(name)
    assert_effect(case)
    out, report = oc.export(how, name, keep_lora=True, empty_slots=False)
    assert_close(run(out, case), case.peft_logits, f"{how} keep-lora vs PEFT unmerged")
    slots = slot_inputs(out)
    assert len(slots) == 2 * len(case.sites)
    for module in case.sites:
        a, b = slots[f"{module}.lora_A.weight"], slots[f"{module}.lora_B.weight"]
        assert any(isinstance(d, str) for d in a) and any(isinstance(d, str) for d in b), (a, b)
    assert Path(report.adapter_files[0]["file"]) == out.with_name("out.onnx_adapter")
    # the adapter file holds the same values: activating it changes nothing
    assert_close(run(out, case, out.with_name("out.onnx_adapter")), case.peft_logits, "active")


def test_empty_slots_base_then_adapter(oc: OnnxCases) -> None:
    case = oc.case("llama_linear")
    out, _ = oc.export("ts", "llama_linear", keep_lora=True, empty_slots=True)
    assert_close(run(out, case), case.base_logits, "empty slots vs base")
    assert_close(run(out, case, out.with_name("out.onnx_adapter")), case.peft_logits, "activated")
    model = onnx.load(str(out))
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    a = inits["model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = inits["model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a == [32, 0] and b == [0, 32]


def test_branch_adds_the_base_output_as_gemm_c(oc: OnnxCases) -> None:
    """Each MatMul site's branch ends in a Gemm whose C input is the base output (flattened):
    the sum happens inside the kernel, with no separate Add pass over the activations."""
    case = oc.case("llama_linear")
    out, _ = oc.export("ts", "llama_linear", keep_lora=True, empty_slots=True)
    nodes = onnx.load(str(out)).graph.node
    producer = {o: n for n in nodes for o in n.output}
    for module in case.sites:
        prefix = f"/{module.replace('.', '/')}/lora/"
        branch = [n for n in nodes if n.name.startswith(prefix)]
        assert not [n.name for n in branch if n.op_type == "Add"], module
        gemm = next(n for n in branch if n.name == prefix + "B/Gemm")
        flat = producer[gemm.input[2]]
        assert flat.op_type == "Reshape", (module, flat.op_type)
        base = producer[flat.input[0]]
        assert base.op_type == "MatMul" and not base.name.startswith(prefix), (module, base.name)


def test_gemm_alpha_and_lora_bias_in_the_gemm_branch(tmp_path: Path) -> None:
    """A Gemm base with alpha != 1 and a lora_bias adapter: the branch Gemm takes the node's
    alpha (the bias is added once, outside it), against an fp64 reference."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 6)).eval()
    x = torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lin, (x,), str(tmp_path / "b.onnx"), dynamo=False, input_names=["x"])
    model = onnx.load(str(tmp_path / "b.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    del gemm.attribute[:]  # transB=1 and alpha=0.5
    gemm.attribute.extend(
        [onnx.helper.make_attribute(k, v) for k, v in (("transB", 1), ("alpha", 0.5))]
    )
    onnx.save(model, str(tmp_path / "b.onnx"))
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False, lora_bias=True
    )
    peft_model = get_peft_model(lin, config)
    peft_model.save_pretrained(str(tmp_path / "ad"))
    sd = {k.split("0.", 1)[1]: v.double() for k, v in peft_model.state_dict().items()}
    s = 8 / 4
    W = sd["base_layer.weight"] + s * sd["lora_B.default.weight"] @ sd["lora_A.default.weight"]
    ref = 0.5 * x.double() @ W.T + sd["base_layer.bias"] + s * sd["lora_B.default.bias"]
    out = tmp_path / "k.onnx"
    loracc.export_onnx(tmp_path / "b.onnx", tmp_path / "ad", out, keep_lora=True, empty_slots=False)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-5 * np.abs(ref.numpy()).max()


def test_pack_two_ranks_swap_in_one_session(oc: OnnxCases, tmp_path: Path) -> None:
    """One session, adapters of rank 8 (all projections) and rank 4 (q, v, o) switched per run."""
    big, small = oc.case("llama_linear"), oc.case("llama_r4_qv")
    assert torch.equal(big.base_logits, small.base_logits), "the two cases must share a base"
    out, _ = oc.export("ts", "llama_linear", keep_lora=True, empty_slots=True)
    files = {}
    for case in (big, small):
        files[case.name] = tmp_path / f"{case.name}.onnx_adapter"
        report = loracc.pack(out, case.adapter_dir, files[case.name])
        assert report.slots == len(big.sites)
    assert loracc.pack(out, small.adapter_dir, files[small.name], force=True).empty
    sess = session(out)
    for case in (big, small, big):
        assert_close(run(sess, case, files[case.name]), case.peft_logits, f"{case.name} active")
    assert_close(run(sess, big), big.base_logits, "no adapter")


def test_pack_refuses_module_without_slot(oc: OnnxCases, tmp_path: Path) -> None:
    out, _ = oc.export("ts", "llama_r4_qv", keep_lora=True, empty_slots=True)
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        loracc.pack(out, oc.case("llama_linear").adapter_dir, tmp_path / "x.onnx_adapter")
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_several_adapters_one_model(oc: OnnxCases) -> None:
    """--keep-lora with two adapters: slots are the union, one file each, defaults = first."""
    big, small = oc.case("llama_linear"), oc.case("llama_r4_qv")
    out, report = oc.export(
        "ts",
        "llama_r4_qv",
        adapters=("llama_r4_qv", "llama_linear"),
        keep_lora=True,
        empty_slots=False,
    )
    assert len(report.slots) == len(big.sites)
    files = [Path(f["file"]) for f in report.adapter_files]
    assert len(files) == 2 and all(f.exists() for f in files)
    assert_close(run(out, small), small.peft_logits, "defaults = first adapter")
    sess = session(out)
    assert_close(run(sess, small, files[0]), small.peft_logits, "first file")
    assert_close(run(sess, big, files[1]), big.peft_logits, "second file")


# --------------------------------------------------------------------------------------------
# Layer types


def test_embedding_gather(oc: OnnxCases) -> None:
    case = oc.case("llama_embed")
    assert_effect(case)
    merged, report = oc.export("ts", "llama_embed")
    emb = next(b for b in report.bindings if b["module"] == "model.embed_tokens")
    assert emb["op"] == "Gather" and not emb["transposed"]
    assert case.peft_merged_logits is not None
    assert_close(run(merged, case), case.peft_merged_logits, "merged vs PEFT merge")
    kept, _ = oc.export("ts", "llama_embed", keep_lora=True, empty_slots=False)
    assert_close(run(kept, case), case.peft_logits, "keep-lora vs PEFT")
    empty, _ = oc.export("ts", "llama_embed", keep_lora=True, empty_slots=True)
    assert_close(run(empty, case), case.base_logits, "empty vs base")
    assert_close(run(empty, case, empty.with_name("out.onnx_adapter")), case.peft_logits, "act.")


def test_conv_and_named_gemm(oc: OnnxCases) -> None:
    """The conv net: Conv nodes and a Gemm(transB=1) on initializers named by parameter."""
    case = oc.case("conv2d")
    assert_effect(case)
    merged, report = oc.export("ts", "conv2d")
    ops = {b["module"]: (b["op"], b["initializer"], b["transposed"]) for b in report.bindings}
    assert ops["fc"] == ("Gemm", "fc.weight", False)
    assert ops["conv1"] == ("Conv", "conv1.weight", False)
    assert case.peft_merged_logits is not None
    assert_close(run(merged, case), case.peft_merged_logits, "merged vs PEFT merge")
    empty, _ = oc.export("ts", "conv2d", keep_lora=True, empty_slots=True)
    assert_close(run(empty, case), case.base_logits, "empty vs base")
    assert_close(run(empty, case, empty.with_name("out.onnx_adapter")), case.peft_logits, "act.")


@pytest.mark.parametrize("name", ["gpt2_conv1d", "gpt2_lora_bias"])
def test_gpt2_conv1d(oc: OnnxCases, name: str) -> None:
    """GPT-2's Conv1D: Gemm(transB=0) on the parameter stored (in, out), plus lora_bias."""
    case = oc.case(name)
    assert_effect(case)
    merged, report = oc.export("ts", name)
    for b in report.bindings:
        assert b["op"] == "Gemm" and b["transposed"] and b["kind"] == "conv1d", b
    assert case.peft_merged_logits is not None
    assert_close(run(merged, case), case.peft_merged_logits, "merged vs PEFT merge")
    kept, _ = oc.export("ts", name, keep_lora=True, empty_slots=False)
    assert_close(run(kept, case), case.peft_logits, "keep-lora vs PEFT")
    if name == "gpt2_lora_bias":
        assert any(k.endswith(".lora_B.bias") for k in slot_inputs(kept))


def test_dora_scale_slot(oc: OnnxCases, tmp_path: Path) -> None:
    case = oc.case("llama_dora")
    assert_effect(case)
    merged, _ = oc.export("ts", "llama_dora")
    assert_close(run(merged, case), case.peft_logits, "merged DoRA vs PEFT unmerged")
    kept, _ = oc.export("ts", "llama_dora", keep_lora=True, empty_slots=False)
    assert_close(run(kept, case), case.peft_logits, "keep-lora DoRA vs PEFT")
    empty, _ = oc.export("ts", "llama_dora", keep_lora=True, empty_slots=True)
    slots = slot_inputs(empty)
    assert slots["model.layers.0.mlp.down_proj.dora_scale"] == [32]
    assert_close(run(empty, case), case.base_logits, "empty DoRA vs base")
    packed = tmp_path / "dora.onnx_adapter"
    loracc.pack(empty, case.adapter_dir, packed)
    assert_close(run(empty, case, packed), case.peft_logits, "packed DoRA vs PEFT")


def test_dora_conv_and_gemm_bias(oc: OnnxCases, tmp_path: Path) -> None:
    case = oc.case("conv_dora")
    assert_effect(case)
    merged, _ = oc.export("ts", "conv_dora")
    assert_close(run(merged, case), case.peft_logits, "merged DoRA conv vs PEFT unmerged")
    empty, _ = oc.export("ts", "conv_dora", keep_lora=True, empty_slots=True)
    assert slot_inputs(empty)["conv1.dora_scale"] == [8, 1, 1]
    assert_close(run(empty, case), case.base_logits, "empty DoRA conv vs base")
    assert_close(run(empty, case, empty.with_name("out.onnx_adapter")), case.peft_logits, "act.")


@pytest.mark.parametrize("name", ["llama_pissa", "llama_olora", "llama_kasa"])
def test_residual_inits_rank_2r(oc: OnnxCases, name: str) -> None:
    """PiSSA/OLoRA/KaSA adapters apply to a residual base; on the original ONNX base they become
    plain LoRA of rank 2r (reconstruct-residual reads the ONNX weights)."""
    case = oc.case(name)
    assert_effect(case)
    merged, _ = oc.export("ts", name)
    assert_close(run(merged, case), case.peft_logits, "merged vs PEFT")
    empty, _ = oc.export("ts", name, keep_lora=True, empty_slots=True)
    assert_close(run(empty, case), case.base_logits, "empty vs base")
    assert_close(run(empty, case, empty.with_name("out.onnx_adapter")), case.peft_logits, "act.")
    params = ort.AdapterFormat.read_adapter(str(empty.with_name("out.onnx_adapter")))
    ranks = {v.shape()[1] for k, v in params.get_parameters().items() if "lora_A" in k}
    assert ranks == {8}


@pytest.mark.parametrize("name", ["gpt2_wte_tied", "gpt2_lmhead_tied"])
def test_lora_on_tied_gpt2_embedding(oc: OnnxCases, name: str) -> None:
    """LoRA on one side of GPT-2's tied wte/lm_head changes only that side (PEFT's forward;
    PEFT's own merge gets this wrong, so the reference is the unmerged forward)."""
    case = oc.case(name)
    assert_effect(case)
    merged, _ = oc.export("ts", name)
    assert_close(run(merged, case), case.peft_logits, "merged vs PEFT unmerged")
    kept, _ = oc.export("ts", name, keep_lora=True, empty_slots=False)
    assert_close(run(kept, case), case.peft_logits, "keep-lora vs PEFT unmerged")


# --------------------------------------------------------------------------------------------
# bf16


def upcast_bf16(src: Path, dst: Path) -> None:
    """The same graph computing in fp32 (onnxruntime's CPU provider has no bf16 MatMul)."""
    model = onnx.load(str(src))
    graph = model.graph
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    for i, init in enumerate(graph.initializer):
        if init.data_type == bf16:
            array = numpy_helper.to_array(init).astype(np.float32)
            graph.initializer[i].CopyFrom(numpy_helper.from_array(array, init.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = f32
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == bf16:
                attr.i = f32
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == bf16:
                attr.t.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32))
                )
    onnx.save(model, str(dst))


def test_fp16(oc: OnnxCases) -> None:
    """An fp16 graph keeps fp16 slots; onnxruntime's CPU provider runs it (fp16 tolerance)."""
    case = oc.case("llama_fp16")
    assert_effect(case)
    merged, _ = oc.export("ts", "llama_fp16")
    assert_close(run(merged, case), case.peft_logits, "fp16 merged vs PEFT", tol=5e-3)
    empty, _ = oc.export("ts", "llama_fp16", keep_lora=True, empty_slots=True)
    types = {i.type for i in session(empty).get_overridable_initializers()}
    assert types == {"tensor(float16)"}
    assert_close(run(empty, case), case.base_logits, "fp16 empty vs base", tol=2e-3)
    got = run(empty, case, empty.with_name("out.onnx_adapter"))
    assert_close(got, case.peft_logits, "fp16 activated vs PEFT", tol=5e-3)


def test_bf16(oc: OnnxCases, tmp_path: Path) -> None:
    case = oc.case("llama_bf16")
    assert_effect(case)
    merged, _ = oc.export("ts", "llama_bf16")
    assert case.merged_state is not None
    got = initializers(merged)
    n = 0
    for node, init in node_weights(merged).items():
        m = re.fullmatch(r"/m/(.+)/MatMul", node)
        if not m or m.group(1).replace("/", ".") not in case.sites:
            continue
        ref = case.merged_state[m.group(1).replace("/", ".") + ".weight"].T.contiguous()
        bits = ref.view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(got[init].view(np.uint16), bits), f"{init}: bf16 bits differ"
        n += 1
    assert n == len(case.sites)
    kept, _report = oc.export("ts", "llama_bf16", keep_lora=True, empty_slots=False)
    # onnxruntime's CPU provider cannot open a bf16 graph: read the slot types from the file
    graph = onnx.load(str(kept)).graph
    inits = {i.name for i in graph.initializer}
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input if i.name in inits}
    assert types and set(types.values()) == {onnx.TensorProto.BFLOAT16}
    # the adapter file: PEFT's factors, transposed, scale folded into B, rounded once to bf16
    params = ort.AdapterFormat.read_adapter(
        str(kept.with_name("out.onnx_adapter"))
    ).get_parameters()
    module = "model.layers.0.self_attn.q_proj"
    A = po.adapter_factor(case, module, "lora_A").float()
    B = po.adapter_factor(case, module, "lora_B").float() * case.sites[module]["scale"]
    for name, ref in ((f"{module}.lora_A.weight", A.T), (f"{module}.lora_B.weight", B.T)):
        want = ref.contiguous().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        value = params[name]
        assert value.shape() == list(want.shape) and value.element_type() == 16
        raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
        assert np.array_equal(np.frombuffer(raw, np.uint16).reshape(want.shape), want), name
    upcast = tmp_path / "fp32.onnx"
    upcast_bf16(kept, upcast)
    assert_close(run(upcast, case), case.peft_logits, "bf16 keep-lora (fp32 compute)", tol=3e-2)


# --------------------------------------------------------------------------------------------
# Fused q/k/v, whole-tensor edits, value binding


def test_fused_qkv(oc: OnnxCases, tmp_path: Path) -> None:
    case = oc.case("llama_linear")
    merged, report = oc.export("fused", "llama_linear")
    fused = [b for b in report.bindings if b["fused"]]
    assert len(fused) == 6 and all(b["how"] == "fused" for b in fused)
    q = next(b for b in fused if b["module"] == "model.layers.0.self_attn.q_proj")
    assert q["block"] == [0, 32]
    v = next(b for b in fused if b["module"] == "model.layers.0.self_attn.v_proj")
    assert v["block"] == [48, 64]
    assert case.peft_merged_logits is not None
    assert_close(run(merged, case), case.peft_merged_logits, "fused merged vs PEFT merge")
    empty, report = oc.export("fused", "llama_linear", keep_lora=True, empty_slots=True)
    slots = slot_inputs(empty)
    assert "m.model.layers.0.attn.qkv_proj.lora_A.weight" in slots
    assert not any("q_proj.lora_A" in s for s in slots)
    assert_close(run(empty, case), case.base_logits, "fused empty vs base")
    assert_close(run(empty, case, empty.with_name("out.onnx_adapter")), case.peft_logits, "act.")
    small = oc.case("llama_r4_qv")
    packed = tmp_path / "qv.onnx_adapter"
    loracc.pack(empty, small.adapter_dir, packed)
    assert_close(run(empty, small, packed), small.peft_logits, "fused + packed q/v/o adapter")


@pytest.mark.parametrize(
    "name", ["llama_mts_lm_head", "llama_tt_list", "gpt2_tt_tied", "gpt2_bias_all"]
)
def test_whole_tensor_edits(oc: OnnxCases, name: str) -> None:
    """modules_to_save, trainable tokens (tied GPT-2 too) and saved biases: merged, and baked
    into the keep-lora base (reported)."""
    case = oc.case(name)
    assert_effect(case)
    merged, _ = oc.export("ts", name)
    assert_close(run(merged, case), case.peft_logits, "merged vs PEFT")
    kept, report = oc.export("ts", name, keep_lora=True, empty_slots=False)
    assert report.baked and any("baked" in n for n in report.notes)
    assert_close(run(kept, case), case.peft_logits, "keep-lora vs PEFT")


def test_bind_by_value_with_base_weights(oc: OnnxCases, tmp_path: Path) -> None:
    case = oc.case("llama_linear")
    anon = oc.base("anon", "llama_linear")
    with pytest.raises(LoweringError, match=r"model\.layers\.\d\.\w+\.\w+_proj: cannot bind"):
        loracc.export_onnx(anon, case.adapter_dir, tmp_path / "x.onnx")
    out = tmp_path / "fp.onnx"
    report = loracc.export_onnx(anon, case.adapter_dir, out, base_weights=case.base_dir)
    assert {b["how"] for b in report.bindings} == {"fingerprint"}
    assert case.peft_merged_logits is not None
    assert_close(run(out, case), case.peft_merged_logits, "fingerprint-bound merge")


# --------------------------------------------------------------------------------------------
# Refusals and the command line


@pytest.mark.parametrize(
    "name,error,pattern",
    [
        ("llama_layer_replication", UnsupportedError, "layer_replication"),
        ("gpt2_conv1d", LoweringError, r"transformer\.h\.\d\.\w+\.c_\w+: cannot bind"),
        ("llama_alora", UnsupportedError, "alora|invocation"),
    ],
)
def test_refusals(oc: OnnxCases, tmp_path: Path, name: str, error: type, pattern: str) -> None:
    base = oc.base("ts", "llama_linear")
    with pytest.raises(error, match=re.compile(pattern, re.IGNORECASE)):
        loracc.export_onnx(base, oc.case(name).adapter_dir, tmp_path / "x.onnx", keep_lora=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_pack_and_errors(oc: OnnxCases, tmp_path: Path) -> None:
    from loracc.cli import main

    case, small = oc.case("llama_linear"), oc.case("llama_r4_qv")
    base = oc.base("ts", "llama_linear")
    runner = CliRunner()
    out = tmp_path / "slotted.onnx"
    args = ["export", "--onnx", "--keep-lora", "--empty-slots", "--base", str(base)]
    result = runner.invoke(main, [*args, "--adapter", str(case.adapter_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and out.with_name("slotted.onnx_adapter").exists()
    packed = tmp_path / "small.onnx_adapter"
    cmd = ["pack", "--model", str(out), "--adapter", str(small.adapter_dir), "-o", str(packed)]
    result = runner.invoke(main, [*cmd, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["output"] == str(packed)
    assert_close(run(out, small, packed), small.peft_logits, "CLI-packed adapter")
    dry = runner.invoke(main, ["export", "--onnx", "--base", str(base), "--adapter",
                               str(case.adapter_dir), "--dry-run", "-v"])  # fmt: skip
    assert dry.exit_code == 0 and "q_proj" in dry.output and "onnx::MatMul" in dry.output
    refused = runner.invoke(
        main, ["pack", "--model", str(out), "--adapter", str(oc.case("llama_embed").adapter_dir),
               "-o", str(tmp_path / "e.onnx_adapter")],
    )  # fmt: skip
    assert refused.exit_code == 2 and "model.embed_tokens" in refused.output
    again = runner.invoke(main, [*args, "--adapter", str(case.adapter_dir), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_inspect_binding_lists_every_site(oc: OnnxCases) -> None:
    from loracc.api.onnx import bind_onnx

    case = oc.case("llama_linear")
    rows = bind_onnx(oc.base("dyn", "llama_linear"), case.adapter_dir)
    assert {r["module"] for r in rows} == set(case.sites)
    for r in rows:
        assert r["op"] == "MatMul" and r["transposed"] and r["initializer"].startswith("val_")
        assert r["nodes"] and r["how"] == "scope"


def test_cli_inspect_onnx_base_shows_the_binding(oc: OnnxCases) -> None:
    """``inspect --base BASE.onnx``: each site's MatMul node and weight, as read from the graph."""
    from loracc.cli import main

    case = oc.case("llama_linear")
    base = oc.base("ts", "llama_linear")
    # TorchScript names a Linear's MatMul "/m/<module path, '.' -> '/'>/MatMul" (``m``: the
    # export wrapper's attribute holding the model)
    expected = {}
    for node, init in node_weights(base).items():
        scope, _, op = node.rpartition("/")
        if op == "MatMul":
            expected[scope.strip("/").replace("/", ".").removeprefix("m.")] = (node, init)
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(case.adapter_dir), "--base", str(base), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rows = {b["module"]: b for b in data["bindings"]}
    assert set(rows) == set(case.sites) == {s["module"] for s in data["sites"]}
    for module, b in rows.items():
        node, init = expected[module]
        assert (b["op"], b["nodes"], b["initializer"]) == ("MatMul", [node], init), module
        assert b["transposed"], module  # stored (in, out): the HF weight transposed
    text = runner.invoke(main, ["inspect", str(case.adapter_dir), "--base", str(base)])
    assert text.exit_code == 0, text.output
    table = text.output.split(f"ONNX binding ({base}):\n", 1)[1].splitlines()
    for module, b in rows.items():
        line = next(x for x in table if x.startswith(module + " "))
        assert b["nodes"][0] in line and b["initializer"] in line and " T " in line, line
    # what export would refuse is listed, not raised
    replicated = oc.case("llama_layer_replication").adapter_dir
    result = runner.invoke(main, ["inspect", str(replicated), "--base", str(base), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["bindings"] == [] and "layer_replication" in data["refusals"][0]
