"""Golden-output regression checks: record what an approved artifact produces, check it later.

Each kind of artifact is one class (the :class:`~loracc.golden.artifact.Artifact` protocol):

* :class:`~loracc.golden.onnx.OnnxArtifact`: an ONNX model (a ``.onnx`` file, or a folder
  holding one, optionally with an ``.onnx_adapter``), recorded by its outputs on fixed inputs
  and checked element by element (``|got - ref| <= atol + rtol * |ref|``);
* :class:`~loracc.golden.hf.HfArtifact`: a merged Hugging Face safetensors folder, recorded by
  per-tensor digests, statistics and samples, plus ``config.json``.

This module is the driver both share: which kind a model is, and ``record``/``check``. The
comparison rules are in :mod:`loracc.golden.compare`, the file format in
:mod:`loracc.golden.file`: an ``.npz`` whose ``__golden__`` entry holds the metadata as UTF-8
JSON bytes; arrays are ``input/<name>``, ``output/<name>`` (ONNX) and ``sample/<tensor>`` (HF).
bfloat16 values are stored widened to float32, which is exact; the metadata keeps the real
dtype, so tolerances default by the real dtype (:data:`DEFAULT_TOLERANCES`).

Outcomes: a passing check, a regression (``CheckReport.passed`` is False: the CLI exits 1), or a
:class:`~loracc.errors.LoraccError` for bad input (exit 2).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loracc.errors import InputError
from loracc.golden.artifact import Artifact, CheckOptions, CheckReport, RecordOptions
from loracc.golden.compare import DEFAULT_TOLERANCES, Comparison, compare_arrays, tolerance
from loracc.golden.file import (
    GOLDEN_FORMAT,
    META_KEY,
    check_golden_output,
    read_golden_file,
    write_golden,
)
from loracc.golden.hf import SAMPLE_SIZE, HfArtifact, sample_indices
from loracc.golden.onnx import OnnxArtifact

__all__ = [
    "ARTIFACTS",
    "DEFAULT_TOLERANCES",
    "GOLDEN_FORMAT",
    "META_KEY",
    "SAMPLE_SIZE",
    "Artifact",
    "CheckReport",
    "Comparison",
    "check",
    "compare_arrays",
    "model_kind",
    "read_golden",
    "record",
    "sample_indices",
    "tolerance",
]

# The artifact kinds by the ``kind`` their golden files record.
ARTIFACTS: Mapping[str, type[Artifact]] = {a.kind: a for a in (OnnxArtifact, HfArtifact)}


def _artifact_type(model: str | os.PathLike[str]) -> type[Artifact]:
    """An ONNX model for a file or a folder with a ``.onnx`` and no safetensors; a Hugging Face
    folder for one with safetensors."""
    p = Path(model)
    if p.is_file():
        if p.suffix in (".safetensors", ".json"):
            raise InputError(f"{p}: pass the Hugging Face folder, not one of its files")
        return OnnxArtifact
    if p.is_dir():
        if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists():
            return HfArtifact
        if any(p.glob("*.onnx")):
            return OnnxArtifact
        raise InputError(f"{p}: neither an ONNX model nor a Hugging Face safetensors folder")
    raise InputError(f"{p}: model not found")


def model_kind(model: str | os.PathLike[str]) -> str:
    """``"onnx"`` for a ``.onnx`` file or a folder with one and no safetensors, ``"hf"`` for a
    Hugging Face safetensors folder."""
    return _artifact_type(model).kind


def read_golden(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, arrays) of a golden file, or a :class:`~loracc.errors.FormatError` naming
    what is wrong."""
    return read_golden_file(path, ARTIFACTS)


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
    artifact = _artifact_type(model)(model)
    options = RecordOptions(adapter, inputs, seed, dims, providers)
    read = artifact.input_files(options)
    check_golden_output(out_path, read, force)
    meta, arrays = artifact.record(options)
    write_golden(out_path, meta, arrays, read, force)
    return meta


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
    """Compare ``model`` with the golden file; see the artifact kinds for what is compared.

    ``rtol``/``atol`` replace the per-dtype defaults. ``strict_fingerprint`` makes a different
    model (or adapter) fingerprint a regression instead of a note.
    """
    for n, v in (("--rtol", rtol), ("--atol", atol)):
        if v is not None and not (v >= 0 and np.isfinite(v)):
            raise InputError(f"{n}: {v} is not a finite number >= 0")
    meta, arrays = read_golden(golden)
    artifact_type = _artifact_type(model)
    if artifact_type.kind != meta["kind"]:
        raise InputError(
            f"{golden} was recorded for {ARTIFACTS[meta['kind']].description}, "
            f"but {model} is {artifact_type.description}"
        )
    options = CheckOptions(adapter, rtol, atol, providers, strict_fingerprint)
    report = artifact_type(model).check(meta, arrays, options)
    report.golden = str(golden)
    report.passed = not report.problems and all(c.passed for c in report.comparisons)
    return report
