"""ONNX files and onnxruntime plumbing: external data, path safety, IR version, providers,
adapter files, atomic outputs. References are PEFT (a tiny two-layer model), onnx and numpy."""

from __future__ import annotations

import copy
import os
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file

import loracc
from loracc.errors import FormatError, NonFiniteError, OutputError
from loracc.io import ort as lort
from loracc.io.onnx_model import MAX_IR_VERSION, load_model


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny base exported with external data, a PEFT adapter on ``up``, PEFT's outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    base = Tiny().eval()
    x = torch.randn(1, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(base, (x,), str(root / "plain.onnx"), dynamo=False, input_names=["x"])
    model = onnx.load(str(root / "plain.onnx"))
    model_dir = root / "base"
    model_dir.mkdir()
    onnx.save_model(
        model,
        str(model_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["up"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(str(root / "adapter"))
    ref = PeftModel.from_pretrained(copy.deepcopy(base), str(root / "adapter"))
    with torch.no_grad():
        base_out = base(x)
        peft_out = ref.eval()(x)
    return {
        "root": root,
        "model": model_dir / "model.onnx",
        "adapter": root / "adapter",
        "x": x,
        "base": base_out,
        "peft": peft_out,
        "state": {k: v.detach().clone() for k, v in base.state_dict().items()},
    }


def _run(path: Path, x: torch.Tensor, *adapters: Path) -> torch.Tensor:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    keep = []
    for a in adapters:
        lora = ort.LoraAdapter()
        lora.Load(str(a))
        run_options.add_active_adapter(lora)
        keep.append(lora)
    return torch.from_numpy(sess.run(None, {"x": x.numpy()}, run_options)[0])


def test_external_data_merge_and_keep_lora(tiny: dict, tmp_path: Path) -> None:
    assert float((tiny["peft"] - tiny["base"]).abs().max()) > 1e-2
    out = tmp_path / "merged.onnx"
    report = loracc.export_onnx(tiny["model"], tiny["adapter"], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.onnx", "merged.onnx.data"]
    locations = {
        e.value
        for i in onnx.load(str(out), load_external_data=False).graph.initializer
        for e in i.external_data
        if e.key == "location"
    }
    assert locations == {"merged.onnx.data"}
    torch.testing.assert_close(_run(out, tiny["x"]), tiny["peft"], rtol=0, atol=1e-5)
    # untouched tensors keep their bytes
    before = {i.name: numpy_helper.to_array(i, str(tiny["model"].parent)).tobytes()
              for i in onnx.load(str(tiny["model"])).graph.initializer}  # fmt: skip
    after = {
        i.name: numpy_helper.to_array(i).tobytes() for i in onnx.load(str(out)).graph.initializer
    }
    changed = set(report.changed)
    assert changed and all(before[k] == after[k] for k in before if k not in changed)
    kept = tmp_path / "kept.onnx"
    loracc.export_onnx(tiny["model"], tiny["adapter"], kept, keep_lora=True, empty_slots=True)
    torch.testing.assert_close(_run(kept, tiny["x"]), tiny["base"], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        _run(kept, tiny["x"], tmp_path / "kept.onnx_adapter"), tiny["peft"], rtol=0, atol=1e-5
    )


def test_outputs_are_atomic_and_refuse_overwrite(tiny: dict, tmp_path: Path) -> None:
    bad = tmp_path / "adapter_inf"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tiny["adapter"] / "adapter_config.json").read_text())
    tensors = load_file(str(tiny["adapter"] / "adapter_model.safetensors"))
    for k in tensors:
        if "lora_B" in k:
            tensors[k] = torch.full_like(tensors[k], 3e38)
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        loracc.export_onnx(tiny["model"], bad, out_dir / "m.onnx")
    assert list(out_dir.iterdir()) == []
    loracc.export_onnx(tiny["model"], tiny["adapter"], out_dir / "m.onnx")
    with pytest.raises(OutputError, match="already exists"):
        loracc.export_onnx(tiny["model"], tiny["adapter"], out_dir / "m.onnx")
    with pytest.raises(OutputError, match="overlaps the input"):
        loracc.export_onnx(tiny["model"], tiny["adapter"], tiny["model"], force=True)


def _adapter_like(tiny: dict, folder: Path, edit) -> Path:
    """A copy of the tiny adapter with ``edit(key, tensor) -> tensor`` applied to its tensors."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        (tiny["adapter"] / "adapter_config.json").read_text()
    )
    tensors = load_file(str(tiny["adapter"] / "adapter_model.safetensors"))
    tensors = {k: edit(k, v) for k, v in tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def _factors(folder: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """``up``'s A, B (fp64) and peft's scale alpha/r, read from the files (not by loracc)."""
    import json

    t = load_file(str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    key = "base_model.model.up.lora_{}.weight"
    A, B = (t[key.format(x)].double().numpy() for x in "AB")
    return A, B, cfg["lora_alpha"] / cfg["r"]


def _find(path: Path, weight: np.ndarray) -> tuple[str, bool]:
    """The initializer of ``path`` holding ``weight`` (out, in), and whether it is stored
    transposed: found by value with onnx, independent of loracc's binding."""
    for init in onnx.load(str(path)).graph.initializer:
        a = numpy_helper.to_array(init, str(path.parent))
        for transposed, w in ((False, weight), (True, weight.T)):
            if a.shape == w.shape and np.array_equal(a, w):
                return init.name, transposed
    raise AssertionError(f"{path}: no initializer holds the weight")


def _initializer(path: Path, name: str) -> np.ndarray:
    for init in onnx.load(str(path)).graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init, str(path.parent))
    raise AssertionError(f"{path}: no initializer '{name}'")


def test_fp16_overflow_is_checked_after_rounding(tiny: dict, tmp_path: Path) -> None:
    """A merged value finite in fp32 but past fp16's max is refused (it would be written Inf)."""
    base = Tiny().eval()
    base.load_state_dict(tiny["state"])
    base = base.half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            base, (tiny["x"].half(),), str(tmp_path / "fp16.onnx"), dynamo=False,
            input_names=["x"],
        )  # fmt: skip

    def big(key: str, t: torch.Tensor) -> torch.Tensor:
        if "lora_A" in key:
            return torch.full_like(t, 100.0)
        t = torch.zeros_like(t)
        t[3] = 200.0  # row 3 of ΔW: 2 * 2 * 100 * 200 = 80000 > 65504, finite in fp32
        return t

    bad = _adapter_like(tiny, tmp_path / "big", big)
    A, B, s = _factors(bad)
    weight = tiny["state"]["up.weight"].half().numpy()
    name, transposed = _find(tmp_path / "fp16.onnx", weight)
    with np.errstate(over="ignore"):  # the overflow is the point
        ref = (weight.astype(np.float64) + s * (B @ A)).astype(np.float16)  # one rounding
    if transposed:
        ref = ref.T
    inf = np.isinf(ref)
    assert inf.any() and np.isfinite(weight.astype(np.float64) + s * (B @ A)).all()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(NonFiniteError, match=rf"'{re.escape(name)}' \(up\).*NaN or Inf"):
        loracc.export_onnx(tmp_path / "fp16.onnx", bad, out / "m.onnx")
    assert list(out.iterdir()) == []
    loracc.export_onnx(tmp_path / "fp16.onnx", bad, out / "m.onnx", allow_nonfinite=True)
    got = _initializer(out / "m.onnx", name)
    assert got.dtype == np.float16
    assert np.array_equal(np.isinf(got), inf)
    np.testing.assert_allclose(got[~inf], ref[~inf], rtol=1e-3, atol=0)


def test_allow_nonfinite_reaches_the_adapter_reader(tiny: dict, tmp_path: Path) -> None:
    """export/pack --allow-nonfinite accept NaN in the adapter and write it where fp64 says."""

    def nan(key: str, t: torch.Tensor) -> torch.Tensor:
        if "lora_B" in key:
            t = t.clone()
            t[5, 0] = float("nan")
        return t

    bad = _adapter_like(tiny, tmp_path / "nan", nan)
    A, B, s = _factors(bad)
    weight = tiny["state"]["up.weight"].numpy()
    name, transposed = _find(tiny["model"], weight)
    ref = weight.astype(np.float64) + s * (B @ A)  # row 5 is NaN
    ref = ref.T if transposed else ref
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        loracc.export_onnx(tiny["model"], bad, tmp_path / "refused.onnx")
    out = tmp_path / "m.onnx"
    loracc.export_onnx(tiny["model"], bad, out, allow_nonfinite=True)
    got = _initializer(out, name)
    assert np.isnan(ref).any() and np.array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=0, atol=1e-5)

    kept = tmp_path / "kept.onnx"
    loracc.export_onnx(tiny["model"], tiny["adapter"], kept, keep_lora=True, empty_slots=True)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        loracc.pack(kept, bad, tmp_path / "refused.onnx_adapter")
    packed = tmp_path / "nan.onnx_adapter"
    loracc.pack(kept, bad, packed, allow_nonfinite=True)
    shape, element_type, raw = lort.read_adapter(packed)["up.lora_B.weight"]
    assert element_type == TensorProto.FLOAT
    slot = np.frombuffer(raw, np.float32).reshape(shape)  # (rank, out): (s·B)ᵀ
    want = (s * B).T
    assert np.array_equal(np.isnan(slot), np.isnan(want)) and np.isnan(want).any()
    np.testing.assert_allclose(slot[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-6)


def test_outputs_may_not_overwrite_initial_adapter_or_base_weights(
    tiny: dict, tmp_path: Path
) -> None:
    initial = _adapter_like(tiny, tmp_path / "initial", lambda k, t: t)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(tiny["state"], str(hf / "model.safetensors"), metadata={"format": "pt"})
    kept = tmp_path / "kept.onnx"
    loracc.export_onnx(tiny["model"], tiny["adapter"], kept, keep_lora=True)
    before = {p: sorted(p.iterdir()) for p in (initial, hf)}
    for folder, kwargs in ((initial, {"initial_adapter": initial}), (hf, {"base_weights": hf})):
        with pytest.raises(OutputError, match="overlaps the input"):
            loracc.export_onnx(tiny["model"], tiny["adapter"], folder / "m.onnx", **kwargs)
        with pytest.raises(OutputError, match="overlaps the input"):
            loracc.pack(kept, tiny["adapter"], folder / "a.onnx_adapter", **kwargs)
    assert {p: sorted(p.iterdir()) for p in (initial, hf)} == before


def _external_model(folder: Path, location: str) -> Path:
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    weight.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[weight],
    )
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "link.bin", "short.bin"])
def test_external_data_paths_stay_inside(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    (folder / "short.bin").write_bytes(b"\0" * 8)
    path = _external_model(folder, location)
    with pytest.raises(FormatError, match=r"outside|do not hold"):
        load_model(path)


def test_ir_version_written_is_readable(tiny: dict, tmp_path: Path) -> None:
    model = onnx.load(str(tiny["model"]))
    model.ir_version = 13  # what onnx 1.23's helpers write; onnxruntime 1.20 reads 10
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, location="m.onnx.data")
    out = tmp_path / "out.onnx"
    loracc.export_onnx(src, tiny["adapter"], out, keep_lora=True, empty_slots=False)
    assert onnx.load(str(out)).ir_version == MAX_IR_VERSION
    torch.testing.assert_close(_run(out, tiny["x"]), tiny["peft"], rtol=0, atol=1e-5)


def test_cuda_probe_is_quiet_and_falls_back(capfd: pytest.CaptureFixture[str]) -> None:
    lort.cuda_usable.cache_clear()
    providers = lort.providers("auto")
    captured = capfd.readouterr()
    if lort.cuda_usable():  # a machine with working CUDA
        assert providers[0] == "CUDAExecutionProvider"
        return
    assert providers == ["CPUExecutionProvider"]
    assert lort.providers("cuda") == ["CPUExecutionProvider"]
    assert "onnxruntime" not in captured.err and "CUDA" not in captured.err, captured.err
    with pytest.raises(loracc.LoraccError, match="--device"):
        lort.providers("tpu")


def test_adapter_file_bf16_round_trip(tmp_path: Path) -> None:
    values = torch.randn(3, 5).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    path = tmp_path / "a.onnx_adapter"
    lort.write_adapter(
        path, {"w": (bits, TensorProto.BFLOAT16), "z": (np.zeros((4, 0), np.float32), 1)}
    )
    assert path.read_bytes()[4:8] == b"TORT"
    back = lort.read_adapter(path)
    shape, element_type, raw = back["w"]
    assert shape == (3, 5) and element_type == TensorProto.BFLOAT16
    assert np.array_equal(np.frombuffer(raw, np.uint16).reshape(3, 5), bits)
    assert back["z"][0] == (4, 0)


def test_run_options_keep_adapters_alive(tiny: dict, tmp_path: Path) -> None:
    """onnxruntime's RunOptions only points at a LoraAdapter; loracc's keeps it referenced."""
    out = tmp_path / "k.onnx"
    loracc.export_onnx(tiny["model"], tiny["adapter"], out, keep_lora=True, empty_slots=True)
    options = lort.run_options(tmp_path / "k.onnx_adapter")
    import gc

    gc.collect()
    sess = lort.session(out, device="cpu")
    got = torch.from_numpy(sess.run(None, {"x": tiny["x"].numpy()}, options)[0])
    torch.testing.assert_close(got, tiny["peft"], rtol=0, atol=1e-5)
    assert os.fspath(out).endswith(".onnx")


class Twin(torch.nn.Module):
    """Two Linear layers with equal weights: TorchScript keeps one initializer (Identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8, bias=False)
        self.b = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + 2 * self.b(x)


def _peft_pair(base: torch.nn.Module, targets: list[str], folder: Path, x: torch.Tensor):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(folder))
    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()(x)


@pytest.mark.parametrize("targets", [["a"], ["a", "b"]])
def test_deduplicated_weight_is_split(tmp_path: Path, targets: list[str]) -> None:
    torch.manual_seed(0)
    base = Twin().eval()
    with torch.no_grad():
        base.b.weight.copy_(base.a.weight)
    x = torch.randn(1, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(base, (x,), str(tmp_path / "twin.onnx"), dynamo=False, input_names=["x"])
    graph = onnx.load(str(tmp_path / "twin.onnx")).graph
    assert len(graph.initializer) == 1 and any(n.op_type == "Identity" for n in graph.node)
    ref = _peft_pair(base, targets, tmp_path / "adapter", x)
    for keep in (False, True):
        out = tmp_path / f"out{keep}.onnx"
        slots = {"empty_slots": False} if keep else {}  # the adapter in the defaults
        loracc.export_onnx(
            tmp_path / "twin.onnx", tmp_path / "adapter", out, keep_lora=keep, **slots
        )
        torch.testing.assert_close(_run(out, x), ref, rtol=0, atol=1e-5)


def test_named_parameters_through_transpose(tmp_path: Path) -> None:
    """A graph that keeps parameter names and explicit Transpose nodes (dynamo, optimize=False
    style), with no node names or metadata: bound by parameter name, orientation flipped."""
    torch.manual_seed(0)
    base = Tiny().eval()
    x = torch.randn(1, 3, 8)
    state = {k: v.detach().numpy() for k, v in base.state_dict().items()}
    nodes = [
        helper.make_node("Transpose", ["up.weight"], ["up_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "up_t"], ["h0"]),
        helper.make_node("Add", ["h0", "up.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Transpose", ["down.weight"], ["down_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "down_t"], ["h3"]),
        helper.make_node("Add", ["h3", "down.bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8])],
        initializer=[numpy_helper.from_array(v, k) for k, v in state.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "named.onnx"))
    ref = _peft_pair(base, ["up", "down"], tmp_path / "adapter", x)
    report = loracc.export_onnx(tmp_path / "named.onnx", tmp_path / "adapter", tmp_path / "m.onnx")
    assert {(b["initializer"], b["transposed"], b["how"]) for b in report.bindings} == {
        ("up.weight", False, "name"),
        ("down.weight", False, "name"),
    }
    assert all(b["kind"] == "linear" for b in report.bindings)
    torch.testing.assert_close(_run(tmp_path / "m.onnx", x), ref, rtol=0, atol=1e-5)
    loracc.export_onnx(
        tmp_path / "named.onnx",
        tmp_path / "adapter",
        tmp_path / "k.onnx",
        keep_lora=True,
        empty_slots=False,
    )
    torch.testing.assert_close(_run(tmp_path / "k.onnx", x), ref, rtol=0, atol=1e-5)


class TiedLM(torch.nn.Module):
    """An embedding and an output layer sharing one Parameter; 2-D activations, so TorchScript
    writes Gemm(transB=1) on the embedding table itself: one initializer, two readers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("targets", [["head"], ["emb"], ["emb", "head"]])
def test_tied_initializer_split(tmp_path: Path, targets: list[str]) -> None:
    torch.manual_seed(0)
    base = TiedLM().eval()
    ids = torch.tensor([1, 5, 7, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            base, (ids,), str(tmp_path / "tied.onnx"), dynamo=False, input_names=["x"]
        )
    graph = onnx.load(str(tmp_path / "tied.onnx")).graph
    assert [i.name for i in graph.initializer if i.name.endswith("weight")] == ["emb.weight"]
    ref = _peft_pair(base, targets, tmp_path / "adapter", ids)
    for keep in (False, True):
        out = tmp_path / f"out{keep}.onnx"
        slots = {"empty_slots": False} if keep else {}  # the adapter in the defaults
        loracc.export_onnx(
            tmp_path / "tied.onnx", tmp_path / "adapter", out, keep_lora=keep, **slots
        )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"x": ids.numpy()})[0])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
