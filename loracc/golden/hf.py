"""Golden checks of a merged Hugging Face folder (safetensors).

Per tensor the golden keeps a sha256 of its stored bytes, summary statistics (mean, std, min,
max, abs-max, L2 norm, non-finite count) and a fixed sample of up to :data:`SAMPLE_SIZE` values;
plus ``config.json``. ``check`` passes when every digest is identical or, when a tolerance is
asked for, when the statistics and the sample agree within it (a merge on another device may
differ in the last bit).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from loracc.errors import FormatError, InputError
from loracc.golden.artifact import CheckOptions, CheckReport, RecordOptions, library_versions
from loracc.golden.compare import Comparison, compare_arrays, stat_differences, tolerance
from loracc.golden.file import GOLDEN_FORMAT

__all__ = ["SAMPLE_SIZE", "HfArtifact", "HfReport", "sample_indices"]

SAMPLE_SIZE = 256
# config.json keys that change with the tool that wrote the folder, not with the model.
_CONFIG_IGNORED = ("transformers_version", "_name_or_path")
_STAT_CHUNK = 1 << 22
# safetensors dtype names -> the names goldens (and tolerances) use
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class HfReport(CheckReport):
    """A check of a Hugging Face folder: it compares the stored tensors."""

    unit = "tensors"


def sample_indices(numel: int, k: int = SAMPLE_SIZE) -> np.ndarray:
    """Up to ``k`` flat indices spread evenly over ``numel`` elements (first and last included)."""
    if numel <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, numel - 1, min(numel, k)).round().astype(np.int64))


class HfArtifact:
    """A Hugging Face safetensors folder, recorded by tensor digests, statistics and samples."""

    kind: ClassVar[str] = "hf"
    description: ClassVar[str] = "a Hugging Face folder"

    def __init__(self, model: str | os.PathLike[str]) -> None:
        self.model = model
        self.folder = Path(model)

    def input_files(self, options: RecordOptions) -> list[Path]:
        return [self.folder]

    def record(self, options: RecordOptions) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        given = options.inputs_given()
        if given:
            raise InputError(
                f"{self.model}: {', '.join(given)} apply to ONNX models; a Hugging Face folder "
                "is recorded by tensor digests"
            )
        tensors, samples = _tensors(self.folder)
        config = _config(self.folder)
        meta: dict[str, Any] = {
            "format": GOLDEN_FORMAT,
            "kind": self.kind,
            "model": {"folder": self.folder.name, "fingerprint": _fingerprint(tensors, config)},
            "config": config,
            "tensors": tensors,
            "versions": library_versions(),
        }
        return meta, {f"sample/{k}": v for k, v in samples.items()}

    def check(
        self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], options: CheckOptions
    ) -> CheckReport:
        if options.adapter is not None:
            raise InputError("--adapter applies to ONNX models only")
        tensors, samples = _tensors(self.folder)
        config = _config(self.folder)
        report = HfReport(self.kind, str(self.folder), "", False)
        now_fp = _fingerprint(tensors, config)
        report.note_fingerprint(
            "model", meta["model"]["fingerprint"], now_fp, options.strict_fingerprint
        )
        report.note_versions(meta.get("versions", {}), library_versions())
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
        for name in sorted(set(recorded) & set(tensors)):
            c, note = _compare_tensor(
                name, recorded[name], tensors[name], samples[name], arrays, options
            )
            report.comparisons.append(c)
            report.notes += [note] if note else []
        return report


def _compare_tensor(
    name: str,
    rec: Mapping[str, Any],
    now: Mapping[str, Any],
    sample: np.ndarray,
    arrays: Mapping[str, np.ndarray],
    options: CheckOptions,
) -> tuple[Comparison, str | None]:
    """One tensor against its golden: the digest, else (with a tolerance) sample and stats;
    and a note when only the tolerance let it pass."""
    tolerant = options.rtol is not None or options.atol is not None
    r, a = tolerance(rec["dtype"], options.rtol, options.atol) if tolerant else (0.0, 0.0)
    shape = list(rec["shape"])
    if now["dtype"] != rec["dtype"] or now["shape"] != shape:
        problem = f"was {rec['dtype']}{shape}, now {now['dtype']}{now['shape']}"
        return Comparison(name, rec["dtype"], shape, False, r, a, problem=problem), None
    if now["sha256"] == rec["sha256"]:
        return Comparison(name, rec["dtype"], shape, True, r, a), None
    c = compare_arrays(name, sample, arrays[f"sample/{name}"], rec["dtype"], r, a)
    c.shape = shape
    idx = sample_indices(int(np.prod(shape, dtype=np.int64)))
    for attr in ("max_abs_at", "max_rel_at"):  # sample position -> tensor index
        pos = getattr(c, attr)
        if pos is not None and len(idx):
            setattr(c, attr, [int(i) for i in np.unravel_index(idx[pos[0]], shape)])
    stat_bad = stat_differences(rec["stats"], now["stats"], r, a)
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
        return c, f"{name}: digest differs, values within tolerance"
    else:
        c.problem = "digest differs; sampled values outside tolerance"
    return c, None


def _tensors(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per stored tensor: dtype, shape, sha256 of its bytes and statistics; and its sample."""
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
        st_name = dtype_name(t.dtype)
        tensors[name] = {
            "dtype": _DTYPE_NAMES.get(st_name, st_name.lower()),
            "shape": list(info.shape),
            "sha256": digest.hexdigest(),
            "stats": _stats(flat),
        }
    return tensors, samples


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


def _config(folder: Path) -> dict[str, Any]:
    """``config.json`` without the keys that name the writing tool; empty when absent."""
    path = folder / "config.json"
    if not path.exists():
        return {}
    from loracc.io.checkpoint import read_json

    config = read_json(path)
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    return {k: v for k, v in config.items() if k not in _CONFIG_IGNORED}


def _fingerprint(tensors: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t['dtype']}\0{t['shape']}\0{t['sha256']}\n".encode())
    return h.hexdigest()
