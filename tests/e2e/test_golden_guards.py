"""Guards on ``loracc golden check``: every comparison branch has a case that fails if it flips.

Users' CI trusts a PASS, so each way an artifact can regress must give exit 1: a NaN where the
golden is finite, an output gone from the graph, an output's dtype changed, a change outside
``--rtol/--atol`` (ONNX and Hugging Face folders alike), a one-ulp change under a zero tolerance.
And each tolerance must let through exactly what it allows, relative to the golden value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from loracc.golden import compare_arrays, sample_indices  # noqa: E402
from tests.support.golden_onnx import (  # noqa: E402
    embed_model,
    hf_folder,
    invoke,
    record_seeded,
    save_onnx,
    weights,
)

# --------------------------------------------------------------------------------------------
# compare_arrays: the element rule |got - ref| <= atol + rtol * |ref|


def _cmp(got: Any, ref: Any, rtol: float, atol: float, dtype: str = "float64") -> bool:
    return compare_arrays("t", np.asarray(got), np.asarray(ref), dtype, rtol, atol).passed


def test_nan_against_a_finite_golden_fails_at_any_tolerance() -> None:
    assert not _cmp([1.0, np.nan], [1.0, 2.0], 1e30, 1e30)
    assert not _cmp([1.0, 2.0], [1.0, np.nan], 1e30, 1e30)  # a NaN golden is matched by NaN only
    assert _cmp([1.0, np.nan], [1.0, np.nan], 0, 0)


def test_infinities_match_only_themselves() -> None:
    assert _cmp([np.inf, -np.inf], [np.inf, -np.inf], 0, 0)
    assert not _cmp([1e300], [np.inf], 1.0, 1.0)  # atol + rtol*|inf| is inf: still a failure
    assert not _cmp([np.inf], [1e300], 1.0, 1.0)
    assert not _cmp([-np.inf], [np.inf], 1.0, 1.0)


def test_tolerance_is_relative_to_the_golden_and_inclusive() -> None:
    assert not _cmp([2.0], [1.0], 0.6, 0)  # |2-1| = 1 > 0.6*|ref|, though <= 0.6*|got|
    assert _cmp([1.5], [1.0], 0.5, 0)  # exactly at the bound passes (<=)
    assert not _cmp([1.5], [1.0], 0.25, 0.25 - 1e-9)
    assert _cmp([1e-6], [0.0], 0, 1e-5) and not _cmp([1e-6], [0.0], 1e30, 1e-7)  # atol alone
    assert _cmp([1000.5], [1000.0], 1e-3, 0) and not _cmp([1000.5], [1000.0], 1e-4, 0)


def test_exact_comparison_of_integers_and_one_ulp() -> None:
    big = np.array([2**53], dtype=np.int64)
    assert not _cmp(big + 1, big, 0, 0, "int64")  # float64 cannot tell them apart
    one = np.float32(0.75)
    ulp = np.nextafter(one, np.float32(1))
    assert not _cmp([ulp], [one], 0, 0, "float32")
    assert _cmp([ulp], [one], 1e-6, 0, "float32")


def test_empty_and_reshaped_outputs() -> None:
    assert _cmp(np.zeros((0, 3)), np.zeros((0, 3)), 0, 0)
    assert not _cmp(np.zeros((3, 0)), np.zeros((0, 3)), 1, 1)
    assert not _cmp(np.zeros(6), np.zeros((2, 3)), 1, 1)


# --------------------------------------------------------------------------------------------
# ONNX golden check


def _two_output_model(path: Path, w: dict[str, np.ndarray], outputs: list[tuple[str, int]]) -> Path:
    """logits = emb[input_ids] @ w + b (and hidden = emb[input_ids]) with chosen output dtypes.

    ``outputs`` lists (name, TensorProto dtype) of the graph outputs, among "logits" and
    "hidden"; a non-float dtype-changing output is produced by a Cast.
    """
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["hidden32"]),
        helper.make_node("MatMul", ["hidden32", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits32"]),
    ]
    outs = []
    for name, dtype in outputs:
        nodes.append(helper.make_node("Cast", [f"{name}32"], [name], to=dtype))
        outs.append(helper.make_tensor_value_info(name, dtype, None))
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    graph = helper.make_graph(nodes, "embed2", [ids], outs, inits)
    return save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE


@pytest.fixture()
def two_outputs(tmp_path: Path) -> tuple[dict[str, np.ndarray], Path]:
    w = weights()
    model = _two_output_model(tmp_path / "m.onnx", w, [("logits", F32), ("hidden", F32)])
    golden = tmp_path / "g.npz"
    r = record_seeded(model, golden)
    assert r.exit_code == 0, r.output
    r = invoke("golden", "check", "--model", model, "--golden", golden)
    assert r.exit_code == 0, r.output
    return w, golden


def test_nan_output_against_finite_golden_fails(tmp_path, two_outputs) -> None:
    w, golden = two_outputs
    w = {k: v.copy() for k, v in w.items()}
    w["b"][1] = np.nan  # every logits[..., 1] is NaN; hidden unchanged
    model = _two_output_model(tmp_path / "nan.onnx", w, [("logits", F32), ("hidden", F32)])
    for tol in ([], ["--rtol", "1e30", "--atol", "1e30"]):
        r = invoke("golden", "check", "--model", model, "--golden", golden, *tol)
        assert r.exit_code == 1, r.output
        assert "FAIL logits" in r.output and "ok   hidden" in r.output


def test_output_missing_from_graph_fails(tmp_path, two_outputs) -> None:
    w, golden = two_outputs
    model = _two_output_model(tmp_path / "one.onnx", w, [("logits", F32)])  # same logits
    r = invoke("golden", "check", "--model", model, "--golden", golden)
    assert r.exit_code == 1, r.output
    assert "REGRESSION: output(s) no longer in the graph: hidden" in r.output
    assert "ok   logits" in r.output


def test_output_dtype_change_fails_even_with_equal_values(tmp_path, two_outputs) -> None:
    w, golden = two_outputs
    model = _two_output_model(tmp_path / "f64.onnx", w, [("logits", F64), ("hidden", F32)])
    r = invoke("golden", "check", "--model", model, "--golden", golden, "--atol", "1")
    assert r.exit_code == 1, r.output
    line = next(x for x in r.output.splitlines() if "logits" in x)
    assert line.lstrip().startswith("FAIL") and "dtype changed: golden float32, now float64" in line
    assert "max abs err 0 " in line  # the float64 values equal the recorded float32 ones


def test_one_failing_output_of_two_fails_the_check(tmp_path, two_outputs) -> None:
    w, golden = two_outputs
    w = {k: v.copy() for k, v in w.items()}
    w["w"] *= 1.01  # logits move, hidden (the gathered rows) does not
    model = _two_output_model(tmp_path / "w.onnx", w, [("logits", F32), ("hidden", F32)])
    r = invoke("golden", "check", "--model", model, "--golden", golden, "--json")
    assert r.exit_code == 1, r.output
    r = invoke("golden", "check", "--model", model, "--golden", golden)
    assert "FAIL logits" in r.output and "ok   hidden" in r.output
    assert r.output.rstrip().endswith("FAIL: 1 of 2 outputs differ")


def test_onnx_tolerance_flags_are_honoured(tmp_path) -> None:
    w = weights()
    model = embed_model(tmp_path / "m.onnx", w)
    golden = tmp_path / "g.npz"
    assert record_seeded(model, golden).exit_code == 0
    w2 = {k: v.copy() for k, v in w.items()}
    w2["b"] += np.float32(1e-3)  # every logit moves by ~1e-3: beyond float32's default 1e-4/1e-5
    moved = embed_model(tmp_path / "moved.onnx", w2)
    check = ("golden", "check", "--model", moved, "--golden", golden)
    assert invoke(*check).exit_code == 1
    assert invoke(*check, "--atol", "2e-3").exit_code == 0
    assert invoke(*check, "--atol", "5e-4", "--rtol", "0").exit_code == 1
    assert invoke(*check, "--rtol", "1e30").exit_code == 0  # relative to logits far from 0


# --------------------------------------------------------------------------------------------
# Hugging Face folder golden check

N = 4096  # elements of the large tensor: only SAMPLE_SIZE of them are stored as samples
KEY = "model.layers.0.mlp.up_proj.weight"


def _unsampled(n: int) -> int:
    sampled = set(sample_indices(n).tolist())
    return next(i for i in range(n // 2, n) if i not in sampled)


@pytest.fixture()
def hf(tmp_path: Path) -> tuple[dict[str, np.ndarray], Path, Path]:
    rng = np.random.default_rng(5)
    up = rng.standard_normal(N).astype(np.float32).reshape(64, 64)
    tensors = {KEY: up, "model.norm.weight": rng.standard_normal(16).astype(np.float32)}
    folder = hf_folder(tmp_path / "merged", tensors, {"model_type": "llama"})
    golden = tmp_path / "g.npz"
    r = invoke("golden", "record", "--model", folder, "-o", golden)
    assert r.exit_code == 0, r.output
    return tensors, folder, golden


def _rewrite(folder: Path, tensors: dict[str, np.ndarray], flat_index: int, value: Any) -> None:
    t = {k: v.copy() for k, v in tensors.items()}
    t[KEY].reshape(-1)[flat_index] = value
    hf_folder(folder, t, {"model_type": "llama"})


def _check(folder: Path, golden: Path, *tol: str) -> Any:
    return invoke("golden", "check", "--model", folder, "--golden", golden, *tol)


def test_hf_tolerances_are_honoured_on_sampled_values(hf) -> None:
    tensors, folder, golden = hf
    i = int(sample_indices(N)[100])
    v = tensors[KEY].reshape(-1)[i]
    _rewrite(folder, tensors, i, v * np.float32(1.001))  # a relative change of 1e-3
    assert _check(folder, golden).exit_code == 1  # digest
    assert _check(folder, golden, "--rtol", "1e-2").exit_code == 0
    r = _check(folder, golden, "--rtol", "1e-4")
    assert r.exit_code == 1 and "sampled values outside tolerance" in r.output, r.output
    assert _check(folder, golden, "--atol", "1e-6", "--rtol", "0").exit_code == 1
    assert _check(folder, golden, "--atol", "1e-2").exit_code == 0


def test_hf_large_change_outside_the_sample_fails(hf) -> None:
    tensors, folder, golden = hf
    _rewrite(folder, tensors, _unsampled(N), 40.0)  # the max moves from ~4 to 40
    r = _check(folder, golden, "--atol", "1e-3")
    assert r.exit_code == 1 and "stats outside tolerance" in r.output, r.output
    assert "max " in r.output


@pytest.mark.parametrize("where", ["sampled", "unsampled"])
def test_hf_nan_fails_at_any_tolerance(hf, where) -> None:
    tensors, folder, golden = hf
    i = int(sample_indices(N)[7]) if where == "sampled" else _unsampled(N)
    _rewrite(folder, tensors, i, np.nan)
    for tol in ([], ["--atol", "1e30", "--rtol", "1e30"]):
        r = _check(folder, golden, *tol)
        assert r.exit_code == 1, r.output
        assert f"FAIL {KEY}" in r.output


def test_hf_dtype_change_fails_at_any_tolerance(hf) -> None:
    tensors, folder, golden = hf
    t = {**tensors, KEY: tensors[KEY].astype(np.float16)}
    hf_folder(folder, t, {"model_type": "llama"})
    r = _check(folder, golden, "--atol", "1", "--rtol", "1")
    assert r.exit_code == 1
    assert "was float32[64, 64], now float16[64, 64]" in r.output


@pytest.mark.parametrize("change", ["extra tensor", "missing tensor", "config"])
def test_hf_structure_change_alone_fails(hf, change) -> None:
    """Each on its own, so that none can hide behind another's failure."""
    tensors, folder, golden = hf
    config: dict[str, Any] = {"model_type": "llama"}
    if change == "extra tensor":
        tensors = {**tensors, "lm_head.weight": np.ones((2, 2), np.float32)}
        want = "REGRESSION: tensor(s) not in the golden: lm_head.weight"
    elif change == "missing tensor":
        tensors = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
        want = "REGRESSION: tensor(s) missing: model.norm.weight"
    else:
        config["rope_theta"] = 1.0
        want = "REGRESSION: config.json 'rope_theta'"
    hf_folder(folder, tensors, config)
    r = _check(folder, golden, "--atol", "1")
    assert r.exit_code == 1 and want in r.output, r.output


@pytest.mark.parametrize("where", ["sampled", "unsampled"])
def test_hf_one_ulp_passes_only_within_tolerance(hf, where) -> None:
    """A tiny element's last bit changes nothing in the float64 statistics: a zero tolerance must
    still fail it (the digest differs), a tolerance lets it through."""
    tensors, folder, golden = hf
    i = int(sample_indices(N)[50]) if where == "sampled" else _unsampled(N)
    t = {k: v.copy() for k, v in tensors.items()}
    t[KEY].reshape(-1)[i] = np.float32(1e-30)
    hf_folder(folder, t, {"model_type": "llama"})
    r = invoke("golden", "record", "--model", folder, "-o", golden, "--force")
    assert r.exit_code == 0, r.output
    _rewrite(folder, t, i, np.nextafter(np.float32(1e-30), np.float32(1)))
    assert _check(folder, golden).exit_code == 1
    r = _check(folder, golden, "--rtol", "0", "--atol", "0")
    assert r.exit_code == 1, r.output
    assert f"FAIL {KEY}" in r.output
    r = _check(folder, golden, "--rtol", "1e-6", "--atol", "0")
    assert r.exit_code == 0 and "values within tolerance" in r.output, r.output
