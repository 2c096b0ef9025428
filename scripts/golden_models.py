"""The project's model-output golden cases: tiny bases + PEFT adapters + PEFT's logits.

Each case under ``golden/models/<case>/`` is a few hundred KB:

* ``base/``: a seeded tiny Hugging Face model (config.json + model.safetensors),
* ``adapter/``: a PEFT LoRA adapter saved with ``save_pretrained`` (random, non-zero factors),
* ``inputs.npz``: ``input_ids`` (int64, batch 2 x 12 tokens inside the vocabulary),
* ``expected.npz``: the oracle, computed by PEFT and transformers, never by loracc:
  ``peft_logits`` (the *unmerged* ``PeftModel`` forward, eval mode) and ``base_logits``,
* ``case.json``: what the case is, its tolerance and the library versions that produced it.

``regen(...)`` rebuilds the files; ``check_cases(...)`` compares loracc's artifacts with them:

* ``merge``: ``loracc.merge`` into a temporary folder, loaded back with transformers; its logits
  must match ``peft_logits`` within the case's tolerance (``max|got - ref| / max|ref|``);
* ``oracle``: the checked-in base + adapter run through today's PEFT must still give
  ``peft_logits`` (so an upgrade of PEFT or transformers that changes the oracle is caught
  instead of silently moving the goalposts);
* ONNX (``export``, ``keep-lora``) once ``loracc.api.onnx`` exists: see :func:`_check_onnx`.

Used by ``scripts/regen_golden.py`` through :func:`suite`, and by tests/e2e/test_golden_models.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = ROOT / "golden" / "models"
VOCAB = 128
MAX_CASE_BYTES = 600_000  # "a few hundred KB" per case
# Today's PEFT vs the checked-in expected logits, relative to max|logit|. fp32 CPU math agrees to
# rounding; bf16 matmuls take different kernels by CPU (AVX-512-BF16, AVX2, plain AVX), whose
# results differ by up to one bf16 step (2**-7 relative) of the largest logit.
ORACLE_RTOL = {"float32": 1e-6, "bfloat16": 2.0**-7}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

__all__ = [
    "CASES",
    "GOLDEN_DIR",
    "CaseDef",
    "case_differences",
    "check_cases",
    "regen",
    "reproduce",
    "suite",
]


@dataclass(frozen=True)
class CaseDef:
    """One golden case: base architecture and dtype, PEFT LoraConfig kwargs, tolerances."""

    arch: str  # "llama" or "gpt2"
    lora: Mapping[str, Any]
    dtype: str = "float32"
    seed: int = 0
    # max|loracc - PEFT| / max|PEFT| allowed for the merged model's logits.
    merge_rtol: float = 1e-5
    # The same for loracc's ONNX artifacts (merged export, keep-lora model + adapter, pack).
    onnx_rtol: float = 1e-5
    notes: tuple[str, ...] = field(default_factory=tuple)


_ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES: dict[str, CaseDef] = {
    # Plain LoRA on every projection of a 2-layer Llama, fp32.
    "llama_fp32": CaseDef("llama", dict(r=4, lora_alpha=8, target_modules=_ALL_LLAMA), seed=0),
    # GPT-2 Conv1D weights (stored (in, out)), tied wte / lm_head.
    "gpt2_fp32": CaseDef(
        "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]), seed=1
    ),
    # bf16 base, rsLoRA scale (alpha / sqrt(r)); the merge rounds W + dW to bf16 once.
    "llama_bf16_rslora": CaseDef(
        "llama",
        dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        dtype="bfloat16",
        seed=2,
        merge_rtol=3e-2,
        notes=(
            "bf16: logits of the merged model differ from the unmerged forward by rounding",
            "no ONNX artifacts: base.onnx is exported for the fp32 cases only",
        ),
    ),
}


# --------------------------------------------------------------------------------------------
# Tiny models (transformers / peft are imported lazily: loracc itself never imports them)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _config(arch: str) -> Any:
    if arch == "llama":
        from transformers import LlamaConfig

        from tests.support.peft_oracle import TINY_DECODER

        return LlamaConfig(**{**TINY_DECODER, "vocab_size": VOCAB})
    if arch == "gpt2":
        from tests.support.peft_oracle import gpt2_config

        return gpt2_config(tie=True)
    raise ValueError(f"unknown arch {arch}")


def _seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_causal_lm(folder: Path, dtype: str) -> Any:
    """A HF folder as an eval-mode causal LM; fails on missing or unexpected keys."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=_torch_dtype(dtype), output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise RuntimeError(f"loading {folder}: {info}")
    return model.eval()


def logits(model: Any, input_ids: np.ndarray) -> np.ndarray:
    """fp32 logits, no KV cache."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(input_ids), use_cache=False).logits
    return out.float().numpy().copy()


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (inf when shapes differ or got is not finite)."""
    if got.shape != ref.shape or not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def peft_logits(base_dir: Path, adapter_dir: Path, dtype: str, input_ids: np.ndarray) -> Any:
    """The oracle: the unmerged PeftModel forward from the folders on disk."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base_dir, dtype), str(adapter_dir))
    return logits(model.eval(), input_ids)


# --------------------------------------------------------------------------------------------
# Regenerate


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def build_case(name: str, case: CaseDef, out: Path) -> None:
    """Write ``out/{base,adapter,inputs.npz,expected.npz,case.json}`` for ``case``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if out.exists():
        shutil.rmtree(out)
    base_dir, adapter_dir = out / "base", out / "adapter"
    dtype = _torch_dtype(case.dtype)

    _seed(case.seed)
    model = AutoModelForCausalLM.from_config(_config(case.arch), dtype=torch.float32)
    with torch.no_grad():  # every parameter moved off its init (biases, norms too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).save_pretrained(str(base_dir))
    (base_dir / "generation_config.json").unlink(missing_ok=True)
    _edit_json(base_dir / "config.json", lambda c: c.pop("transformers_version", None))

    _seed(case.seed + 1000)
    model = load_causal_lm(base_dir, case.dtype)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **dict(case.lora)))
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)
    _edit_json(adapter_dir / "adapter_config.json", lambda c: _portable_adapter_config(c, name))

    gen = torch.Generator().manual_seed(1234 + case.seed)
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=gen).numpy()
    np.savez_compressed(out / "inputs.npz", input_ids=input_ids)

    # The oracle, recomputed from disk only.
    expected = {
        "peft_logits": peft_logits(base_dir, adapter_dir, case.dtype, input_ids),
        "base_logits": logits(load_causal_lm(base_dir, case.dtype), input_ids),
    }
    np.savez_compressed(out / "expected.npz", **expected)
    effect = rel_err(expected["peft_logits"], expected["base_logits"])
    meta = {
        "case": name,
        "arch": case.arch,
        "dtype": case.dtype,
        "lora": dict(case.lora),
        "merge_rtol": case.merge_rtol,
        "onnx_rtol": case.onnx_rtol,
        "adapter_effect": effect,  # max|PEFT - base| / max|PEFT|: the adapter matters
        "produced_by": _versions(),
        "notes": list(case.notes),
    }
    (out / "case.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if case.dtype == "float32":  # ONNX cases: the exported base, for export/keep-lora/pack
        _export_base_onnx(base_dir, out / "base.onnx", input_ids)


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    """Apply ``edit`` to the JSON object in ``path`` and write it back sorted, 2-space indented."""
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _portable_adapter_config(config: dict[str, Any], name: str) -> None:
    """The same bytes wherever and whenever the case is built.

    PEFT writes target_modules from a set (its order varies by process) and the base's path as
    given, here a scratch folder under the build location: name the base by its place in the
    checkout instead. transformers writes its version into config.json; that is dropped by the
    caller (case.json records the versions).
    """
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = f"golden/models/{name}/base"


def regen(names: list[str] | None = None, root: Path = GOLDEN_DIR) -> list[str]:
    """Rebuild the named cases (all by default); returns problems (sizes over budget).

    Each case is built in a scratch folder beside it and swapped in whole, so a concurrent
    check never sees half a case. A case whose content is unchanged (:func:`case_differences`
    finds nothing: logits within the oracle tolerance, only the library versions differ) keeps
    its files, so regenerating elsewhere or with another transformers release changes nothing.
    """
    problems: list[str] = []
    for name in names or list(CASES):
        out = root / name
        scratch = root / f".{name}.building"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_case(name, CASES[name], scratch)
        if out.exists() and not case_differences(out, scratch):
            shutil.rmtree(scratch)  # same content: keep the checked-in bytes
            continue
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        scratch.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        size = _case_bytes(out)
        if size > MAX_CASE_BYTES:
            problems.append(f"golden/models/{name}: {size} bytes > {MAX_CASE_BYTES}")
    return problems


def case_differences(old: Path, new: Path) -> list[str]:
    """What differs in content between two builds of one case (empty: the same case).

    Files are compared byte for byte, except ``expected.npz`` (logits within
    :data:`ORACLE_RTOL`: the CPU's kernels and the library versions move the last bits),
    ``base.onnx`` (the same logits within that tolerance: another exporter release may write
    another graph for the same function), and ``case.json`` (the same except
    ``produced_by``, the versions that built it, and ``adapter_effect`` to 1e-6).
    """

    def files(folder: Path) -> set[str]:
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}

    meta = json.loads((new / "case.json").read_text())
    tol = ORACLE_RTOL[meta["dtype"]]
    diffs = [f"{f}: only in one build" for f in sorted(files(old) ^ files(new))]
    for rel in sorted(files(old) & files(new)):
        a, b = old / rel, new / rel
        if a.read_bytes() == b.read_bytes():
            continue
        if rel == "expected.npz":
            with np.load(a) as za, np.load(b) as zb:
                same = set(za.files) == set(zb.files) and all(
                    rel_err(zb[k], za[k]) <= tol for k in za.files
                )
        elif rel == "base.onnx":
            with np.load(new / "inputs.npz") as z:
                ids = z["input_ids"]
            same = rel_err(_ort_logits(b, ids), _ort_logits(a, ids)) <= tol
        elif rel == "case.json":
            ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
            effect = abs(ma.pop("adapter_effect") - mb.pop("adapter_effect")) <= 1e-6
            ma.pop("produced_by"), mb.pop("produced_by")
            same = effect and ma == mb
        else:
            same = False
        if not same:
            diffs.append(f"{rel}: content differs")
    return diffs


def reproduce(names: list[str] | None = None, root: Path = GOLDEN_DIR) -> list[str]:
    """Rebuild each case in a scratch folder elsewhere and compare it with ``root``'s: what
    regenerating would change (empty: the checked-in cases are what this script writes)."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="loracc-golden-rebuild-") as tmp:
        for name in names or list(CASES):
            scratch = Path(tmp) / name
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_case(name, CASES[name], scratch)
            if not (root / name).exists():
                problems.append(f"golden/models/{name}: missing (run scripts/regen_golden.py)")
                continue
            problems += [
                f"golden/models/{name}/{d}: regenerating changes it (run scripts/regen_golden.py)"
                for d in case_differences(root / name, scratch)
            ]
    return problems


def _case_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Check


Merger = Callable[[Path, Path, Path], None]


def _loracc_merge(base: Path, adapter: Path, out: Path) -> None:
    import loracc

    loracc.merge(str(base), str(adapter), str(out))


def check_cases(
    names: list[str] | None = None,
    root: Path = GOLDEN_DIR,
    *,
    merge: Merger = _loracc_merge,
    oracle: bool = True,
) -> list[str]:
    """Compare loracc's artifacts with PEFT's expected logits; returns the problems found.

    ``merge`` is injectable so a test can prove that a drifting merge is caught.
    """
    problems: list[str] = []
    cases = sorted(p.name for p in root.iterdir() if (p / "case.json").exists())
    for name in names or [c for c in cases if not c.startswith(".")]:
        case_dir = root / name
        if not (case_dir / "case.json").exists():
            problems.append(f"golden/models/{name}: missing (run scripts/regen_golden.py)")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            problems += [f"models/{name}: {p}" for p in _check_case(case_dir, merge, oracle)]
    return problems


def _check_case(case_dir: Path, merge: Merger, oracle: bool) -> list[str]:
    meta = json.loads((case_dir / "case.json").read_text())
    with np.load(case_dir / "inputs.npz") as z:
        input_ids = z["input_ids"]
    with np.load(case_dir / "expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    ref = expected["peft_logits"]
    problems: list[str] = []
    base_dir, adapter_dir = case_dir / "base", case_dir / "adapter"
    size = _case_bytes(case_dir)
    if size > MAX_CASE_BYTES:
        problems.append(f"{size} bytes > {MAX_CASE_BYTES}")
    if oracle:
        err = rel_err(peft_logits(base_dir, adapter_dir, meta["dtype"], input_ids), ref)
        tol = ORACLE_RTOL[meta["dtype"]]
        if err > tol:
            problems.append(
                f"oracle: today's PEFT gives logits {err:.3g} away from expected.npz "
                f"(> {tol:g}); PEFT/transformers changed? inspect, then regenerate"
            )
    with tempfile.TemporaryDirectory(prefix="loracc-golden-") as tmp:
        out = Path(tmp) / "merged"
        try:
            merge(base_dir, adapter_dir, out)
            got = logits(load_causal_lm(out, meta["dtype"]), input_ids)
        except Exception as e:  # report, keep checking the other cases
            problems.append(f"merge: {type(e).__name__}: {e}")
        else:
            err = rel_err(got, ref)
            if err > meta["merge_rtol"]:
                problems.append(
                    f"merge: logits differ from PEFT's by {err:.3g} (> {meta['merge_rtol']:g}, "
                    f"max|ref| {np.abs(ref).max():.3g})"
                )
        problems += _check_onnx(case_dir, meta, input_ids, expected, Path(tmp))
    return problems


# --------------------------------------------------------------------------------------------
# ONNX (export, keep-lora): active once loracc.api.onnx lands


def _has_onnx_export() -> bool:
    try:
        import loracc.api.onnx  # noqa: F401
    except ImportError:
        return False
    return True


# Node metadata the binder reads (module paths); the rest (stack traces, fx nodes) is dropped
# to keep the checked-in graph small. Value metadata (``folded_from``) is kept whole.
_KEEP_NODE_METADATA = ("pkg.torch.onnx.name_scopes",)
ONNX_IR_VERSION = 10  # onnx 1.23 writes IR 14; the onnxruntime here reads <= 13


def _export_base_onnx(base_dir: Path, path: Path, input_ids: np.ndarray) -> None:
    """``torch.onnx.export(dynamo=True)`` of the fp32 base, dynamic batch and sequence, weights
    inline (a single file)."""
    import onnx
    import torch

    model = load_causal_lm(base_dir, "float32")
    model.config.use_cache = False
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    with tempfile.TemporaryDirectory(prefix="loracc-export-") as tmp:
        raw = Path(tmp) / "base.onnx"
        torch.onnx.export(
            model,
            (),
            str(raw),
            kwargs={"input_ids": torch.from_numpy(input_ids)},
            input_names=["input_ids"],
            output_names=["logits"],
            dynamo=True,
            dynamic_shapes={"input_ids": dims},
            verbose=False,
        )
        proto = onnx.load(str(raw))  # pulls the external data in
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key in _KEEP_NODE_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    proto.ir_version = min(proto.ir_version, ONNX_IR_VERSION)
    onnx.save(proto, str(path))
    got = _ort_logits(path, input_ids)
    want = logits(load_causal_lm(base_dir, "float32"), input_ids)
    if rel_err(got, want) > 1e-5:
        raise RuntimeError(f"{path}: the exported base does not reproduce transformers' logits")


def _ort_logits(model: Path, input_ids: np.ndarray, adapter: Path | None = None) -> np.ndarray:
    """onnxruntime (CPU) logits of ``model``, with ``adapter`` active when given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    run_options = None
    lora = None
    if adapter is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(lora)  # ``lora`` must outlive the run
    feeds = {i.name: input_ids for i in sess.get_inputs()}
    out = sess.run(["logits"], feeds, run_options)[0]
    del lora
    return np.asarray(out)


def _check_onnx(
    case_dir: Path,
    meta: Mapping[str, Any],
    input_ids: np.ndarray,
    expected: Mapping[str, np.ndarray],
    tmp: Path,
) -> list[str]:
    """loracc's ONNX artifacts of the case against PEFT's logits.

    * ``export``: ``export_onnx`` merged into ``base.onnx`` -> ``peft_logits``;
    * ``keep-lora``: ``export_onnx(keep_lora=True, empty_slots=True)``: with its adapter file
      active -> ``peft_logits``; with no adapter -> ``base_logits``;
    * ``pack``: ``pack`` of the adapter for that model with slots -> ``peft_logits``.
    """
    base_onnx = case_dir / "base.onnx"
    if not base_onnx.exists():
        return []
    if not _has_onnx_export():
        return ["onnx: base.onnx is checked in but loracc.api.onnx is missing"]
    from loracc.api.onnx import export_onnx
    from loracc.api.packing import pack

    base_dir, adapter_dir = case_dir / "base", case_dir / "adapter"
    rtol = float(meta["onnx_rtol"])
    problems: list[str] = []

    def compare(what: str, run: Callable[[], np.ndarray], ref: np.ndarray) -> None:
        try:
            got = run()
        except Exception as e:  # report, keep checking the rest
            problems.append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0]}")
            return
        err = rel_err(got, ref)
        if err > rtol:
            problems.append(f"{what}: logits differ from the reference by {err:.3g} (> {rtol:g})")

    peft_ref, base_ref = expected["peft_logits"], expected["base_logits"]
    merged = tmp / "merged.onnx"

    def export_merged() -> np.ndarray:
        export_onnx(base_onnx, adapter_dir, merged, base_weights=base_dir)
        return _ort_logits(merged, input_ids)

    compare("onnx export (merged)", export_merged, peft_ref)

    slots = tmp / "slots.onnx"
    files: list[Path] = []

    def export_slots(active: bool) -> np.ndarray:
        if not files:
            report = export_onnx(
                base_onnx,
                adapter_dir,
                slots,
                keep_lora=True,
                empty_slots=True,
                base_weights=base_dir,
            )
            files.append(Path(report.adapter_files[0]["file"]))
        return _ort_logits(slots, input_ids, files[0] if active else None)

    compare("onnx export --keep-lora, adapter active", lambda: export_slots(True), peft_ref)
    compare("onnx export --keep-lora, no adapter", lambda: export_slots(False), base_ref)

    def packed() -> np.ndarray:
        if not slots.exists():
            raise RuntimeError("no model with slots to pack for")
        out = tmp / "packed.onnx_adapter"
        pack(slots, adapter_dir, out, base_weights=base_dir)
        return _ort_logits(slots, input_ids, out)

    compare("onnx pack, adapter active", packed, peft_ref)
    return problems


# --------------------------------------------------------------------------------------------
# scripts/regen_golden.py entry point


def suite(check: bool) -> list[str]:
    """Check (``check`` True: loracc against the cases, and the cases against a rebuild) or
    regenerate every model case; returns the problems found."""
    return check_cases() + reproduce() if check else regen()


def main(argv: list[str]) -> int:
    problems = suite("--check" in argv)
    for p in problems:
        print(f"golden: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
