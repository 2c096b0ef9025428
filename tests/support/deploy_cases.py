"""The deployment matrix: ONNX exporters × loracc modes, each cell against PEFT.

Shared by tests/e2e/test_deploy_matrix.py (every cell passes within its exporter's tolerance or
is refused for the reason stated here) and scripts/deploy_matrix.py (prints the matrix with each
cell's error; docs/ONNX.md holds that table, checked against :data:`EXPORTERS` and
:data:`MODES`).

Exporters (rows): a tiny Llama exported by torch.onnx (TorchScript and dynamo; references from
``tests.support.peft_oracle``), optimum-onnx with and without KV cache
(tests/fixtures/optimum_llama), onnxruntime-genai's builder in fp32, fp16 and int4
(tests/fixtures/genai_llama), and the models Olive's ExtractAdapters wrote
(tests/fixtures/olive_*). References are PEFT's forward of the same adapter, never loracc's: for
int4, PEFT on the float model holding the dequantized int4 weights (the int4 base plus PEFT's
LoRA branch). The error of a cell is max|got - ref| / max|ref| over the logits (one full-prompt
step, empty KV cache).

Modes (columns):

* ``merged``: ``export_onnx`` (int4: dequantize, add, requantize with the same scheme);
* ``keep-lora filled``: ``export_onnx(keep_lora=True, empty_slots=False)``, run without a file;
* ``empty slots + pack``: the default keep-lora export, then ``loracc pack`` for it, run with
  that file (the error is the larger of: without file vs PEFT's base, with it vs PEFT);
* ``foreign file``: a file another tool wrote, run by ``loracc run`` (which checks it):
  Olive's own ``adapter_weights.onnx_adapter`` on Olive's model, else what
  ``olive convert-adapters`` writes from PEFT's safetensors on loracc's default keep-lora export.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

import loracc
from loracc import runner
from loracc.errors import LoraccError
from loracc.io.ort import TensorSpec, write_adapter
from tests.support import onnx_oracle as te
from tests.support import peft_oracle as po

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MODES = ("merged", "keep-lora filled", "empty slots + pack", "foreign file")
FP32_TOLERANCE = 1e-4  # onnxruntime fp32 vs PEFT, relative to max |reference| (onnx_oracle's)


def llm_feeds(
    specs: Sequence[TensorSpec], ids: np.ndarray, head_size: int | None = None
) -> dict[str, np.ndarray]:
    """One full-prompt step of a decoder graph (optimum's or the builder's): ``input_ids``,
    an all-ones ``attention_mask``, positions 0.., and empty past key/values (batch, heads, 0,
    head size) of the input's dtype, sized from its shape (the builder names the head size
    ``kv_cache_dim``: ``head_size`` then)."""
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name == "input_ids":
            feeds[spec.name] = ids.astype(spec.storage)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones_like(ids, dtype=spec.storage)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.arange(ids.shape[1], dtype=spec.storage)[None].repeat(len(ids), 0)
        elif spec.name.startswith("past_key_values."):
            heads, head = spec.shape[1], spec.shape[3]
            head = head if isinstance(head, int) else head_size
            assert isinstance(heads, int) and isinstance(head, int), spec
            feeds[spec.name] = np.zeros((len(ids), heads, 0, head), spec.storage)
        else:
            raise AssertionError(f"a decoder input this helper does not know: {spec}")
    return feeds


def olive_style_file(adapter: Path, path: Path, dtype: type = np.float32) -> Path:
    """What ``olive convert-adapters`` writes, from PEFT's files alone: ``base_model.model.``
    dropped, A = lora_Aᵀ, B = (alpha/r · lora_B)ᵀ, only the adapter's own modules named, in
    ``dtype`` (float32 or float16, its ``--dtype``)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    params: dict[str, tuple[np.ndarray, int]] = {}
    for key, value in load_file(str(adapter / "adapter_model.safetensors")).items():
        if ".lora_" not in key:
            continue  # a saved base weight (lm_head) is not a LoRA factor
        array: np.ndarray = (value.float().T * (scale if ".lora_B." in key else 1.0)).numpy()
        kind = 10 if dtype == np.float16 else 1  # onnx.TensorProto.FLOAT16 / FLOAT
        params[key.removeprefix("base_model.model.")] = (array.astype(dtype), kind)
    write_adapter(path, params)
    return path


@dataclass
class Exporter:
    """One row: a base ONNX model, the adapter, PEFT's outputs and how to feed the graph."""

    name: str
    base: Path
    adapter: Path
    reference: np.ndarray  # PEFT with the adapter
    base_reference: np.ndarray  # PEFT's base (the same float model)
    feeds: Callable[[Sequence[TensorSpec]], dict[str, np.ndarray]]
    tolerance: float
    why_tolerance: str
    foreign: Callable[[Path, Path], Path]  # (the model, a work folder) -> a file to run
    refusals: Mapping[str, str] = field(default_factory=dict)  # mode -> words of the refusal
    # mode -> (reference, tolerance, why) where a mode is held to another reference
    overrides: Mapping[str, tuple[np.ndarray, float, str]] = field(default_factory=dict)
    slotted: bool = False  # the base has slots another tool made: the slot modes use them

    def slot_model(self, out: Path) -> Path:
        """The model the slot modes run: the base when it has slots, else loracc's default
        keep-lora export of it written to ``out``."""
        if self.slotted:
            return self.base
        loracc.export_onnx(self.base, self.adapter, out, keep_lora=True)
        return out

    def reference_for(self, mode: str) -> tuple[np.ndarray, float]:
        reference, tolerance, _ = self.overrides.get(mode, (self.reference, self.tolerance, ""))
        return reference, tolerance


@dataclass
class Cell:
    exporter: str
    mode: str
    error: float | None = None
    refusal: str | None = None


def run_logits(
    model: Path, feeds: Callable[..., dict[str, np.ndarray]], file: Path | None
) -> np.ndarray:
    """The first output of ``model`` with ``file`` active, through loracc's ``run`` (which
    refuses a file that would leave filled slot defaults beside it)."""
    sess = runner.open_model_session(model, "cpu", adapter=file)
    out = sess.run(feeds(sess.inputs))
    return np.asarray(out[sess.outputs[0].name], dtype=np.float64)


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def run_cell(ex: Exporter, mode: str, work: Path) -> Cell:
    """One cell: the error against PEFT, or loracc's refusal (its one line)."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "model.onnx"
    try:
        if mode == "merged":
            loracc.export_onnx(ex.base, ex.adapter, out)
            error = rel_error(run_logits(out, ex.feeds, None), ex.reference_for(mode)[0])
        elif mode == "keep-lora filled":
            loracc.export_onnx(ex.base, ex.adapter, out, keep_lora=True, empty_slots=False)
            error = rel_error(run_logits(out, ex.feeds, None), ex.reference)
        elif mode == "empty slots + pack":
            model = ex.slot_model(out)
            packed = Path(loracc.pack(model, ex.adapter, work / "packed.onnx_adapter").output)
            error = max(
                rel_error(run_logits(model, ex.feeds, None), ex.base_reference),
                rel_error(run_logits(model, ex.feeds, packed), ex.reference),
            )
        elif mode == "foreign file":
            model = ex.slot_model(out)
            error = rel_error(run_logits(model, ex.feeds, ex.foreign(model, work)), ex.reference)
        else:
            raise AssertionError(mode)
    except LoraccError as e:
        return Cell(ex.name, mode, refusal=str(e).splitlines()[0])
    return Cell(ex.name, mode, error=error)


# --------------------------------------------------------------------------------------------
# The rows


def _torch_rows(work: Path) -> list[Exporter]:
    spec = po.CaseSpec(
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = po.build_case("deploy", work / "case", spec)
        ts = te.export_torchscript(case, work / "torchscript.onnx")
        dyn = te.export_dynamo(case, work / "dynamo.onnx")

    def feeds(specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
        return te._feeds(case, [s.name for s in specs])

    def foreign(model: Path, folder: Path) -> Path:
        return olive_style_file(case.adapter_dir, folder / "olive.onnx_adapter")

    common = dict(
        adapter=case.adapter_dir,
        reference=case.peft_logits.double().numpy(),
        base_reference=case.base_logits.double().numpy(),
        feeds=feeds,
        tolerance=FP32_TOLERANCE,
        why_tolerance="fp32 graph vs PEFT's fp32 forward",
        foreign=foreign,
    )
    return [
        Exporter("torch.onnx TorchScript", ts, **common),  # type: ignore[arg-type]
        Exporter("torch.onnx dynamo", dyn, **common),  # type: ignore[arg-type]
    ]


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _decoder_rows() -> list[Exporter]:
    rows = []
    optimum = FIXTURES / "optimum_llama"
    expected = _npz(optimum / "expected.npz")
    ids = expected["input_ids"]

    def feeds(specs: Sequence[TensorSpec], ids: np.ndarray = ids) -> dict[str, np.ndarray]:
        return llm_feeds(specs, ids)

    def foreign_for(adapter: Path, dtype: type = np.float32) -> Callable[[Path, Path], Path]:
        return lambda model, folder: olive_style_file(
            adapter, folder / "olive.onnx_adapter", dtype=dtype
        )

    for export, label in (("past", "with past"), ("nopast", "without past")):
        rows.append(
            Exporter(
                f"optimum {label}",
                optimum / export / "model.onnx",
                optimum / "adapters/lora",
                expected["lora"],
                expected["base"],
                feeds,
                1e-5,
                "fp32 graph vs PEFT's float64 forward",
                foreign_for(optimum / "adapters/lora"),
            )
        )
    genai = FIXTURES / "genai_llama"
    expected = _npz(genai / "expected.npz")
    int4 = _npz(genai / "expected_int4.npz")
    ids = expected["input_ids"]

    config = json.loads((genai / "genai" / "genai_config.json").read_text())

    def genai_feeds(specs: Sequence[TensorSpec], ids: np.ndarray = ids) -> dict[str, np.ndarray]:
        return llm_feeds(specs, ids, config["model"]["decoder"]["head_size"])

    adapter = genai / "adapters" / "lora_attn"
    fp32_why = "fp32 graph vs PEFT's float64 forward"
    fp16_why = "fp16 graph vs PEFT's float64 forward; the fp16 base alone is 7.4e-4 off"
    int4_why = (
        "int4 MatMulNBits, accuracy_level 4 (int8 activations), vs PEFT on the float model "
        "holding the dequantized int4 weights; the int4 base alone is 8.4e-3 off"
    )
    requantized = (
        expected["lora_attn"], 0.25,
        "merged and requantized to int4 (block 32, asymmetric), vs PEFT on the float model: "
        "the int4 base alone is 0.12 off the float base",
    )  # fmt: skip
    builder_names = "Invalid input name: model.layers.0.self_attn.*loracc pack --model"
    for folder, label, ref, tolerance, why in (
        ("genai", "fp32", expected, 1e-5, fp32_why),
        ("genai_fp16", "fp16", expected, 2e-3, fp16_why),
        ("genai_int4", "int4", int4, 2e-2, int4_why),
    ):
        fp16 = folder == "genai_fp16"
        rows.append(
            Exporter(
                f"genai builder {label}",
                genai / folder / "model.onnx",
                adapter,
                ref["lora_attn"],
                ref["base"],
                genai_feeds,
                tolerance,
                why,
                foreign_for(adapter, np.float16 if fp16 else np.float32),
                # fused qkv_proj slots (fp32, int4): the file's q/v names are not the model's
                {} if fp16 else {"foreign file": builder_names},
                {"merged": requantized} if folder == "genai_int4" else {},
            )
        )
    return rows


def _olive_rows() -> list[Exporter]:
    ref = _npz(FIXTURES / "olive_adapters" / "reference.npz")

    def feeds(specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
        return {specs[0].name: ref["x"]}

    def olive_file(folder: str) -> Callable[[Path, Path], Path]:
        return lambda model, work: FIXTURES / folder / "adapter_weights.onnx_adapter"

    rows = []
    for folder, label in (("olive_dynamo", "dynamo"), ("olive_torchscript", "TorchScript")):
        rows.append(
            Exporter(
                f"Olive capture ({label})",
                FIXTURES / folder / "model.onnx",
                FIXTURES / "olive_adapters" / "all",
                ref["all"],
                ref["base"],
                feeds,
                1e-5,
                "fp32 graph vs PEFT's fp32 forward (abs values ~1)",
                olive_file(folder),
                slotted=True,
            )
        )
    return rows


def exporters(work: Path) -> list[Exporter]:
    """Every row; the torch.onnx models are exported into ``work``."""
    return [*_torch_rows(work), *_decoder_rows(), *_olive_rows()]


def row_names() -> list[str]:
    """The rows' names without building anything (for the doc check)."""
    return [
        "torch.onnx TorchScript", "torch.onnx dynamo", "optimum with past",
        "optimum without past", "genai builder fp32", "genai builder fp16", "genai builder int4",
        "Olive capture (dynamo)", "Olive capture (TorchScript)",
    ]  # fmt: skip


def table(cells: Sequence[Cell], rows: Sequence[Exporter]) -> str:
    """The matrix as a Markdown table: each cell's error vs PEFT, or "refused"."""
    by = {(c.exporter, c.mode): c for c in cells}
    lines = [
        "| exporter | " + " | ".join(MODES) + " | tolerance |",
        "|---|" + "---|" * (len(MODES) + 1),
    ]
    for ex in rows:
        row = []
        for mode in MODES:
            c = by[ex.name, mode]
            row.append("refused" if c.refusal is not None else f"{c.error:.1e}")
        tolerance = f"{ex.tolerance:.0e}" + "".join(
            f"; {mode}: {t:.2g}" for mode, (_, t, _) in ex.overrides.items()
        )
        lines.append(f"| {ex.name} | " + " | ".join(row) + f" | {tolerance} |")
    return "\n".join(lines)
