"""Golden-output regression checks: record what an approved artifact produces, check it later.

Two kinds of artifact:

* **ONNX model** (a ``.onnx`` file, or a folder holding one, optionally with an
  ``.onnx_adapter``): deterministic inputs (from an ``.npz`` file, or generated from the graph's
  input specs with a seed) are run with onnxruntime on the chosen providers
  (:mod:`loracc.runner`). The golden stores the inputs, the outputs, the graph's input/output
  specs, the providers, library versions and the model's (and adapter's) fingerprint. ``check``
  reruns the stored inputs and compares every output element with
  ``|got - ref| <= atol + rtol * |ref|``.
* **Merged Hugging Face folder** (safetensors): per tensor a sha256 of its stored bytes, summary
  statistics (mean, std, min, max, abs-max, L2 norm, non-finite count) and a fixed sample of up
  to :data:`SAMPLE_SIZE` values; plus ``config.json``. ``check`` passes when every digest is
  identical or, when a tolerance is asked for, when the statistics and the sample agree within
  it (a merge on another device may differ in the last bit).

A golden file is an ``.npz``: ``__golden__`` holds the metadata as UTF-8 JSON bytes; arrays are
``input/<name>``, ``output/<name>`` (ONNX) and ``sample/<tensor>`` (HF). bfloat16 values are
stored widened to float32, which is exact; the metadata keeps the real dtype, so tolerances
default by the real dtype (:data:`DEFAULT_TOLERANCES`).

Outcomes: a passing check, a regression (``CheckReport.passed`` is False: the CLI exits 1), or a
:class:`~loracc.errors.LoraccError` for bad input (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loracc import runner
from loracc.errors import FormatError, InputError, OutputError
from loracc.io import ort as ort_io
from loracc.io.ort import TensorSpec
from loracc.io.output import check_output

__all__ = [
    "DEFAULT_TOLERANCES",
    "GOLDEN_FORMAT",
    "SAMPLE_SIZE",
    "CheckReport",
    "Comparison",
    "check",
    "compare_arrays",
    "model_kind",
    "read_golden",
    "record",
    "tolerance",
]

GOLDEN_FORMAT = 1
META_KEY = "__golden__"
SAMPLE_SIZE = 256
# (rtol, atol) by dtype; integer and boolean outputs compare exactly unless told otherwise.
DEFAULT_TOLERANCES: Mapping[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (1.6e-2, 1e-2),
}
# config.json keys that change with the tool that wrote the folder, not with the model.
_CONFIG_IGNORED = ("transformers_version", "_name_or_path")
_STAT_CHUNK = 1 << 22


def tolerance(
    dtype: str, rtol: float | None = None, atol: float | None = None
) -> tuple[float, float]:
    """(rtol, atol) for ``dtype``: the given ones, else the dtype's default (exact for ints)."""
    d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))
    return (d_rtol if rtol is None else rtol, d_atol if atol is None else atol)


# --------------------------------------------------------------------------------------------
# Reports


@dataclass
class Comparison:
    """One output (ONNX) or tensor (HF) against its golden value."""

    name: str
    dtype: str
    shape: list[int]
    passed: bool
    rtol: float
    atol: float
    max_abs: float | None = None
    max_abs_at: list[int] | None = None
    max_rel: float | None = None
    max_rel_at: list[int] | None = None
    mismatched: int = 0
    total: int = 0
    problem: str | None = None  # why it failed beyond the numbers (shape, dtype, digest, ...)

    def describe(self) -> str:
        head = f"{'ok  ' if self.passed else 'FAIL'} {self.name} {self.dtype}{self.shape}"
        parts = [head]
        if self.max_abs is not None:
            parts.append(f"max abs err {self.max_abs:.3g} at {_at(self.max_abs_at)}")
            parts.append(f"max rel err {self.max_rel:.3g} at {_at(self.max_rel_at)}")
            parts.append(f"(rtol {self.rtol:g}, atol {self.atol:g}")
            parts[-1] += f"; {self.mismatched}/{self.total} outside)" if self.mismatched else ")"
        if self.problem:
            parts.append(f"- {self.problem}")
        return "  ".join(parts)


def _at(index: list[int] | None) -> str:
    return "-" if index is None else "[" + ",".join(map(str, index)) + "]"


@dataclass
class CheckReport:
    """What ``check`` found; ``passed`` decides the exit code."""

    kind: str
    model: str
    golden: str
    passed: bool
    providers: list[str] = field(default_factory=list)
    recorded_providers: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, verbose: bool = True) -> str:
        lines = [f"golden check: {self.model} against {self.golden} ({self.kind})"]
        if self.providers:
            lines.append(
                f"  providers: {', '.join(self.providers)} "
                f"(recorded on {', '.join(self.recorded_providers) or '-'})"
            )
        lines += [f"  note: {n}" for n in self.notes]
        shown = [c for c in self.comparisons if verbose or not c.passed]
        lines += [f"  {c.describe()}" for c in shown]
        if len(shown) < len(self.comparisons):
            lines.append(f"  ({len(self.comparisons) - len(shown)} more match; -v lists them)")
        lines += [f"  REGRESSION: {p}" for p in self.problems]
        failed = [c.name for c in self.comparisons if not c.passed]
        if self.passed:
            lines.append(f"PASS: {len(self.comparisons)} {self._unit()} match the golden")
        else:
            what = f"{len(failed)} of {len(self.comparisons)} {self._unit()} differ"
            if self.problems and not failed:
                what = f"{len(self.problems)} problem(s)"
            lines.append(f"FAIL: {what}")
        return "\n".join(lines)

    def _unit(self) -> str:
        return "outputs" if self.kind == "onnx" else "tensors"


# --------------------------------------------------------------------------------------------
# Array comparison


def compare_arrays(
    name: str, got: np.ndarray, ref: np.ndarray, dtype: str, rtol: float, atol: float
) -> Comparison:
    """Element-wise ``|got - ref| <= atol + rtol * |ref|``; NaN matches NaN, inf matches itself.

    The report gives the largest absolute error and the largest relative error
    (``|got - ref| / |ref|``, infinite where ``ref`` is 0 and ``got`` is not) with their indices.
    """
    shape = list(ref.shape)
    if got.shape != ref.shape:
        return Comparison(
            name,
            dtype,
            shape,
            False,
            rtol,
            atol,
            problem=f"shape changed: golden {list(ref.shape)}, now {list(got.shape)}",
        )
    total = int(ref.size)
    if total == 0:
        return Comparison(name, dtype, shape, True, rtol, atol, total=0)
    g, r0 = got.astype(np.float64), ref.astype(np.float64)
    with np.errstate(all="ignore"):
        d = np.abs(g - r0)
    if ref.dtype.kind in "biu" and got.dtype.kind in "biu":
        d[(got != ref) & (d == 0)] = 1.0  # 64-bit integers that float64 cannot tell apart
    d[(np.isnan(g) & np.isnan(r0)) | (np.isinf(g) & (g == r0))] = 0.0
    d[np.isnan(d)] = np.inf
    r = np.abs(r0)
    with np.errstate(all="ignore"):
        rel = np.where(r > 0, d / r, np.where(d > 0, np.inf, 0.0))
        bad = (d > atol + rtol * r) | np.isinf(d)
    rel[np.isnan(rel)] = np.inf
    i_abs = np.unravel_index(int(np.argmax(d)), d.shape)
    i_rel = np.unravel_index(int(np.argmax(rel)), rel.shape)
    mismatched = int(bad.sum())
    return Comparison(
        name,
        dtype,
        shape,
        mismatched == 0,
        rtol,
        atol,
        max_abs=float(d[i_abs]),
        max_abs_at=[int(i) for i in i_abs],
        max_rel=float(rel[i_rel]),
        max_rel_at=[int(i) for i in i_rel],
        mismatched=mismatched,
        total=total,
    )


# --------------------------------------------------------------------------------------------
# Golden files


def model_kind(model: str | os.PathLike[str]) -> str:
    """``"onnx"`` for a ``.onnx`` file or a folder with one and no safetensors, ``"hf"`` for a
    Hugging Face safetensors folder."""
    p = Path(model)
    if p.is_file():
        if p.suffix in (".safetensors", ".json"):
            raise InputError(f"{p}: pass the Hugging Face folder, not one of its files")
        return "onnx"
    if p.is_dir():
        if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists():
            return "hf"
        if any(p.glob("*.onnx")):
            return "onnx"
        raise InputError(f"{p}: neither an ONNX model nor a Hugging Face safetensors folder")
    raise InputError(f"{p}: model not found")


def _versions(kind: str) -> dict[str, str]:
    from importlib import metadata

    out = {
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "numpy": np.__version__,
    }
    try:
        out["loracc"] = metadata.version("loracc")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        out["loracc"] = "unknown"
    if kind == "onnx":
        out["onnxruntime"] = ort_io.version()
    return out


def _write(
    path: Path,
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    inputs: Sequence[Path],
    force: bool,
) -> None:
    blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    runner.save_npz(path, {META_KEY: blob, **arrays}, inputs=inputs, force=force)


def read_golden(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, arrays) of a golden file, or an :class:`InputError` naming what is wrong."""
    p = Path(path)
    arrays = runner.load_npz(p, what="golden")
    blob = arrays.pop(META_KEY, None)
    if blob is None:
        raise FormatError(f"{p}: not a loracc golden file (no {META_KEY} entry)")
    try:
        meta = json.loads(bytes(blob.astype(np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: {META_KEY} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != GOLDEN_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise FormatError(
            f"{p}: golden format {got!r}; this loracc reads format {GOLDEN_FORMAT} (re-record it)"
        )
    if meta.get("kind") not in ("onnx", "hf"):
        raise FormatError(f"{p}: unknown golden kind {meta.get('kind')!r}")
    return meta, arrays


def _check_output_path(out: Path, inputs: Sequence[Path], force: bool) -> None:
    check_output(out, inputs, force=force)
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; the golden is one .npz file")


# --------------------------------------------------------------------------------------------
# Record


def record(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    dims: Mapping[str, int] | None = None,
    providers: str | Sequence[str] = "cpu",
    force: bool = False,
) -> dict[str, Any]:
    """Record the golden of ``model`` into ``out`` and return its metadata.

    For ONNX, ``inputs`` (an ``.npz``) or ``seed`` + ``dims`` choose the inputs (seed 0 when
    neither is given). For a HF folder none of ``adapter``, ``inputs``, ``seed``, ``dims`` apply.
    """
    out_path = Path(out)
    kind = model_kind(model)
    read = [Path(model)] if kind == "hf" else runner.input_files(model, adapter, inputs)
    _check_output_path(out_path, read, force)
    if kind == "hf":
        given = [
            n
            for n, v in (("--adapter", adapter), ("--inputs", inputs), ("--seed", seed))
            if v is not None
        ] + (["--dim"] if dims else [])
        if given:
            raise InputError(
                f"{model}: {', '.join(given)} apply to ONNX models; a Hugging Face folder is "
                "recorded by tensor digests"
            )
        meta, arrays = _record_hf(Path(model))
    else:
        if inputs is not None and (seed is not None or dims):
            raise InputError("give either --inputs or --seed/--dim, not both")
        meta, arrays = _record_onnx(model, adapter, inputs, seed, dims, providers)
    _write(out_path, meta, arrays, read, force)
    return meta


def _record_onnx(
    model: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | None,
    inputs: str | os.PathLike[str] | None,
    seed: int | None,
    dims: Mapping[str, int] | None,
    providers: str | Sequence[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    sess = runner.open_session(model, providers, adapter=adapter)
    if inputs is not None:
        feeds = runner.load_npz(inputs)
        source: dict[str, Any] = {"file": Path(inputs).name}
    else:
        seed = 0 if seed is None else seed
        feeds = runner.generate_inputs(sess, seed=seed, dims=dims)
        source = {"seed": seed, "dims": dict(dims or {})}
    outputs = sess.run(feeds)
    for s in sess.inputs:  # store bf16 inputs as the float32 of the values fed
        if s.dtype == "bfloat16" and feeds[s.name].dtype == np.uint16:
            feeds[s.name] = ort_io.from_bf16_bits(feeds[s.name])
    meta: dict[str, Any] = {
        "format": GOLDEN_FORMAT,
        "kind": "onnx",
        "model": {"file": sess.path.name, "fingerprint": runner.model_fingerprint(sess.path)},
        "adapter": None
        if sess.adapter is None
        else {"file": sess.adapter.name, "fingerprint": runner.file_digest(sess.adapter)},
        "providers": list(sess.providers),
        "requested_providers": list(sess.requested),
        "inputs": [s.to_dict() for s in sess.inputs],
        "outputs": [s.to_dict() for s in sess.outputs],
        "input_source": source,
        "versions": _versions("onnx"),
        "notes": list(sess.notes),
    }
    arrays = {f"input/{k}": v for k, v in feeds.items()}
    arrays.update({f"output/{k}": v for k, v in outputs.items()})
    return meta, arrays


def _record_hf(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    tensors, samples = _hf_tensors(folder)
    config = _hf_config(folder)
    meta: dict[str, Any] = {
        "format": GOLDEN_FORMAT,
        "kind": "hf",
        "model": {"folder": folder.name, "fingerprint": _hf_fingerprint(tensors, config)},
        "config": config,
        "tensors": tensors,
        "versions": _versions("hf"),
    }
    return meta, {f"sample/{k}": v for k, v in samples.items()}


# --------------------------------------------------------------------------------------------
# HF folder digests


def sample_indices(numel: int, k: int = SAMPLE_SIZE) -> np.ndarray:
    """Up to ``k`` flat indices spread evenly over ``numel`` elements (first and last included)."""
    if numel <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, numel - 1, min(numel, k)).round().astype(np.int64))


def _hf_tensors(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    import torch

    from loracc.io.checkpoint import Checkpoint
    from loracc.io.safetensors import dtype_name, read_tensor

    ckpt = Checkpoint(folder)
    tensors: dict[str, Any] = {}
    samples: dict[str, np.ndarray] = {}
    for name in sorted(ckpt.keys()):
        info = ckpt.info(name)
        t = read_tensor(info)
        flat = t.reshape(-1)
        digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        idx = sample_indices(flat.numel())
        samples[name] = flat[torch.from_numpy(idx)].double().numpy()
        tensors[name] = {
            "dtype": _torch_dtype(t.dtype, dtype_name(t.dtype)),
            "shape": list(info.shape),
            "sha256": digest.hexdigest(),
            "stats": _stats(flat),
        }
    return tensors, samples


def _torch_dtype(dtype: Any, st_name: str) -> str:
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return names.get(st_name, st_name.lower())


def _stats(flat: Any) -> dict[str, float]:
    """mean, std, min, max, absmax, l2 and the non-finite count, in float64, chunk by chunk."""
    n = int(flat.numel())
    s = s2 = 0.0
    lo, hi, amax = np.inf, -np.inf, 0.0
    nonfinite = 0
    for start in range(0, n, _STAT_CHUNK):
        c = flat[start : start + _STAT_CHUNK].double()
        finite = c.isfinite()
        nonfinite += int((~finite).sum())
        c = c[finite]
        if c.numel():
            s += float(c.sum())
            s2 += float((c * c).sum())
            lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
            amax = max(amax, float(c.abs().max()))
    m = n - nonfinite
    mean = s / m if m else 0.0
    var = max(s2 / m - mean * mean, 0.0) if m else 0.0
    return {
        "mean": mean,
        "std": var**0.5,
        "min": lo if m else 0.0,
        "max": hi if m else 0.0,
        "absmax": amax,
        "l2": s2**0.5,
        "nonfinite": float(nonfinite),
    }


def _hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        return {}
    from loracc.io.checkpoint import read_json

    config = read_json(path)
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    return {k: v for k, v in config.items() if k not in _CONFIG_IGNORED}


def _hf_fingerprint(tensors: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t['dtype']}\0{t['shape']}\0{t['sha256']}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Check


def check(
    model: str | os.PathLike[str],
    golden: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    providers: str | Sequence[str] = "cpu",
    strict_fingerprint: bool = False,
) -> CheckReport:
    """Compare ``model`` with the golden file; see the module docstring for what is compared.

    ``rtol``/``atol`` replace the per-dtype defaults. ``strict_fingerprint`` makes a different
    model (or adapter) fingerprint a regression instead of a note.
    """
    for n, v in (("--rtol", rtol), ("--atol", atol)):
        if v is not None and not (v >= 0 and np.isfinite(v)):
            raise InputError(f"{n}: {v} is not a finite number >= 0")
    meta, arrays = read_golden(golden)
    kind = model_kind(model)
    if kind != meta["kind"]:
        what = {"onnx": "an ONNX model", "hf": "a Hugging Face folder"}
        raise InputError(
            f"{golden} was recorded for {what[meta['kind']]}, but {model} is {what[kind]}"
        )
    if kind == "hf":
        if adapter is not None:
            raise InputError("--adapter applies to ONNX models only")
        report = _check_hf(Path(model), meta, arrays, rtol, atol, strict_fingerprint)
    else:
        report = _check_onnx(
            model, meta, arrays, adapter, rtol, atol, providers, strict_fingerprint
        )
    report.golden = str(golden)
    report.passed = not report.problems and all(c.passed for c in report.comparisons)
    return report


def _fingerprint_note(
    report: CheckReport, what: str, recorded: str, now: str, strict: bool
) -> None:
    if recorded == now:
        return
    msg = (
        f"{what} fingerprint differs from the recorded one "
        f"(recorded {recorded[:12]}, now {now[:12]})"
    )
    if strict:
        report.problems.append(msg)
    else:
        report.notes.append(msg + "; values compared anyway")


def _version_notes(
    report: CheckReport, recorded: Mapping[str, str], now: Mapping[str, str]
) -> None:
    for k in sorted(set(recorded) & set(now)):
        if recorded[k] != now[k]:
            report.notes.append(f"{k} {recorded[k]} when recorded, now {now[k]}")


def _check_onnx(
    model: str | os.PathLike[str],
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    adapter: str | os.PathLike[str] | None,
    rtol: float | None,
    atol: float | None,
    providers: str | Sequence[str],
    strict: bool,
) -> CheckReport:
    rec_adapter = meta.get("adapter")
    if rec_adapter and adapter is None:
        raise InputError(
            f"the golden was recorded with adapter {rec_adapter['file']}; pass it with --adapter"
        )
    if adapter is not None and not rec_adapter:
        raise InputError("the golden was recorded without an adapter; drop --adapter")
    sess = runner.open_session(model, providers, adapter=adapter)
    report = CheckReport(
        "onnx",
        str(sess.path),
        "",
        False,
        providers=list(sess.providers),
        recorded_providers=list(meta.get("providers", [])),
        notes=list(sess.notes),
    )
    _fingerprint_note(
        report, "model", meta["model"]["fingerprint"], runner.model_fingerprint(sess.path), strict
    )
    if rec_adapter and sess.adapter is not None:
        now = runner.file_digest(sess.adapter)
        _fingerprint_note(report, "adapter", rec_adapter["fingerprint"], now, strict)
    _version_notes(report, meta.get("versions", {}), _versions("onnx"))

    rec_inputs = [TensorSpec.from_dict(d) for d in meta["inputs"]]
    rec_outputs = [TensorSpec.from_dict(d) for d in meta["outputs"]]
    feeds = {s.name: arrays[f"input/{s.name}"] for s in rec_inputs if f"input/{s.name}" in arrays}
    changes = _spec_changes("input", rec_inputs, list(sess.inputs))
    try:
        sess.check_feeds(feeds)
    except InputError:
        report.problems += [f"input spec changed: {c}" for c in changes] or [
            "input spec changed: the recorded inputs no longer fit the graph"
        ]
        return report
    report.notes += [f"input spec changed but the recorded inputs still fit: {c}" for c in changes]

    now_outputs = {s.name: s for s in sess.outputs}
    missing = [s.name for s in rec_outputs if s.name not in now_outputs]
    if missing:
        report.problems.append(f"output(s) no longer in the graph: {', '.join(missing)}")
    new = [n for n in now_outputs if n not in {s.name for s in rec_outputs}]
    if new:
        report.notes.append(f"new output(s) not in the golden, not compared: {', '.join(new)}")
    got = sess.run(feeds)
    for s in rec_outputs:
        if s.name not in now_outputs:
            continue
        r, a = tolerance(s.dtype, rtol, atol)
        c = compare_arrays(s.name, got[s.name], arrays[f"output/{s.name}"], s.dtype, r, a)
        if now_outputs[s.name].dtype != s.dtype:
            c.passed = False
            c.problem = f"dtype changed: golden {s.dtype}, now {now_outputs[s.name].dtype}"
        report.comparisons.append(c)
    return report


def _spec_changes(what: str, old: Sequence[TensorSpec], new: Sequence[TensorSpec]) -> list[str]:
    out: list[str] = []
    new_by = {s.name: s for s in new}
    old_names = {s.name for s in old}
    for s in old:
        n = new_by.get(s.name)
        if n is None:
            out.append(f"{what} '{s.name}' ({s.describe()}) is gone")
        elif n.dtype != s.dtype or n.shape != s.shape:
            out.append(f"{what} '{s.name}' was {s.describe()}, now {n.describe()}")
    out += [f"new {what} '{s.name}' ({s.describe()})" for s in new if s.name not in old_names]
    return out


def _check_hf(
    folder: Path,
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    rtol: float | None,
    atol: float | None,
    strict: bool,
) -> CheckReport:
    tensors, samples = _hf_tensors(folder)
    config = _hf_config(folder)
    report = CheckReport("hf", str(folder), "", False)
    _fingerprint_note(
        report, "model", meta["model"]["fingerprint"], _hf_fingerprint(tensors, config), strict
    )
    _version_notes(report, meta.get("versions", {}), _versions("hf"))
    rec_config = meta.get("config", {})
    for k in sorted(set(rec_config) | set(config)):
        if rec_config.get(k, "<absent>") != config.get(k, "<absent>"):
            report.problems.append(
                f"config.json '{k}': golden {json.dumps(rec_config.get(k, '<absent>'))}, "
                f"now {json.dumps(config.get(k, '<absent>'))}"
            )
    recorded: Mapping[str, Any] = meta["tensors"]
    missing = sorted(set(recorded) - set(tensors))
    extra = sorted(set(tensors) - set(recorded))
    if missing:
        report.problems.append(f"tensor(s) missing: {', '.join(missing)}")
    if extra:
        report.problems.append(f"tensor(s) not in the golden: {', '.join(extra)}")
    tolerant = rtol is not None or atol is not None
    for name in sorted(set(recorded) & set(tensors)):
        rec, now = recorded[name], tensors[name]
        r, a = tolerance(rec["dtype"], rtol, atol) if tolerant else (0.0, 0.0)
        shape = list(rec["shape"])
        if now["dtype"] != rec["dtype"] or now["shape"] != shape:
            report.comparisons.append(
                Comparison(
                    name,
                    rec["dtype"],
                    shape,
                    False,
                    r,
                    a,
                    problem=f"was {rec['dtype']}{shape}, now {now['dtype']}{now['shape']}",
                )
            )
            continue
        if now["sha256"] == rec["sha256"]:
            report.comparisons.append(Comparison(name, rec["dtype"], shape, True, r, a))
            continue
        c = compare_arrays(name, samples[name], arrays[f"sample/{name}"], rec["dtype"], r, a)
        c.shape = shape
        idx = sample_indices(int(np.prod(shape, dtype=np.int64)))
        for attr in ("max_abs_at", "max_rel_at"):  # sample position -> tensor index
            pos = getattr(c, attr)
            if pos is not None and len(idx):
                setattr(c, attr, [int(i) for i in np.unravel_index(idx[pos[0]], shape)])
        stat_bad = _stat_differences(rec["stats"], now["stats"], r, a)
        # A zero tolerance is exact: the statistics and the sample cannot see every bit (a tiny
        # element's last bit is lost in float64 sums), the digest can.
        if not tolerant or r == a == 0.0:
            c.passed = False
            where = (
                "; sampled values differ too"
                if c.mismatched
                else (f"; its {c.total} sampled values are equal, so the change is elsewhere")
            )
            c.problem = f"digest differs{where}" + (
                f"; stats differ: {', '.join(stat_bad)}" if stat_bad else ""
            )
        elif stat_bad:
            c.passed = False
            c.problem = f"digest differs; stats outside tolerance: {', '.join(stat_bad)}"
        elif c.passed:
            report.notes.append(f"{name}: digest differs, values within tolerance")
        else:
            c.problem = "digest differs; sampled values outside tolerance"
        report.comparisons.append(c)
    return report


def _stat_differences(
    rec: Mapping[str, float], now: Mapping[str, float], rtol: float, atol: float
) -> list[str]:
    out = []
    for k in ("mean", "std", "min", "max", "absmax", "l2", "nonfinite"):
        a, b = float(now[k]), float(rec[k])
        tol = 0.0 if k == "nonfinite" else atol + rtol * abs(b)
        if k == "mean":  # the mean of signed values can be ~0; compare against the spread
            tol = atol + rtol * max(abs(b), float(rec["std"]))
        if abs(a - b) > tol:
            out.append(f"{k} {b:.9g} -> {a:.9g}")
    return out
