"""MoE experts (fused 3-D ``target_parameters``) in ONNX exports, vs the unmerged PEFT forward.

Tiny Qwen3-MoE (4 experts, top 2) with LoRA on ``mlp.experts.gate_up_proj`` (square,
(4, 32, 32)) and ``mlp.experts.down_proj`` ((4, 32, 16)), and tiny GPT-OSS, whose experts are
``is_transposed`` ((E, in, out): (4, 32, 32) and (4, 16, 32)), and tiny Mixtral with LoRA on
``q_proj`` and the router's ``gate`` besides its experts, exported by torch with
transformers' ``batched_mm`` experts (the default ``grouped_mm`` does not export):

* ``ts``: TorchScript, ``MatMul(Gather(W, ids), x)`` (Qwen3: the weight is MatMul's operand 0;
  GPT-OSS: ``MatMul(x, Gather(W, ids))``, operand 1),
* ``dyn``: dynamo, the same with ``GatherND(W, ids[:, None])``,
* ``ts_eager`` (Qwen3): TorchScript of the eager experts loop, ``MatMul(x, Transpose(Gather(W,
  e)))`` per expert (operand 1 through a Transpose). Tracing unrolls the loop for the experts
  the traced input hits, so that graph is right for that input only: the test's.

Modes: merged, keep-lora with filled slots, empty slots plus the export's adapter file, and
``loracc pack`` files hot-swapped in one session (a second adapter of another rank, rsLoRA, on
``down_proj`` only, leaving ``gate_up_proj``'s slots empty). An expert weight read some other
way is refused, naming the module. References come from PEFT only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner

import loracc
from loracc.errors import LoweringError, UnsupportedError
from tests.support import onnx_oracle as oo
from tests.support import peft_oracle as po

CASE = "qwen3moe_target_param_3d"
GPT_OSS = "gpt_oss_target_param_3d"
MIXTRAL = "mixtral_target_param_3d"
# (case, export) pairs
EXPORTS = [
    (CASE, "ts"),
    (CASE, "dyn"),
    (CASE, "ts_eager"),
    (GPT_OSS, "ts"),
    (GPT_OSS, "dyn"),
    (MIXTRAL, "ts"),
    (MIXTRAL, "dyn"),
]
IDS = [f"{c.split('_target')[0]}-{m}" for c, m in EXPORTS]
# (E, in, out) of down_proj, PEFT's in and out
DOWN_PROJ = {CASE: (4, 16, 32), GPT_OSS: (4, 16, 32), MIXTRAL: (3, 64, 32)}
# Same seed, so the same base: another rank, rsLoRA, one of the two parameters.
DOWN_ONLY = po.spec_replace(
    po.CASE_SPECS[CASE],
    lora=dict(
        r=3,
        lora_alpha=5,
        use_rslora=True,
        target_modules=[],
        target_parameters=["mlp.experts.down_proj"],
    ),
)


class Moe:
    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        names = (CASE, GPT_OSS, MIXTRAL)
        self.cases = {name: po.build_case(name, tmp.mktemp(name)) for name in names}
        self.case = self.cases[CASE]
        self.down = po.build_case(CASE, tmp.mktemp("moe_down"), DOWN_ONLY)
        self._bases: dict[tuple[str, str], Path] = {}

    def base(self, mode: str, name: str = CASE) -> Path:
        if (name, mode) not in self._bases:
            case = self.cases[name]
            path = self.tmp.mktemp(f"{name}_{mode}") / "model.onnx"
            if mode == "dyn":
                oo.export_dynamo(case, path)
            else:
                experts = "eager" if mode == "ts_eager" else "batched_mm"
                oo.export_torchscript(case, path, experts=experts)
            self._bases[(name, mode)] = path
        return self._bases[(name, mode)]


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Moe:
    m = Moe(tmp_path_factory)
    assert torch.equal(m.case.base_logits, m.down.base_logits)  # one base for both adapters
    for c in (*m.cases.values(), m.down):
        assert po.rel_err(c.base_logits, c.peft_logits) > 1e-2  # each adapter matters
    return m


@pytest.mark.parametrize(("name", "mode"), EXPORTS, ids=IDS)
def test_base_export_matches_torch(moe: Moe, name: str, mode: str) -> None:
    case = moe.cases[name]
    oo.assert_close(oo.run(moe.base(mode, name), case), case.base_logits, f"{mode} base")


@pytest.mark.parametrize(("name", "mode"), EXPORTS, ids=IDS)
def test_merged_matches_peft(moe: Moe, name: str, mode: str, tmp_path: Path) -> None:
    case, out = moe.cases[name], tmp_path / "merged.onnx"
    report = loracc.export_onnx(moe.base(mode, name), case.adapter_dir, out)
    experts = [b for b in report.bindings if ".experts." in b["module"]]
    assert len(experts) == 4 and len(report.changed) == len(report.bindings)
    assert {b["op"] for b in experts} == {"GatherND" if mode == "dyn" else "Gather"}
    oo.assert_close(oo.run(out, case), case.peft_logits, f"{name} {mode} merged")


@pytest.mark.parametrize(("name", "mode"), EXPORTS, ids=IDS)
def test_keep_lora_filled_slots_match_peft(moe: Moe, name: str, mode: str, tmp_path: Path) -> None:
    case, out = moe.cases[name], tmp_path / "filled.onnx"
    loracc.export_onnx(
        moe.base(mode, name), case.adapter_dir, out, keep_lora=True, empty_slots=False
    )
    oo.assert_close(oo.run(out, case), case.peft_logits, f"{name} {mode} filled slots")


@pytest.mark.parametrize(("name", "mode"), EXPORTS, ids=IDS)
def test_empty_slots_are_the_base_and_the_file_the_adapter(
    moe: Moe, name: str, mode: str, tmp_path: Path
) -> None:
    case, out = moe.cases[name], tmp_path / "slotted.onnx"
    loracc.export_onnx(moe.base(mode, name), case.adapter_dir, out, keep_lora=True)
    inputs = {v.name: v for v in ir.load(out).graph.inputs}
    slot = "model.layers.0.mlp.experts.down_proj"
    a = inputs[f"{slot}.lora_A.weight"].shape  # (E, in, r), (E, r, out): PEFT's in and out
    b = inputs[f"{slot}.lora_B.weight"].shape
    experts, fan_in, fan_out = (str(n) for n in DOWN_PROJ[name])
    assert [str(d) for d in a] == [experts, fan_in, f"{slot}.lora_r"]
    assert [str(d) for d in b] == [experts, f"{slot}.lora_r", fan_out]
    oo.assert_close(oo.run(out, case), case.base_logits, f"{name} {mode} empty slots")
    file = out.with_name("slotted.onnx_adapter")
    oo.assert_close(oo.run(out, case, file), case.peft_logits, f"{name} {mode} adapter file")


@pytest.mark.parametrize("keep_lora", [False, True], ids=["merged", "keep-lora"])
def test_base_weights_layout_matches_the_graph(moe: Moe, keep_lora: bool, tmp_path: Path) -> None:
    """With --base-weights the architecture table decides GPT-OSS's (E, in, out); the graph
    must agree (a square weight is checked against its MatMul's reading)."""
    case, out = moe.cases[GPT_OSS], tmp_path / "out.onnx"
    filled: dict[str, Any] = {"keep_lora": True, "empty_slots": False} if keep_lora else {}
    loracc.export_onnx(
        moe.base("dyn", GPT_OSS), case.adapter_dir, out, base_weights=case.base_dir, **filled
    )
    oo.assert_close(oo.run(out, case), case.peft_logits, "gpt_oss --base-weights")


@pytest.mark.parametrize("mode", ["ts", "dyn"])
def test_packed_files_hot_swap_in_one_session(moe: Moe, mode: str, tmp_path: Path) -> None:
    out = tmp_path / "slotted.onnx"
    loracc.export_onnx(moe.base(mode), moe.case.adapter_dir, out, keep_lora=True)
    full, down = tmp_path / "full.onnx_adapter", tmp_path / "down.onnx_adapter"
    assert not loracc.pack(out, moe.case.adapter_dir, full).empty
    report = loracc.pack(out, moe.down.adapter_dir, down)
    assert sorted(report.empty) == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in (0, 1)]
    sess = oo.session(out)
    for files, want, what in [
        ((full,), moe.case.peft_logits, "packed full adapter"),
        ((down,), moe.down.peft_logits, "packed down_proj adapter (r=3, rsLoRA)"),
        ((), moe.case.base_logits, "no adapter"),
        ((full,), moe.case.peft_logits, "full adapter again"),
    ]:
        oo.assert_close(oo.run(sess, moe.case, *files), want, f"{mode} {what}")


def _insert_mul_after_gather(src: Path, dst: Path, weight: str) -> None:
    """A ``Mul`` by one between the gather of ``weight`` and its MatMul: the same numbers, a
    pattern loracc does not bind."""
    model = ir.load(src)
    graph = model.graph
    gather = next(n for n in graph.initializers[weight].consumers())
    one = ir.Value(name="one", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    one.const_value = ir.tensor(1.0, dtype=ir.DataType.FLOAT, name="one")
    graph.register_initializer(one)
    gathered = gather.outputs[0]
    readers = list(gathered.uses())
    mul = ir.Node("", "Mul", [gathered, one], name="/m/model/layers.0/mlp/experts/Mul_one")
    for user, index in readers:
        user.replace_input_with(index, mul.outputs[0])
    graph.insert_after(gather, [mul])
    ir.save(model, dst)


def test_unbindable_expert_pattern_is_refused(moe: Moe, tmp_path: Path) -> None:
    from loracc.cli import main

    weight = "m.model.layers.0.mlp.experts.gate_up_proj"
    base = tmp_path / "mul.onnx"
    _insert_mul_after_gather(moe.base("ts"), base, weight)
    oo.assert_close(oo.run(base, moe.case), moe.case.base_logits, "edited base")
    for keep in (False, True):
        out = tmp_path / f"x{keep}.onnx"
        with pytest.raises(LoweringError) as e:
            loracc.export_onnx(base, moe.case.adapter_dir, out, keep_lora=keep)
        msg = str(e.value)
        assert msg.startswith("model.layers.0.mlp.experts.gate_up_proj: ") and weight in msg
        assert "goes through Mul before its MatMul" in msg
        assert not out.exists()
    args: list[Any] = ["export", "--onnx", "--base", str(base), "--adapter"]
    result = CliRunner().invoke(main, [*args, str(moe.case.adapter_dir), "-o", str(tmp_path / "c")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "gate_up_proj" in result.output


def test_base_weights_storing_experts_one_by_one_are_refused(moe: Moe, tmp_path: Path) -> None:
    """Qwen3-MoE's checkpoint stores each expert's gate/up/down; the graph holds them fused."""
    with pytest.raises(UnsupportedError, match="one tensor per expert"):
        loracc.export_onnx(
            moe.base("ts"), moe.case.adapter_dir, tmp_path / "x.onnx",
            base_weights=moe.case.base_dir,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Every orientation: hand-built graphs, an fp64 reference of PEFT's ParamWrapper delta


def _expert_graph(path: Path, weight: np.ndarray, operand: int, swapped: bool) -> None:
    """``y = R @ x`` (operand 0) or ``x @ R`` (operand 1), ``R = W[ids]`` (its last two axes
    swapped when ``swapped``), W an initializer named ``layers.0.experts.w``."""
    w = ir.Value(name="layers.0.experts.w", const_value=ir.tensor(weight, name="w"))
    w.type, w.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(list(weight.shape))
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([6]))
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))
    gather = ir.Node("", "Gather", [w, ids], attributes=[ir.AttrInt64("axis", 0)], name="g")
    r = gather.outputs[0]
    nodes = [gather]
    if swapped:
        nodes.append(ir.Node("", "Transpose", [r], attributes=[ir.AttrInt64s("perm", [0, 2, 1])]))
        r = nodes[-1].outputs[0]
    nodes.append(ir.Node("", "MatMul", [r, x] if operand == 0 else [x, r], name="mm"))
    y = nodes[-1].outputs[0]
    y.name, y.type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([ids, x], [y], nodes=nodes, initializers=[w], opset_imports={"": 17})
    ir.save(ir.Model(graph, ir_version=8), path)


def _param_adapter(
    folder: Path, lora_A: torch.Tensor, lora_B: torch.Tensor, r: int, alpha: float
) -> Path:
    """A PEFT adapter folder with LoRA (rank ``r`` per expert) on parameter ``w`` of
    ``layers.0.experts``, as PEFT saves a target_parameters adapter."""
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": [],
        "target_parameters": ["experts.w"],
    }))  # fmt: skip
    prefix = "base_model.model.layers.0.experts"
    tensors = {f"{prefix}.lora_A.weight": lora_A, f"{prefix}.lora_B.weight": lora_B}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("stored_in_out", [False, True], ids=["out-in", "in-out"])
@pytest.mark.parametrize("operand", [0, 1])
@pytest.mark.parametrize("swapped", [False, True], ids=["direct", "transpose"])
def test_every_expert_orientation(
    stored_in_out: bool, operand: int, swapped: bool, tmp_path: Path
) -> None:
    """W (E, out, in) or (E, in, out), not square so its shape decides; read as ``R @ x`` or
    ``x @ R`` with or without a Transpose: merged and filled slots equal the fp64 forward of
    ``W + ΔP``, ``ΔP[e] = s·B3[e]@A3[e]`` (transposed for (E, in, out))."""
    E, r, fan_in, fan_out, s = 3, 2, 5, 4, 1.5
    g = torch.Generator().manual_seed(7)
    lora_A, lora_B = (
        torch.randn(r * E, fan_in, generator=g),
        torch.randn(fan_out, r * E, generator=g),
    )
    adapter = _param_adapter(tmp_path / "adapter", lora_A, lora_B, r, s * r)
    delta = s * torch.einsum(  # PEFT's split: A expert-major, B with the expert index fastest
        "eor,eri->eoi",
        lora_B.double().reshape(fan_out, r, E).permute(2, 0, 1),
        lora_A.double().reshape(E, r, fan_in),
    )
    shape = (E, fan_in, fan_out) if stored_in_out else (E, fan_out, fan_in)
    weight = torch.randn(shape, generator=g)
    merged = weight.double() + (delta.mT if stored_in_out else delta)
    ids = torch.tensor([0, 2, 1, 1, 0, 2])
    chosen = merged[ids].mT if swapped else merged[ids]
    x = torch.randn(6, chosen.shape[2], 1) if operand == 0 else torch.randn(6, 1, chosen.shape[1])
    want = chosen @ x.double() if operand == 0 else x.double() @ chosen
    base = tmp_path / "base.onnx"
    _expert_graph(base, weight.numpy(), operand, swapped)
    feeds = {"ids": ids.numpy(), "x": x.numpy()}
    for keep in (False, True):
        out = tmp_path / f"out{keep}.onnx"
        kw: dict[str, Any] = {"keep_lora": True, "empty_slots": False} if keep else {}
        loracc.export_onnx(base, adapter, out, **kw)
        got = torch.from_numpy(oo.session(out).run(None, feeds)[0]).double()
        assert po.rel_err(got, want) < 1e-6, (
            "keep-lora" if keep else "merged",
            po.rel_err(got, want),
        )


def test_square_expert_read_against_the_layout_is_refused(tmp_path: Path) -> None:
    """--base-weights says GPT-OSS's (E, in, out); a graph whose MatMul reads the square weight
    as (out, in) could hold it transposed: refused, not guessed."""
    from safetensors.torch import save_file

    E, r, d = 3, 2, 4
    weight = torch.randn(E, d, d)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
    save_file({"layers.0.experts.w": weight}, str(hf / "model.safetensors"))
    lora_A, lora_B = torch.randn(r * E, d), torch.randn(d, r * E)
    adapter = _param_adapter(tmp_path / "adapter", lora_A, lora_B, r, r)
    base = tmp_path / "base.onnx"
    _expert_graph(base, weight.numpy(), operand=0, swapped=False)  # W[e] @ x: (out, in)
    with pytest.raises(LoweringError, match=r"layers\.0\.experts\.w: 'mm' reads the square"):
        loracc.export_onnx(base, adapter, tmp_path / "x.onnx", base_weights=hf)
    loracc.export_onnx(base, adapter, tmp_path / "ok.onnx")  # the graph decides without a base
