"""Per-request adapters for optimum's ``ORTModelForCausalLM``, on graphs optimum-onnx exported.

The fixture (tests/fixtures/optimum_llama, ``scripts/build_optimum_fixture.py``, built in a venv
of its own because optimum-onnx pins transformers 4.57) holds optimum's exports of a tiny Llama
with and without KV cache, two PEFT adapters and PEFT's float64 logits and greedy tokens for
them. ``ORTModelForCausalLM`` runs its session itself: ``session.run(None, feeds)`` without
RunOptions, or ``session.run_with_iobinding(binding)`` with one binding reused across calls (on
CUDA). These tests make the same calls on ``loracc.adapter_session`` (greedy decoding, feeding
the past key/values back as optimum does) and compare with PEFT, never with loracc. The script
ran the real ``ORTModelForCausalLM.generate``; its tokens are in ``generate.json``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import loracc
from loracc.errors import InputError, UnsupportedError
from loracc.io.ort import read_adapter, run_options, write_adapter

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "optimum_llama"
ADAPTERS = {name: FIXTURE / "adapters" / name for name in ("lora", "rslora")}
REQUESTS = [None, "lora", "rslora", None]
TOLERANCE = 1e-5  # max|got - ref| / max|ref| of fp32 onnxruntime vs PEFT's float64 logits


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as f:
        return {k: f[k] for k in f.files}


def open_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(sess: Any, ids: np.ndarray, past: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """What ``ORTModelForCausalLM.forward`` feeds: with a KV cache only the new tokens (the
    whole prompt first, with empty past), positions from the attention mask."""
    config = json.loads((FIXTURE / "config.json").read_text())
    heads = config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    names = [i.name for i in sess.get_inputs()]
    cached = any(n.startswith("past_key_values.") for n in names)
    step = ids[:, -1:] if cached and past is not None else ids
    mask = np.ones_like(ids)
    feeds: dict[str, Any] = {
        "input_ids": step,
        "attention_mask": mask,
        "position_ids": (np.cumsum(mask, axis=1) - 1)[:, -step.shape[1] :],
    }
    for n in names:
        if n.startswith("past_key_values."):
            present = n.replace("past_key_values.", "present.")
            empty = np.zeros((ids.shape[0], heads, 0, head_dim), np.float32)
            feeds[n] = empty if past is None else past[present]
    assert set(feeds) == set(names), names
    return feeds


def _step_run(sess: Any, feeds: dict[str, Any], binding: Any) -> dict[str, np.ndarray]:
    """One forward, as ``session.run(None, feeds)`` or through the reused IOBinding."""
    names = [o.name for o in sess.get_outputs()]
    if binding is None:
        return dict(zip(names, sess.run(None, feeds), strict=True))
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in names:
        binding.bind_output(name, "cpu")
    sess.run_with_iobinding(binding)
    return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))


def greedy(
    sess: Any, ids: np.ndarray, tokens: int = 8, binding: Any = None
) -> tuple[list[int], np.ndarray]:
    """The tokens picked greedily after ``ids`` and the first step's logits."""
    past = None
    first = None
    out: list[int] = []
    for _ in range(tokens):
        result = _step_run(sess, _feeds(sess, ids, past), binding)
        logits = result["logits"]
        first = logits if first is None else first
        token = int(logits[0, -1].argmax())
        out.append(token)
        ids = np.concatenate([ids, [[token]]], axis=1)
        past = result
    assert first is not None
    return out, first


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _keep_lora(tmp_path: Path, export: str, **kw: Any) -> tuple[Path, dict[str, Path]]:
    out = tmp_path / f"{export}.onnx"
    report = loracc.export_onnx(
        FIXTURE / export / "model.onnx", list(ADAPTERS.values()), out, keep_lora=True, **kw
    )
    return out, {Path(f["adapter"]).name: Path(f["file"]) for f in report.adapter_files}


@pytest.mark.parametrize("path", ["run", "iobinding"])
@pytest.mark.parametrize("export", ["past", "nopast"])
def test_requests_get_their_adapter(
    tmp_path: Path, expected: dict[str, np.ndarray], export: str, path: str
) -> None:
    """base, lora, rslora, base on one wrapped session (and one binding): PEFT's greedy tokens
    and logits for each request."""
    model, files = _keep_lora(tmp_path, export)
    sess = loracc.adapter_session(open_session(model), files)
    binding = sess.io_binding() if path == "iobinding" else None
    ids = expected["input_ids"]
    for name in REQUESTS:
        case = name or "base"
        with sess.active(name):
            tokens, logits = greedy(sess, ids, binding=binding)
        assert tokens == expected[f"{case}_greedy"][0].tolist(), case
        assert rel_error(logits, expected[case]) <= TOLERANCE, case
    assert rel_error(expected["lora"], expected["base"]) > 1e-2  # the adapters matter


def test_without_the_wrapper_iobinding_runs_the_defaults(
    tmp_path: Path, expected: dict[str, np.ndarray]
) -> None:
    """Why the wrapper binds: onnxruntime ignores RunOptions adapters under IOBinding."""
    model, files = _keep_lora(tmp_path, "nopast")
    sess = open_session(model)
    binding = sess.io_binding()
    feeds = _feeds(sess, expected["input_ids"], None)
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output("logits", "cpu")
    sess.run_with_iobinding(binding, run_options(files["lora"]))
    assert rel_error(binding.copy_outputs_to_cpu()[0], expected["base"]) <= TOLERANCE


def test_keep_lora_keeps_the_named_output_dims(tmp_path: Path) -> None:
    """LoRA on ``lm_head`` adapts the graph output ``logits``: its dims keep optimum's names,
    which ``ORTModelForCausalLM`` uses to size its IOBinding buffers (they were None)."""
    model, _ = _keep_lora(tmp_path, "past")
    shapes = {o.name: o.shape for o in open_session(model).get_outputs()}
    assert shapes["logits"] == ["batch_size", "sequence_length", 128]


def test_threads_have_their_own_adapter(tmp_path: Path, expected: dict[str, np.ndarray]) -> None:
    model, files = _keep_lora(tmp_path, "nopast")
    sess = loracc.adapter_session(open_session(model), files)
    got: dict[tuple[str, bool], np.ndarray] = {}
    feeds = _feeds(sess, expected["input_ids"], None)

    def request(name: str, ort_values: bool) -> None:
        with sess.active(name):
            if ort_values:  # the call loracc's own runner makes
                values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
                got[name, ort_values] = sess.run_with_ort_values(["logits"], values)[0].numpy()
            else:
                got[name, ort_values] = sess.run(None, feeds)[0]

    threads = [
        threading.Thread(target=request, args=(n, v)) for n in ADAPTERS for v in (False, True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (name, _), logits in got.items():
        assert rel_error(logits, expected[name]) <= TOLERANCE
    assert len(got) == 4 and sess.current is None  # this thread never activated one


def test_merged_and_recorded_generate_match_peft(
    tmp_path: Path, expected: dict[str, np.ndarray]
) -> None:
    """Merged exports under the same session calls; and the real ``generate`` tokens the
    fixture script recorded (keep-lora through ``run`` and IOBinding, merged) are PEFT's."""
    record = json.loads((FIXTURE / "generate.json").read_text())
    for export in ("past", "nopast"):
        for name, adapter in ADAPTERS.items():
            out = tmp_path / f"{export}_{name}.onnx"
            loracc.export_onnx(FIXTURE / export / "model.onnx", adapter, out)
            tokens, logits = greedy(open_session(out), expected["input_ids"])
            assert tokens == expected[f"{name}_greedy"][0].tolist()
            assert rel_error(logits, expected[name]) <= TOLERANCE
            assert record[export][f"merged_{name}"] == tokens
        for path in ("run", "iobinding"):
            for key, tokens in record[export][path].items():
                assert tokens == expected[f"{key.split(':')[1]}_greedy"][0].tolist(), key


def test_adapter_session_refusals(tmp_path: Path, expected: dict[str, np.ndarray]) -> None:
    filled, files = _keep_lora(tmp_path, "nopast", empty_slots=False)
    # a file naming only q_proj's slots leaves the first adapter's filled defaults beside it
    partial = tmp_path / "q_only.onnx_adapter"
    write_adapter(partial, {
        name: (np.frombuffer(data, np.float32).reshape(shape), kind)
        for name, (shape, kind, data) in read_adapter(files["lora"]).items()
        if ".q_proj." in name
    })  # fmt: skip
    with pytest.raises(UnsupportedError, match="hold another adapter"):
        loracc.adapter_session(open_session(filled), {"partial": partial})
    empty, files = _keep_lora(tmp_path, "past")
    sess = loracc.adapter_session(open_session(empty), files)
    with pytest.raises(InputError, match="'other' is not one of"), sess.active("other"):
        pass
    feeds = _feeds(sess, expected["input_ids"], None)
    with pytest.raises(InputError, match="its own RunOptions"), sess.active("lora"):
        sess.run(None, feeds, ort.RunOptions())
    # a file for another model: its tensors are not slots there
    only_lora = tmp_path / "only_lora.onnx"
    loracc.export_onnx(FIXTURE / "past" / "model.onnx", ADAPTERS["lora"], only_lora, keep_lora=True)
    with pytest.raises(InputError, match="not an adapter slot"):
        loracc.adapter_session(open_session(only_lora), {"rslora": files["rslora"]})
