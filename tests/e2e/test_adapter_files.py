"""Adapter files that move between tools, and slots that never mix two adapters.

References are PEFT's forward (unmerged ``PeftModel``) and the base torch model, never loracc:

* keep-lora exports have empty slots by default: the plain model is the base, and a file that
  names only some slots (Olive's ``convert-adapters`` output for a q/v adapter, written here from
  PEFT's safetensors) is exactly that adapter, in a raw ``InferenceSession`` too;
* ``--filled-slots`` (the old default) keeps the first adapter in the defaults; there a partial
  file silently mixes two adapters in onnxruntime, so loracc's ``run`` and
  ``runner.open_model_session`` refuse it, while a ``pack``ed file (every slot named) is accepted;
* ``pack`` on slotted models loracc did not make: graphs built here with ``onnx.helper`` as
  Olive's ExtractAdapters lays them out (a LoRA branch per projection, A (in, r) and B (r, out)
  graph inputs with rank-0 defaults and a symbolic ``lora_r``), with onnxruntime-genai's builder
  naming (``model.layers.0.attn.q_proj.lora_A.MatMul.weight``, q/k/v split) and the dynamo naming
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``). Adapters trained
  on split q/k/v and on a fused ``qkv_proj`` (Phi-3 style) must both give PEFT's output.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import loracc
from loracc.errors import FormatError, InputError, UnsupportedError
from tests.support.deploy_cases import olive_style_file
from tests.support.tiny_attention import (
    LAYERS,
    H,
    Tiny,
    fused_copy,
    peft_adapter,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("adapter_files")
    torch.manual_seed(0)
    base = Tiny().eval()
    fused = fused_copy(base)
    x = torch.randn(1, 5, H)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(base, (x,), str(root / "base.onnx"), dynamo=False, input_names=["x"])
    all4 = ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft = {
        "all": peft_adapter(base, root / "all", all4, r=4, alpha=8, seed=1),
        "qv": peft_adapter(base, root / "qv", ["q_proj", "v_proj"], r=2, alpha=6, seed=2),
        "fused": peft_adapter(fused, root / "fused", ["qkv_proj", "o_proj"], r=3, alpha=6, seed=3),
    }
    with torch.no_grad():
        out = {k: m(x) for k, m in peft.items()}
        out["base"] = base(x)
        assert float((fused(x) - out["base"]).abs().max()) < 1e-6
    for k in peft:
        assert float((out[k] - out["base"]).abs().max()) > 1e-2, f"adapter {k} has no effect"
    return {"root": root, "base": base, "x": x, "out": out, "adapters": {k: root / k for k in peft}}


# --------------------------------------------------------------------------------------------
# onnxruntime directly (independent of loracc)


def _run(model: Path, x: torch.Tensor, *files: Path) -> torch.Tensor:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    keep = []
    for f in files:
        lora = ort.LoraAdapter()
        lora.Load(str(f))
        run_options.add_active_adapter(lora)
        keep.append(lora)  # RunOptions only points at the adapter
    return torch.from_numpy(sess.run(None, {"x": x.numpy()}, run_options)[0])


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max())


# --------------------------------------------------------------------------------------------
# Priority: a model's slots never mix two adapters


def test_keep_lora_default_is_empty_slots(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    report = loracc.export_onnx(
        tiny["root"] / "base.onnx", tiny["adapters"]["all"], out, keep_lora=True
    )
    slots = {
        i.name: numpy_helper.to_array(i).shape
        for i in onnx.load(str(out)).graph.initializer
        if ".lora_" in i.name
    }
    assert len(slots) == 2 * 4 * LAYERS and all(0 in s for s in slots.values()), slots
    assert _err(_run(out, tiny["x"]), tiny["out"]["base"]) < TOL
    file = Path(report.adapter_files[0]["file"])
    assert _err(_run(out, tiny["x"], file), tiny["out"]["all"]) < TOL


def test_partial_file_is_exactly_its_adapter_on_the_default_export(
    tiny: dict, tmp_path: Path
) -> None:
    """Olive's q/v file on a loracc model exported for another adapter: the q/v adapter, also
    in a raw onnxruntime session; on a --filled-slots model the same file mixes (why the
    default changed)."""
    base, x, out = tiny["root"] / "base.onnx", tiny["x"], tiny["out"]
    partial = olive_style_file(tiny["adapters"]["qv"], tmp_path / "qv.onnx_adapter")
    empty = tmp_path / "empty.onnx"
    loracc.export_onnx(base, tiny["adapters"]["all"], empty, keep_lora=True)
    assert _err(_run(empty, x, partial), out["qv"]) < TOL
    filled = tmp_path / "filled.onnx"
    report = loracc.export_onnx(
        base, tiny["adapters"]["all"], filled, keep_lora=True, empty_slots=False
    )
    assert any("--filled-slots" in n for n in report.notes)
    assert _err(_run(filled, x), out["all"]) < TOL  # the old behaviour, kept behind the flag
    assert _err(_run(filled, x, partial), out["qv"]) > 1e-2  # onnxruntime mixes silently


def test_loracc_refuses_a_partial_file_on_filled_slots(tiny: dict, tmp_path: Path) -> None:
    from loracc import runner
    from loracc.cli import main

    filled = tmp_path / "filled.onnx"
    loracc.export_onnx(
        tiny["root"] / "base.onnx", tiny["adapters"]["all"], filled, keep_lora=True,
        empty_slots=False,
    )  # fmt: skip
    partial = olive_style_file(tiny["adapters"]["qv"], tmp_path / "qv.onnx_adapter")
    with pytest.raises(UnsupportedError, match=r"k_proj\.lora_A\.weight.*--empty-slots"):
        runner.open_model_session(filled, "cpu", adapter=partial)
    with pytest.raises(UnsupportedError, match="hold another adapter"):
        loracc.check_adapter_files(filled, partial)
    np.savez(tmp_path / "in.npz", x=tiny["x"].numpy())
    result = CliRunner().invoke(
        main,
        ["run", "--model", str(filled), "--adapter", str(partial), "--inputs",
         str(tmp_path / "in.npz"), "-o", str(tmp_path / "y.npz")],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "k_proj" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "y.npz").exists()
    # a packed file names every slot: accepted, and exactly the q/v adapter
    packed = tmp_path / "packed.onnx_adapter"
    loracc.pack(filled, tiny["adapters"]["qv"], packed)
    loracc.check_adapter_files(filled, packed)
    y = runner.open_model_session(filled, "cpu", adapter=packed).run({"x": tiny["x"].numpy()})
    assert _err(torch.from_numpy(next(iter(y.values()))), tiny["out"]["qv"]) < TOL
    # partial files together with the rest of the slots' values are fine too
    loracc.check_adapter_files(filled, packed, partial)


def test_filled_slots_flag_needs_keep_lora(tiny: dict, tmp_path: Path) -> None:
    from loracc.cli import main

    for flag in ("--filled-slots", "--empty-slots"):
        result = CliRunner().invoke(
            main,
            ["export", "--onnx", flag, "--base", str(tiny["root"] / "base.onnx"), "--adapter",
             str(tiny["adapters"]["all"]), "-o", str(tmp_path / "m.onnx")],
        )  # fmt: skip
        assert result.exit_code == 2 and f"{flag} needs --keep-lora" in result.output
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------------------------
# pack for slotted models other tools wrote


def _builder_names(layer: int, proj: str) -> tuple[str, str, str]:
    """onnxruntime-genai's builder / ``olive extract-adapters``: node path, A and B slots."""
    module = f"model.layers.{layer}.attn.{proj}"
    return (
        f"/model/layers.{layer}/attn/{proj}",
        f"{module}.lora_A.MatMul.weight",
        (f"{module}.lora_B.MatMul.weight"),
    )


def _dynamo_names(layer: int, proj: str) -> tuple[str, str, str]:
    """Olive ExtractAdapters on a dynamo export: PEFT's parameter names, adapter name kept."""
    module = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
    return (
        f"node_linear_{layer}_{proj}",
        f"{module}.lora_A.default.weight",
        (f"{module}.lora_B.default.weight"),
    )


def _slotted_graph(
    base: Tiny,
    path: Path,
    names: Callable[[int, str], tuple[str, str, str]],
    slotted: list[str],
    rank: int | str = "lora_r",
) -> Path:
    """A slotted graph of ``base`` laid out as Olive's ExtractAdapters leaves it: per projection
    in ``slotted`` a ``MatMul(MatMul(x, A), B)`` branch added to the base MatMul, A and B graph
    inputs with initializers of the same name: rank 0 and the symbolic rank ``lora_r``, or zeros
    of a fixed ``rank`` (``dynamic_lora_r=False``)."""
    nodes: list[Any] = []
    inits: list[Any] = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", H])]
    h = "x"
    for i, layer in enumerate(base.model.layers):
        attn = layer.self_attn
        outs = []
        projs = ("qkv_proj", "o_proj") if attn.fused else ("q_proj", "k_proj", "v_proj", "o_proj")
        for proj in projs:
            src = h if proj != "o_proj" else f"l{i}.act"
            w = getattr(attn, proj).weight.detach().numpy().T
            path_name, a_name, b_name = names(i, proj)
            weight = f"{path_name.strip('/').replace('/', '.')}.MatMul.weight"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w), weight))
            y = f"{path_name}/MatMul_output_0"
            nodes.append(helper.make_node("MatMul", [src, weight], [y], name=f"{path_name}/MatMul"))
            if proj in slotted:
                n_in, n_out = w.shape
                inputs += [
                    helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [n_in, rank]),
                    helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank, n_out]),
                ]
                r = rank if isinstance(rank, int) else 0
                inits += [
                    numpy_helper.from_array(np.zeros((n_in, r), np.float32), a_name),
                    numpy_helper.from_array(np.zeros((r, n_out), np.float32), b_name),
                ]
                nodes += [
                    helper.make_node("MatMul", [src, a_name], [f"{y}.a"],
                                     name=f"{path_name}/lora_A/MatMul"),
                    helper.make_node("MatMul", [f"{y}.a", b_name], [f"{y}.b"],
                                     name=f"{path_name}/lora_B/MatMul"),
                    helper.make_node("Add", [y, f"{y}.b"], [f"{y}.lora"],
                                     name=f"{path_name}/lora/Add"),
                ]  # fmt: skip
                y = f"{y}.lora"
            outs.append(y)
            if proj in ("v_proj", "qkv_proj"):
                nodes += [
                    helper.make_node("Concat", outs, [f"l{i}.qkv"], axis=-1),
                    helper.make_node("Tanh", [f"l{i}.qkv"], [f"l{i}.act"]),
                ]
        nodes.append(helper.make_node("Add", [h, outs[-1]], [f"l{i}.out"]))
        h = f"l{i}.out"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(
        nodes, "olive_style", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize(
    ("naming", "adapter"),
    [
        (_builder_names, "all"),  # builder naming, adapter trained on split q/k/v
        (_builder_names, "fused"),  # Phi-3's fused qkv_proj split into the builder's slots
        (_builder_names, "qv"),  # a partial adapter: the other slots get rank 0
        (_dynamo_names, "all"),
        (_dynamo_names, "fused"),
    ],
)
def test_pack_for_a_model_loracc_did_not_make(
    tiny: dict, tmp_path: Path, naming: Callable[..., Any], adapter: str
) -> None:
    model = _slotted_graph(tiny["base"], tmp_path / "olive.onnx", naming, ALL_PROJ)
    assert _err(_run(model, tiny["x"]), tiny["out"]["base"]) < TOL
    file = tmp_path / "a.onnx_adapter"
    report = loracc.pack(model, tiny["adapters"][adapter], file)
    assert report.slots == 4 * LAYERS
    names = set(ort.AdapterFormat.read_adapter(str(file)).get_parameters())
    assert names == {n for i in range(LAYERS) for p in ALL_PROJ for n in naming(i, p)[1:]}
    assert _err(_run(model, tiny["x"], file), tiny["out"][adapter]) < TOL
    loracc.check_adapter_files(model, file)


@pytest.mark.parametrize("adapter", ["all", "qv", "fused"])
def test_pack_fuses_split_adapters_into_a_fused_foreign_slot(
    tiny: dict, tmp_path: Path, adapter: str
) -> None:
    """A model with one ``qkv_proj`` slot per layer: q/k/v adapters become its blocks (A
    stacked, B block-diagonal; a missing k takes v's size), a fused adapter fills it as is."""
    fused = fused_copy(tiny["base"])
    model = _slotted_graph(fused, tmp_path / "fused.onnx", _dynamo_names, ["qkv_proj", "o_proj"])
    assert _err(_run(model, tiny["x"]), tiny["out"]["base"]) < TOL
    file = tmp_path / "a.onnx_adapter"
    loracc.pack(model, tiny["adapters"][adapter], file)
    assert _err(_run(model, tiny["x"], file), tiny["out"][adapter]) < TOL


def test_pack_for_a_foreign_model_refuses_a_module_without_slot(tiny: dict, tmp_path: Path) -> None:
    model = _slotted_graph(tiny["base"], tmp_path / "qv.onnx", _builder_names, ["q_proj", "v_proj"])
    with pytest.raises(UnsupportedError, match=r"k_proj.*no adapter slot"):
        loracc.pack(model, tiny["adapters"]["all"], tmp_path / "a.onnx_adapter")
    # a fused adapter needs all of the split slots
    with pytest.raises(UnsupportedError, match=r"qkv_proj.*no adapter slot"):
        loracc.pack(model, tiny["adapters"]["fused"], tmp_path / "a.onnx_adapter")
    assert not (tmp_path / "a.onnx_adapter").exists()
    file = tmp_path / "qv.onnx_adapter"
    loracc.pack(model, tiny["adapters"]["qv"], file)
    assert _err(_run(model, tiny["x"], file), tiny["out"]["qv"]) < TOL


def test_pack_refuses_a_model_without_slots(tiny: dict, tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no LoRA slots"):
        loracc.pack(
            tiny["root"] / "base.onnx", tiny["adapters"]["all"], tmp_path / "a.onnx_adapter"
        )


def test_pack_for_a_fixed_rank_foreign_model(tiny: dict, tmp_path: Path) -> None:
    """Slots of a fixed rank 4: rank-2 and rank-3 adapters are zero-padded, unused slots are
    zeros of rank 4; a larger rank is refused."""
    model = _slotted_graph(tiny["base"], tmp_path / "r4.onnx", _builder_names, ALL_PROJ, rank=4)
    assert _err(_run(model, tiny["x"]), tiny["out"]["base"]) < TOL
    for adapter in ("qv", "fused", "all"):
        file = tmp_path / f"{adapter}.onnx_adapter"
        loracc.pack(model, tiny["adapters"][adapter], file)
        assert _err(_run(model, tiny["x"], file), tiny["out"][adapter]) < TOL, adapter
    small = _slotted_graph(tiny["base"], tmp_path / "r2.onnx", _builder_names, ALL_PROJ, rank=2)
    with pytest.raises(UnsupportedError, match="fixed rank 2"):
        loracc.pack(small, tiny["adapters"]["all"], tmp_path / "x.onnx_adapter")


# --------------------------------------------------------------------------------------------
# Models Olive itself wrote (tests/fixtures, scripts/build_olive_fixture.py)


def _tensors(file: Path) -> dict[str, np.ndarray]:
    reader = ort.AdapterFormat.read_adapter(str(file))  # its values are views into the reader
    return {n: np.array(v.numpy(), copy=True) for n, v in reader.get_parameters().items()}


@pytest.mark.parametrize("adapter", ["all", "qv", "fused"])
@pytest.mark.parametrize("export", ["olive_dynamo", "olive_torchscript"])
def test_pack_for_olive_models(tmp_path: Path, export: str, adapter: str) -> None:
    model = FIXTURES / export / "model.onnx"
    ref = {
        k: torch.from_numpy(v)
        for k, v in np.load(FIXTURES / "olive_adapters/reference.npz").items()
    }
    assert _err(_run(model, ref["x"]), ref["base"]) < TOL
    file = tmp_path / "a.onnx_adapter"
    loracc.pack(model, FIXTURES / "olive_adapters" / adapter, file)
    assert _err(_run(model, ref["x"], file), ref[adapter]) < TOL
    olive = _tensors(FIXTURES / export / "adapter_weights.onnx_adapter")
    mine = _tensors(file)
    assert set(mine) == set(olive)  # the model's slot names, every slot
    if adapter == "all":  # the adapter Olive exported: its file, bit for bit
        assert all(np.array_equal(mine[n], olive[n]) for n in olive)


def test_olive_file_on_a_loracc_export(tiny: dict, tmp_path: Path) -> None:
    """Olive's TorchScript-path file names slots as loracc does: it runs on loracc's export of
    the same base (and a dynamo-path file's ``.default.`` names are refused by ``run``)."""
    from loracc import runner

    ref = {
        k: torch.from_numpy(v)
        for k, v in np.load(FIXTURES / "olive_adapters/reference.npz").items()
    }
    out = tmp_path / "m.onnx"
    loracc.export_onnx(tiny["root"] / "base.onnx", tiny["adapters"]["all"], out, keep_lora=True)
    olive = FIXTURES / "olive_torchscript" / "adapter_weights.onnx_adapter"
    assert _err(_run(out, ref["x"], olive), ref["all"]) < TOL
    with pytest.raises(InputError, match=r"loracc pack --model"):
        runner.open_model_session(
            out, "cpu", adapter=FIXTURES / "olive_dynamo" / "adapter_weights.onnx_adapter"
        ).run({"x": ref["x"].numpy()})


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pack_for_olive_models_refuses_inits_that_need_the_base(tmp_path: Path, init: str) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=init)
    get_peft_model(Tiny(), config).save_pretrained(str(tmp_path / init))
    with pytest.raises(UnsupportedError, match=rf"q_proj' uses {init}; .*base weights"):
        loracc.pack(
            FIXTURES / "olive_dynamo" / "model.onnx", tmp_path / init, tmp_path / "a.onnx_adapter"
        )
    assert not (tmp_path / "a.onnx_adapter").exists()
