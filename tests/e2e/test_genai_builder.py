"""loracc on an onnxruntime-genai model-builder graph vs PEFT (tests/fixtures/genai_llama/).

The fixture (``scripts/make_genai_fixtures.py``) is a tiny Llama built by
``onnxruntime_genai.models.builder -p fp32 -e cpu``: weights ``<module>.MatMul.weight`` stored
(in, out) and read by MatMul without a Transpose, ``attn.qkv_proj`` fused, GroupQueryAttention
with a KV cache. Its PEFT adapters put LoRA on ``lm_head`` (PEFT then saves the base
``lm_head`` weight too), ``modules_to_save=["lm_head"]``, and DoRA on ``lm_head``. Every export
is run with onnxruntime and compared with PEFT's float64 logits stored beside it, never with
loracc. ``--dry-run`` must refuse whatever the real export refuses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loracc
from loracc.cli import main
from loracc.io.ort import run_options

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "genai_llama"
BASE = FIXTURE / "genai" / "model.onnx"
ADAPTERS = FIXTURE / "adapters"
CASES = ["lora_lm_head", "save_lm_head", "dora_lm_head"]
TOLERANCE = 1e-5  # max|got - ref| / max|ref|; a correct fp32 export is 3e-7..5e-7 off


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "expected.npz") as f:
        return {k: f[k] for k in f.files}


def logits(model: Path, input_ids: np.ndarray, adapter: Path | None = None) -> np.ndarray:
    """One full-prompt step of the builder graph: empty KV cache, every position attended."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    config = json.loads((FIXTURE / "genai" / "genai_config.json").read_text())["model"]
    kv_heads, head = config["decoder"]["num_key_value_heads"], config["decoder"]["head_size"]
    feeds: dict[str, np.ndarray] = {}
    for spec in sess.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = input_ids
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones_like(input_ids)
        elif spec.name.startswith("past_key_values."):
            feeds[spec.name] = np.zeros((len(input_ids), kv_heads, 0, head), np.float32)
        else:
            raise AssertionError(f"the builder graph wants an input this test lacks: {spec}")
    active = run_options(adapter) if adapter is not None else None
    return sess.run(["logits"], feeds, active)[0]


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_fixture_base_is_peft_base(expected: dict[str, np.ndarray]) -> None:
    """The feeding above reproduces transformers' forward of the base model."""
    assert rel_error(logits(BASE, expected["input_ids"]), expected["base"]) <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_merged_matches_peft(case: str, tmp_path: Path, expected: dict[str, np.ndarray]) -> None:
    out = tmp_path / "merged.onnx"
    loracc.export_onnx(BASE, ADAPTERS / case, out)
    got = logits(out, expected["input_ids"])
    assert rel_error(got, expected[case]) <= TOLERANCE
    assert rel_error(got, expected["base"]) > 1e-2  # the adapter changes the output


@pytest.mark.parametrize("case", CASES)
def test_filled_slots_match_peft(
    case: str, tmp_path: Path, expected: dict[str, np.ndarray]
) -> None:
    """Filled slot defaults hold the adapter; the adapter file activated gives the same logits."""
    out = tmp_path / "slots.onnx"
    loracc.export_onnx(BASE, ADAPTERS / case, out, keep_lora=True, empty_slots=False)
    ids = expected["input_ids"]
    assert rel_error(logits(out, ids), expected[case]) <= TOLERANCE
    file = out.with_suffix(".onnx_adapter")
    assert rel_error(logits(out, ids, file), expected[case]) <= TOLERANCE


@pytest.mark.parametrize("case", ["lora_lm_head", "dora_lm_head"])
def test_empty_slots_are_the_base(
    case: str, tmp_path: Path, expected: dict[str, np.ndarray]
) -> None:
    """Keep-lora's default, empty slots: PEFT's saved ``lm_head`` base weight equals the
    graph's, so nothing is baked in; the plain model is the base, the adapter is in the file."""
    out = tmp_path / "empty.onnx"
    report = loracc.export_onnx(BASE, ADAPTERS / case, out, keep_lora=True)
    assert report.baked == []
    ids = expected["input_ids"]
    assert rel_error(logits(out, ids), expected["base"]) <= TOLERANCE
    file = out.with_suffix(".onnx_adapter")
    assert rel_error(logits(out, ids, file), expected[case]) <= TOLERANCE


def test_lm_head_binds_as_linear() -> None:
    """The builder's ``lm_head.MatMul.weight`` is its own transposed copy: the graph shows no
    Conv1D, and the whole-tensor ``lm_head.weight`` is read transposed."""
    report = loracc.export_onnx(BASE, ADAPTERS / "dora_lm_head", None, dry_run=True)
    row = next(r for r in report.bindings if r["module"] == "lm_head")
    assert row["kind"] == "linear" and row["transposed"]
    assert row["initializer"] == "lm_head.MatMul.weight"
    tensor = next(t for t in report.tensors if t["key"] == "lm_head.weight")
    assert tensor["initializers"] == ["lm_head.MatMul.weight"] and tensor["transposed"] == [True]


# -- refusals: named, and the same with --dry-run ------------------------------------------------


def _edited_adapter(tmp_path: Path, case: str, edit: Any) -> Path:
    folder = tmp_path / f"{case}_edited"
    shutil.copytree(ADAPTERS / case, folder)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)
    return folder


def _resized_lm_head(tensors: dict[str, torch.Tensor]) -> None:
    tensors["base_model.model.lm_head.weight"] = torch.zeros(300, 64)


def _overflowing_lora(tensors: dict[str, torch.Tensor]) -> None:
    """Finite factors whose product overflows fp32: only the merged tensor holds Inf."""
    for factor, value in (("lora_A", 1e20), ("lora_B", 1e20)):
        key = f"base_model.model.model.layers.0.self_attn.o_proj.{factor}.weight"
        tensors[key] = torch.full_like(tensors[key], value)


def _export(args: list[str]) -> Any:
    return CliRunner().invoke(main, ["export", "--onnx", "--base", str(BASE), *args])


_RESIZED = ["lm_head.weight", "lm_head.MatMul.weight", "[300, 64]"]
_OVERFLOW = ["model.layers.0.attn.o_proj.MatMul.weight", "NaN or Inf"]


@pytest.mark.parametrize(
    ("edit", "words", "keep_lora"),
    [
        (_resized_lm_head, _RESIZED, False),
        (_resized_lm_head, _RESIZED, True),
        (_overflowing_lora, _OVERFLOW, False),  # keep-lora leaves o_proj's weight as it is
    ],
)
def test_dry_run_refuses_what_the_export_refuses(
    tmp_path: Path, edit: Any, words: list[str], keep_lora: bool
) -> None:
    adapter = _edited_adapter(tmp_path, "save_lm_head", edit)
    mode = ["--keep-lora"] if keep_lora else []
    out = tmp_path / "out.onnx"
    real = _export([*mode, "--adapter", str(adapter), "-o", str(out)])
    dry = _export([*mode, "--adapter", str(adapter), "--dry-run"])
    assert real.exit_code == 2, real.output
    assert dry.exit_code == real.exit_code and dry.output == real.output
    assert all(w in real.output for w in words), real.output
    assert "Traceback" not in real.output and not list(tmp_path.glob("out.onnx*"))


def test_dry_run_checks_the_output_path(tmp_path: Path) -> None:
    out = tmp_path / "taken.onnx"
    out.write_bytes(b"")
    args = ["--adapter", str(ADAPTERS / "lora_lm_head"), "-o", str(out), "--dry-run"]
    refused = _export(args)
    assert refused.exit_code == 2 and "already exists" in refused.output
    assert _export([*args, "--force"]).exit_code == 0
    assert out.read_bytes() == b""  # a dry run writes nothing, --force or not


def test_dora_against_another_layout_is_refused_by_name(tmp_path: Path) -> None:
    """A saved base weight that does not fit the site's layout: one line naming the module
    (this was fold-dora's RuntimeError, exit 1, when the graph's lm_head read as Conv1D)."""
    args = ["--adapter", str(ADAPTERS / "dora_lm_head"), "--layout", "lm_head=conv1d"]
    for extra in (["-o", str(tmp_path / "x.onnx")], ["--dry-run"]):
        result = _export([*args, *extra])
        assert result.exit_code == 2, result.output
        assert "lm_head" in result.output and "[256, 64]" in result.output
        assert "RuntimeError" not in result.output


# -- genai folders out ---------------------------------------------------------------------------


def _og_greedy(model: Any, ids: np.ndarray, adapters: Any = None, name: str = "") -> list[int]:
    """The tokens onnxruntime-genai generates greedily after ``ids`` (as many as PEFT's)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 8, do_sample=False)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def test_genai_folder_out(tmp_path: Path, expected: dict[str, np.ndarray]) -> None:
    """A base in a genai folder exported to a new folder: og.Model opens it as is and picks
    PEFT's greedy tokens; the config names the new model file, the tokenizer is copied."""
    folder = tmp_path / "new"
    out = folder / "merged.onnx"
    report = loracc.export_onnx(BASE, ADAPTERS / "lora_lm_head", out)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        ["merged.onnx", "merged.onnx.data", "genai_config.json", "tokenizer.json",
         "tokenizer_config.json"]
    )  # fmt: skip
    assert sorted(report.outputs) == sorted(str(folder / n) for n in names)
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "merged.onnx"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (BASE.parent / name).read_bytes()
    og = pytest.importorskip("onnxruntime_genai")
    ids = expected["input_ids"]
    tokens = _og_greedy(og.Model(str(folder)), ids)
    assert tokens == expected["lora_lm_head_greedy"][0].tolist()


def test_genai_folder_hot_swap(tmp_path: Path, expected: dict[str, np.ndarray]) -> None:
    """Empty slots + two adapter files in a new genai folder: og.Adapters gives PEFT's greedy
    tokens for base, adapter A, adapter B, base again, on one og.Model."""
    folder = tmp_path / "slots"
    out = folder / "model.onnx"
    pair = [ADAPTERS / "lora_lm_head", ADAPTERS / "dora_lm_head"]
    report = loracc.export_onnx(BASE, pair, out, keep_lora=True)
    files = {Path(f["adapter"]).name: f["file"] for f in report.adapter_files}
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    adapters = og.Adapters(model)
    for name, file in files.items():
        adapters.load(file, name)
    ids = expected["input_ids"]
    for case in ["base", "lora_lm_head", "dora_lm_head", "base"]:
        got = _og_greedy(model, ids, adapters if case != "base" else None, case)
        assert got == expected[f"{case}_greedy"][0].tolist(), case


def test_genai_folder_dry_run_and_refusals(tmp_path: Path) -> None:
    """A dry run makes no folder; an existing file of the set is refused without --force; an
    output inside the base's folder writes no config (the base's stays as it is)."""
    adapter = ["--adapter", str(ADAPTERS / "lora_lm_head")]
    new = tmp_path / "new" / "model.onnx"
    assert _export([*adapter, "-o", str(new), "--dry-run"]).exit_code == 0
    assert not new.parent.exists()
    new.parent.mkdir()
    (new.parent / "tokenizer.json").write_text("{}")
    refused = _export([*adapter, "-o", str(new)])
    assert refused.exit_code == 2 and "tokenizer.json: already exists" in refused.output
    assert not new.exists()
    base_copy = tmp_path / "base"
    shutil.copytree(BASE.parent, base_copy)
    beside = CliRunner().invoke(
        main, ["export", "--onnx", "--base", str(base_copy / "model.onnx"), *adapter,
               "-o", str(base_copy / "merged.onnx"), "--json"],
    )  # fmt: skip
    assert beside.exit_code == 0, beside.output
    assert any("genai_config.json not written" in n for n in json.loads(beside.output)["notes"])
    config = "genai_config.json"
    assert (base_copy / config).read_bytes() == (BASE.parent / config).read_bytes()
