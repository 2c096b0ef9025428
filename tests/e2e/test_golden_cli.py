"""``loracc golden record|check`` and ``loracc run`` on tiny models built inline.

The ONNX graphs are written with ``onnx.helper`` and their expected outputs computed with NumPy
(the oracle for ``loracc run``). Recording a golden and checking the same artifact against it is
the feature under test; every change (one ulp in a weight, a new input dtype, another adapter)
must be reported as a regression with its output name and error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from loracc.golden import compare_arrays  # noqa: E402
from loracc.io.ort import from_bf16_bits, to_bf16_bits  # noqa: E402
from tests.support.golden_onnx import (  # noqa: E402
    HIDDEN,
    OUT,
    VOCAB,
    embed_model,
    hf_folder,
    invoke,
    record_seeded,
    save_onnx,
    weights,
)


def embed_ref(w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    return w["emb"][ids] @ w["w"] + w["b"]


def lora_model(path: Path, w: np.ndarray) -> Path:
    """y = x @ w + (x @ lora_A) @ lora_B, LoRA slots as inputs with zero-rank defaults."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])
    a = helper.make_tensor_value_info("lora_A", TensorProto.FLOAT, [HIDDEN, "lora_r"])
    b = helper.make_tensor_value_info("lora_B", TensorProto.FLOAT, ["lora_r", OUT])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["base"]),
        helper.make_node("MatMul", ["x", "lora_A"], ["xa"]),
        helper.make_node("MatMul", ["xa", "lora_B"], ["delta"]),
        helper.make_node("Add", ["base", "delta"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.zeros((HIDDEN, 0), np.float32), "lora_A"),
        numpy_helper.from_array(np.zeros((0, OUT), np.float32), "lora_B"),
    ]
    graph = helper.make_graph(nodes, "lora", [x, a, b], [y], inits)
    return save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def write_adapter(path: Path, a: np.ndarray, b: np.ndarray) -> Path:
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(
        {
            "lora_A": ort.OrtValue.ortvalue_from_numpy(a),
            "lora_B": ort.OrtValue.ortvalue_from_numpy(b),
        }
    )
    fmt.export_adapter(str(path))
    return path


def cuda_usable(model: Path) -> bool:
    """Whether onnxruntime really activates CUDA here (the library may be there without it)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from loracc.errors import LoraccError
    from loracc.runner import open_model_session

    try:
        return "CUDAExecutionProvider" in open_model_session(model, "cuda").providers
    except LoraccError:
        return False


@pytest.fixture()
def embed(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    w = weights()
    return embed_model(tmp_path / "m.onnx", w), w


@pytest.fixture()
def recorded(tmp_path: Path, embed: tuple[Path, dict[str, np.ndarray]]) -> Path:
    model, _ = embed
    golden = tmp_path / "golden.npz"
    r = record_seeded(model, golden)
    assert r.exit_code == 0, r.output
    return golden


# --------------------------------------------------------------------------------------------
# ONNX golden


def test_recorded_golden_passes_unchanged(embed, recorded):
    model, w = embed
    with np.load(recorded) as z:
        ids, logits = z["input/input_ids"], z["output/logits"]
    assert ids.shape == (2, 6) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < VOCAB  # token ids kept inside the vocabulary
    np.testing.assert_allclose(logits, embed_ref(w, ids), rtol=1e-6, atol=1e-6)

    r = invoke("golden", "check", "--model", model, "--golden", recorded)
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and "logits" in r.output

    r = invoke("golden", "check", "--model", model, "--golden", recorded, "--json")
    data = json.loads(r.stdout)
    assert data["passed"] and data["comparisons"][0]["max_abs"] == 0.0
    assert data["providers"] == ["CPUExecutionProvider"]


def test_one_ulp_weight_change_beyond_tolerance_fails(tmp_path, embed, recorded):
    _, w = embed
    w2 = {k: v.copy() for k, v in w.items()}
    w2["w"][2, 3] = np.nextafter(w2["w"][2, 3], np.float32(np.inf))
    changed = embed_model(tmp_path / "m2.onnx", w2)

    r = invoke(
        "golden", "check", "--model", changed, "--golden", recorded, "--rtol", 0, "--atol", 0
    )
    assert r.exit_code == 1, r.output
    line = next(x for x in r.output.splitlines() if "FAIL logits" in x)
    assert "max abs err" in line and "max rel err" in line
    data = json.loads(
        invoke(
            "golden",
            "check",
            "--model",
            changed,
            "--golden",
            recorded,
            "--rtol",
            0,
            "--atol",
            0,
            "--json",
        ).stdout
    )
    c = data["comparisons"][0]
    assert not data["passed"] and c["name"] == "logits" and 0 < c["max_abs"] < 1e-5
    assert c["max_abs_at"][2] == 3  # only output column 3 reads w[:, 3]
    assert "fingerprint differs" in " ".join(data["notes"])

    # Within the float32 default tolerance a one-ulp change passes; a larger one does not.
    r = invoke("golden", "check", "--model", changed, "--golden", recorded)
    assert r.exit_code == 0, r.output
    w2["w"][2, 3] *= 1.01
    bigger = embed_model(tmp_path / "m3.onnx", w2)
    r = invoke("golden", "check", "--model", bigger, "--golden", recorded)
    assert r.exit_code == 1 and "FAIL logits" in r.output


def test_changed_input_spec_is_reported(tmp_path, embed, recorded):
    _, w = embed
    int32 = embed_model(tmp_path / "i32.onnx", w, ids_type=TensorProto.INT32)
    r = invoke("golden", "check", "--model", int32, "--golden", recorded)
    assert r.exit_code == 1, r.output
    assert "input spec changed: input 'input_ids' was int64[batch,seq], now int32[batch,seq]" in (
        r.output
    )


def test_different_model_fingerprint_is_reported(tmp_path, embed, recorded):
    _, w = embed
    resaved = embed_model(tmp_path / "doc.onnx", w, doc="re-exported")
    r = invoke("golden", "check", "--model", resaved, "--golden", recorded)
    assert r.exit_code == 0, r.output
    assert "model fingerprint differs from the recorded one" in r.output
    r = invoke("golden", "check", "--model", resaved, "--golden", recorded, "--strict-fingerprint")
    assert r.exit_code == 1 and "REGRESSION: model fingerprint differs" in r.output


def test_cuda_requested_but_not_usable(embed, recorded):
    model, _ = embed
    if cuda_usable(model):
        pytest.skip("CUDA works here; the refusal path needs a machine without it")
    r = invoke("golden", "check", "--model", model, "--golden", recorded, "--providers", "cuda")
    assert r.exit_code == 2, r.output
    assert "CUDAExecutionProvider" in r.stderr and "--providers cuda,cpu" in r.stderr
    r = invoke("golden", "check", "--model", model, "--golden", recorded, "--providers", "cuda,cpu")
    assert r.exit_code == 0, r.output
    assert "fell back to CPUExecutionProvider as --providers allows" in r.output


def test_bad_input_exits_2(tmp_path, embed, recorded):
    model, _ = embed
    r = invoke("golden", "record", "--model", model, "-o", tmp_path / "g.npz")
    assert r.exit_code == 2 and "--dim: batch=SIZE, seq=SIZE" in r.stderr
    r = invoke(
        "golden",
        "record",
        "--model",
        model,
        "--seed",
        1,
        "--dim",
        "batch=1",
        "--dim",
        "seq=2",
        "--dim",
        "heads=4",
        "-o",
        tmp_path / "g.npz",
    )
    assert r.exit_code == 2 and "--dim heads" in r.stderr
    r = record_seeded(model, recorded)
    assert r.exit_code == 2 and "--force" in r.stderr
    r = invoke("golden", "check", "--model", model, "--golden", tmp_path / "nope.npz")
    assert r.exit_code == 2 and "not found" in r.stderr
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    r = invoke("golden", "check", "--model", model, "--golden", tmp_path / "plain.npz")
    assert r.exit_code == 2 and "not a loracc golden file" in r.stderr
    np.savez(tmp_path / "ids.npz", wrong=np.zeros((1, 2), np.int64))
    r = invoke("run", "--model", model, "--inputs", tmp_path / "ids.npz")
    assert r.exit_code == 2 and "missing input_ids" in r.stderr
    np.savez(tmp_path / "f.npz", input_ids=np.zeros((1, 2), np.float32))
    r = invoke("run", "--model", model, "--inputs", tmp_path / "f.npz")
    assert r.exit_code == 2 and "the graph takes int64[batch,seq]" in r.stderr
    r = invoke("run", "--model", model, "--inputs", tmp_path / "ids.npz", "--providers", "gpu")
    assert r.exit_code == 2 and "not a provider" in r.stderr


# --------------------------------------------------------------------------------------------
# Adapters and loracc run


def test_run_with_and_without_adapter_matches_numpy(tmp_path):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((HIDDEN, OUT)).astype(np.float32)
    a = rng.standard_normal((HIDDEN, 3)).astype(np.float32)
    b = rng.standard_normal((3, OUT)).astype(np.float32)
    x = rng.standard_normal((4, HIDDEN)).astype(np.float32)
    model = lora_model(tmp_path / "lora.onnx", w)
    adapter = write_adapter(tmp_path / "a.onnx_adapter", a, b)
    np.savez(tmp_path / "x.npz", x=x)

    r = invoke(
        "run",
        "--model",
        model,
        "--adapter",
        adapter,
        "--inputs",
        tmp_path / "x.npz",
        "-o",
        tmp_path / "out.npz",
    )
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_allclose(z["y"], x @ w + (x @ a) @ b, rtol=1e-5, atol=1e-5)
    r = invoke(
        "run",
        "--model",
        tmp_path,
        "--inputs",
        tmp_path / "x.npz",
        "-o",
        tmp_path / "base.npz",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["outputs"][0]["shape"] == [4, OUT]
    with np.load(tmp_path / "base.npz") as z:
        np.testing.assert_allclose(z["y"], x @ w, rtol=1e-5, atol=1e-5)

    # A golden recorded with the adapter needs it back, and catches another adapter.
    golden = tmp_path / "g.npz"
    r = invoke(
        "golden",
        "record",
        "--model",
        model,
        "--adapter",
        adapter,
        "--inputs",
        tmp_path / "x.npz",
        "-o",
        golden,
    )
    assert r.exit_code == 0, r.output
    r = invoke("golden", "check", "--model", model, "--golden", golden)
    assert r.exit_code == 2 and "pass it with --adapter" in r.stderr
    r = invoke("golden", "check", "--model", model, "--golden", golden, "--adapter", adapter)
    assert r.exit_code == 0, r.output
    other = write_adapter(tmp_path / "b.onnx_adapter", a, b * 1.001)
    r = invoke("golden", "check", "--model", model, "--golden", golden, "--adapter", other)
    assert r.exit_code == 1 and "FAIL y" in r.output
    assert "adapter fingerprint differs" in r.output


def test_adapters_stay_referenced_after_gc(tmp_path):
    """onnxruntime's RunOptions only points at a LoraAdapter; loracc's options keep it alive."""
    import gc

    from loracc.io import ort as lort

    rng = np.random.default_rng(11)
    w = rng.standard_normal((HIDDEN, OUT)).astype(np.float32)
    a = rng.standard_normal((HIDDEN, 2)).astype(np.float32)
    b = rng.standard_normal((2, OUT)).astype(np.float32)
    x = rng.standard_normal((3, HIDDEN)).astype(np.float32)
    model = lora_model(tmp_path / "lora.onnx", w)
    adapter = write_adapter(tmp_path / "a.onnx_adapter", a, b)
    want = x @ w + (x @ a) @ b
    assert np.abs(want - x @ w).max() > 0.1  # the adapter differs from the rank-0 defaults

    sess = lort.open_session(model, "cpu", adapter=adapter)
    options = lort.run_options(adapter)
    plain = lort.session(model, device="cpu")
    gc.collect()
    np.testing.assert_allclose(sess.run({"x": x})["y"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain.run(None, {"x": x}, options)[0], want, rtol=1e-5, atol=1e-5)


def test_bf16_output_uses_bf16_tolerance(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [3, 4])
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)
    graph = helper.make_graph([node], "bf16", [x], [y])
    model = save_onnx(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        tmp_path / "bf16.onnx",
    )
    golden = tmp_path / "g.npz"
    r = invoke("golden", "record", "--model", model, "--seed", 0, "-o", golden)
    assert r.exit_code == 0, r.output
    r = invoke("golden", "check", "--model", model, "--golden", golden, "--json")
    data = json.loads(r.stdout)
    assert data["passed"] and data["comparisons"][0]["dtype"] == "bfloat16"
    assert data["comparisons"][0]["rtol"] == pytest.approx(1.6e-2)
    with np.load(golden) as z:  # the stored output is ORT's bf16 rounding of the input
        torch = pytest.importorskip("torch")
        ref = torch.from_numpy(z["input/x"]).to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(z["output/y"], ref)


def test_bf16_bits_round_like_torch():
    torch = pytest.importorskip("torch")
    v = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 100
    v[:3] = [np.inf, -np.inf, 0.0]
    ref = torch.from_numpy(v).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(from_bf16_bits(to_bf16_bits(v)), ref)


def test_compare_arrays_reports_where():
    ref = np.array([[1.0, 2.0, np.nan], [4.0, 0.0, -1.0]], dtype=np.float32)
    got = ref.copy()
    got[1, 0] += 0.5  # largest absolute error
    got[1, 1] = 1e-3  # relative error infinite (reference 0)
    c = compare_arrays("t", got, ref, "float32", 1e-4, 1e-5)
    assert not c.passed and c.mismatched == 2 and c.total == 6
    assert c.max_abs_at == [1, 0] and c.max_abs == pytest.approx(0.5)
    assert c.max_rel_at == [1, 1] and c.max_rel == np.inf
    assert compare_arrays("t", ref.copy(), ref, "float32", 0, 0).passed  # NaN matches NaN
    assert "shape changed" in compare_arrays("t", ref[:1], ref, "float32", 0, 0).problem


# --------------------------------------------------------------------------------------------
# Merged Hugging Face folders: digests


def test_hf_folder_digests(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model.layers.0.q_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "model.norm.weight": np.ones(8, np.float16),
        "model.pos": np.arange(6, dtype=np.int64),
    }
    config = {"model_type": "llama", "hidden_size": 8, "transformers_version": "5.24.0"}
    folder = hf_folder(tmp_path / "merged", tensors, config)
    golden = tmp_path / "g.npz"
    r = invoke("golden", "record", "--model", folder, "-o", golden)
    assert r.exit_code == 0 and "3 tensor digests" in r.output, r.output
    assert invoke("golden", "check", "--model", folder, "--golden", golden).exit_code == 0
    r = invoke("golden", "record", "--model", folder, "--seed", 1, "-o", golden, "--force")
    assert r.exit_code == 2 and "apply to ONNX models" in r.stderr

    # One ulp in one weight: the digest catches it; a tolerance lets it through.
    t2 = dict(tensors)
    q = t2["model.layers.0.q_proj.weight"].copy()
    q[5, 2] = np.nextafter(q[5, 2], np.float32(np.inf))
    t2["model.layers.0.q_proj.weight"] = q
    hf_folder(folder, t2, {**config, "transformers_version": "9.9"})  # ignored key
    r = invoke("golden", "check", "--model", folder, "--golden", golden)
    assert r.exit_code == 1, r.output
    line = next(x for x in r.output.splitlines() if "FAIL" in x and "q_proj" in x)
    assert "digest differs" in line and "at [5,2]" in line
    r = invoke("golden", "check", "--model", folder, "--golden", golden, "--atol", "1e-6")
    assert r.exit_code == 0 and "values within tolerance" in r.output, r.output

    # A config change or a lost tensor is a regression whatever the tolerance.
    del t2["model.pos"]
    hf_folder(folder, t2, {**config, "hidden_size": 9})
    r = invoke("golden", "check", "--model", folder, "--golden", golden, "--atol", "1")
    assert r.exit_code == 1
    assert "config.json 'hidden_size': golden 8, now 9" in r.output
    assert "tensor(s) missing: model.pos" in r.output

    # A golden of one kind cannot check the other.
    model = embed_model(tmp_path / "m.onnx", weights())
    r = invoke("golden", "check", "--model", model, "--golden", golden)
    assert r.exit_code == 2 and "recorded for a Hugging Face folder" in r.stderr


def test_run_counts_nan_and_inf(tmp_path: Path) -> None:
    """``run``'s summary takes min/max/mean over the finite values, so it must say how many are
    not: a mixed-batch row with a bad id is NaN and would otherwise look like a normal output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log", [x], [y])
    model = save_onnx(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx"
    )
    np.savez(tmp_path / "x.npz", x=np.array([-1.0, 0.0, 1.0, np.e, -2.0], np.float32))
    r = invoke("run", "--model", model, "--inputs", tmp_path / "x.npz")
    assert r.exit_code == 0, r.stderr
    assert "2 NaN and 1 infinite" in r.stdout and "max 1 " in r.stdout
    r = invoke("run", "--model", model, "--inputs", tmp_path / "x.npz", "--json")
    out = json.loads(r.stdout)["outputs"][0]
    assert (out["nan"], out["inf"], out["min"], out["max"]) == (2, 1, 0.0, 1.0)
