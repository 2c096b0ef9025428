"""Model fingerprints and input sets see external data used anywhere in the model.

An If/Loop body, a nested body and a model-local function can keep their tensors in external
files just as the main graph can. The golden's model fingerprint and the files a run reads (which
outputs may not overwrite) used to look at the main graph's initializers only: changing the
external data of a branch that the recorded inputs do not take then passed
``golden check --strict-fingerprint`` silently, and ``run -o`` could overwrite such a file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import set_external_data  # noqa: E402

from loracc import golden, runner  # noqa: E402
from loracc.errors import OutputError  # noqa: E402
from loracc.io.npz import write_npz  # noqa: E402

THEN = np.array([1.0, 2.0, 3.0], np.float32)
ELSE = np.array([10.0, 20.0, 30.0], np.float32)


def external(name: str, value: np.ndarray, folder: Path, location: str) -> onnx.TensorProto:
    """``value`` as a tensor whose bytes live in ``folder/location``."""
    tensor = numpy_helper.from_array(value, name)
    (folder / location).write_bytes(tensor.raw_data)
    set_external_data(tensor, location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    return tensor


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 10  # onnx 1.23 writes IR 14; this onnxruntime reads <= 13
    onnx.save(model, str(path))
    return path


def branch(name: str, op: str, constant: onnx.TensorProto) -> onnx.GraphProto:
    """A body computing ``x <op> constant``; ``constant`` is the body's own initializer."""
    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [3])
    node = helper.make_node(op, ["x", constant.name], [f"{name}_out"])
    return helper.make_graph([node], name, [], [out], [constant])


def if_model(folder: Path) -> Path:
    """y = x + THEN if cond else x - ELSE; THEN and ELSE live in then.bin and else.bin, and the
    main graph has no initializer at all."""
    then_g = branch("then", "Add", external("c_then", THEN, folder, "then.bin"))
    else_g = branch("else", "Sub", external("c_else", ELSE, folder, "else.bin"))
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    graph = helper.make_graph(
        [node],
        "if",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return save(model, folder / "if.onnx")


@pytest.fixture()
def recorded(tmp_path: Path) -> tuple[Path, Path]:
    """The If model and its golden, recorded with cond=True (the then-branch runs)."""
    model = if_model(tmp_path)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, cond=np.array(True), x=np.array([0.5, -1.0, 2.0], np.float32))
    out = tmp_path / "golden.npz"
    meta = golden.record(model, out, inputs=inputs)
    np.testing.assert_array_equal(
        golden.read_golden(out)[1]["output/y"], np.array([1.5, 1.0, 5.0], np.float32)
    )
    assert meta["model"]["fingerprint"] == runner.model_fingerprint(model)
    return model, out


def test_unchanged_model_passes_strict(recorded: tuple[Path, Path]) -> None:
    model, out = recorded
    report = golden.check(model, out, strict_fingerprint=True)
    assert report.passed, report.text()
    assert not report.notes


def test_untaken_branch_data_change_fails_strict(recorded: tuple[Path, Path]) -> None:
    """The else-branch does not run on the recorded inputs, so the outputs cannot show that its
    data changed: only the fingerprint can, and it must cover else.bin."""
    model, out = recorded
    (model.parent / "else.bin").write_bytes((ELSE + 1).tobytes())

    report = golden.check(model, out, strict_fingerprint=True)
    assert not report.passed
    assert any("model fingerprint differs" in p for p in report.problems), report.text()
    assert all(c.passed for c in report.comparisons)  # the outputs alone would have passed

    lenient = golden.check(model, out)
    assert lenient.passed and any("model fingerprint differs" in n for n in lenient.notes)


def test_taken_branch_data_change_fails_and_is_named(recorded: tuple[Path, Path]) -> None:
    model, out = recorded
    (model.parent / "then.bin").write_bytes((THEN * 2).tobytes())
    report = golden.check(model, out)
    assert not report.passed
    assert [c.name for c in report.comparisons if not c.passed] == ["y"]
    assert any("model fingerprint differs" in n for n in report.notes), report.text()


def test_outputs_may_not_overwrite_subgraph_data(recorded: tuple[Path, Path]) -> None:
    model, _ = recorded
    data = {model.parent / "then.bin", model.parent / "else.bin"}
    assert data <= set(runner.input_files(model))
    for target in sorted(data):
        before = target.read_bytes()
        with pytest.raises(OutputError):
            golden.record(model, target, seed=0, force=True)
        with pytest.raises(OutputError):
            write_npz(target, {"y": np.zeros(3)}, inputs=runner.input_files(model), force=True)
        assert target.read_bytes() == before


def loop_model(folder: Path) -> Path:
    """A Loop whose body holds an If whose then-branch keeps its constant in deep.bin."""
    inner_then = branch("inner_then", "Add", external("c_deep", THEN, folder, "deep.bin"))
    inner_else = branch("inner_else", "Sub", numpy_helper.from_array(ELSE, "c_inline"))
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node(
                "If", ["cond_in"], ["x_out"], then_branch=inner_then, else_branch=inner_else
            ),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [3]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "cond", "x"], ["y"], body=body)],
        "loop",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return save(model, folder / "loop.onnx")


def function_model(folder: Path) -> Path:
    """A model-local function whose Constant node keeps its value in fn.bin."""
    constant = helper.make_node(
        "Constant", [], ["c"], value=external("c_fn", THEN, folder, "fn.bin")
    )
    add = helper.make_node("Add", ["x", "c"], ["y"])
    function = helper.make_function(
        "local", "AddConst", ["x"], ["y"], [constant, add], [helper.make_opsetid("", 17)]
    )
    graph = helper.make_graph(
        [helper.make_node("AddConst", ["x"], ["y"], domain="local")],
        "fn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(
        graph,
        functions=[function],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )
    return save(model, folder / "fn.onnx")


@pytest.mark.parametrize(("build", "data"), [(loop_model, "deep.bin"), (function_model, "fn.bin")])
def test_fingerprint_covers_nested_bodies_and_functions(tmp_path: Path, build, data) -> None:
    model = build(tmp_path)
    assert tmp_path / data in runner.input_files(model)
    before = runner.model_fingerprint(model)
    (tmp_path / data).write_bytes((THEN + 1).tobytes())
    assert runner.model_fingerprint(model) != before
