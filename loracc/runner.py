"""Run an ONNX model (optionally with an ``.onnx_adapter``) on chosen onnxruntime providers.

This is the shared core of ``loracc run`` and ``loracc golden`` around the session that
:func:`loracc.io.ort.open_session` creates (providers, adapters, bf16, feed checks): it resolves
the model file, fingerprints models and adapters, generates seeded inputs from the graph's input
specs, and summarises outputs. It does no I/O of its own: ONNX files are read by
:mod:`loracc.io.onnx_model`, sessions by :mod:`loracc.io.ort`, ``.npz`` files by
:mod:`loracc.io.npz`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from loracc.errors import FormatError, InputError
from loracc.io import ort as ort_io
from loracc.io.inputs import open_input
from loracc.io.npz import read_npz
from loracc.io.ort import Session, TensorSpec
from loracc.io.output import check_complete

__all__ = [
    "RunResult",
    "file_digest",
    "generate_inputs",
    "input_files",
    "model_fingerprint",
    "open_model_session",
    "parse_dims",
    "resolve_onnx",
    "run",
]


# --------------------------------------------------------------------------------------------
# Files


def resolve_onnx(model: str | os.PathLike[str]) -> Path:
    """The ``.onnx`` file of ``model``: the path itself, or the single ``*.onnx`` in a folder."""
    path = Path(model)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob("*.onnx"))
        if len(found) == 1:
            return found[0]
        if not found and (path / "config.json").is_file():
            raise InputError(
                f"{path}: a Hugging Face folder with no .onnx file; run executes ONNX models "
                "(golden record/check also take merged Hugging Face folders)"
            )
        if not found:
            raise InputError(f"{path}: no .onnx file in this folder")
        names = ", ".join(p.name for p in found)
        raise InputError(f"{path}: several .onnx files ({names}); pass one of them")
    raise InputError(f"{path}: model not found")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    try:
        with open_input(path) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    return h.hexdigest()


def _external_data_files(path: Path) -> list[Path]:
    """:func:`loracc.io.onnx_model.external_data_files`; none without the onnx extra
    (onnxruntime alone can run a model, and its fingerprint is then the file's alone)."""
    onnx_model = _onnx_model()
    return [] if onnx_model is None else onnx_model.external_data_files(path)


def _onnx_model() -> ModuleType | None:
    try:
        from loracc.io import onnx_model
    except ImportError:  # pragma: no cover - onnx ships with the onnx extras
        return None
    return onnx_model


def model_fingerprint(path: Path) -> str:
    """sha256 over the model file and, in name order, the external-data files its tensors point
    to, in any graph: an initializer of an If/Loop body counts as much as one of the main graph."""
    h = hashlib.sha256(file_digest(path).encode())
    for f in _external_data_files(path):
        h.update(f.name.encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()


def input_files(
    model: str | os.PathLike[str], *others: str | os.PathLike[str] | None
) -> list[Path]:
    """What a run of ``model`` reads, which its outputs may not overwrite: the ``.onnx`` file
    (``model`` or the one in that folder), its external-data files, and ``others`` given."""
    onnx_file = resolve_onnx(model)
    try:
        data = _external_data_files(onnx_file)
    except FormatError:  # unreadable: the session refuses it with its own message
        data = []
    return [onnx_file, *data] + [Path(o) for o in others if o is not None]


def open_model_session(
    model: str | os.PathLike[str],
    providers: str | Sequence[str] = "cpu",
    *,
    adapter: str | os.PathLike[str] | None = None,
) -> Session:
    """:func:`loracc.io.ort.open_session` of ``model``: a ``.onnx`` file or a folder with one.

    An ``adapter`` that leaves some of the model's active slot defaults in place is refused
    (:func:`loracc.lower.onnx.slots.check_adapter_files`; needs the onnx extra to read the
    defaults)."""
    path = resolve_onnx(model)
    for part in (path, adapter):
        if part is not None:
            check_complete(Path(part))
    session = ort_io.open_session(path, providers, adapter=adapter)  # reports bad files first
    if adapter is not None and _onnx_model() is not None:
        from loracc.lower.onnx.slots import check_adapter_files

        check_adapter_files(path, adapter)
    return session


# --------------------------------------------------------------------------------------------
# Generated inputs


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """``["batch=2", "seq=16"]`` -> ``{"batch": 2, "seq": 16}``."""
    dims: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            size = int(value)
        except ValueError:
            size = -1
        if not sep or not name.strip() or size < 1:
            raise InputError(f"--dim: '{item}' is not NAME=SIZE with SIZE >= 1")
        dims[name.strip()] = size
    return dims


def generate_inputs(
    sess: Session, *, seed: int = 0, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Seeded inputs from the graph's specs.

    * Symbolic dimensions come from ``dims`` (``--dim NAME=SIZE``); an unnamed dynamic dimension
      is named ``<input>.<axis>``.
    * Integer inputs that feed an embedding ``Gather`` take ids in ``[0, rows)``; an input whose
      name contains ``mask`` is all ones; ``position`` gives ``0..n-1`` on the last axis; any
      other integer input is 0 or 1. Booleans are random, floats standard normal.
    """
    dims = dict(dims or {})
    shapes: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    for s in sess.inputs:
        sizes: list[int] = []
        for axis, d in enumerate(s.shape):
            key = d if isinstance(d, str) else f"{s.name}.{axis}"
            if isinstance(d, int) and d >= 0:
                sizes.append(d)
            elif key in dims:
                sizes.append(dims[key])
            else:
                if key not in missing:
                    missing.append(key)
                sizes.append(1)
        shapes[s.name] = tuple(sizes)
    if missing:
        raise InputError(
            f"{sess.path}: give the symbolic dimensions with --dim: "
            + ", ".join(f"{m}=SIZE" for m in missing)
        )
    unused = sorted(set(dims) - _dim_names(sess.inputs))
    if unused:
        raise InputError(
            f"--dim {unused[0]}: the graph has no such dimension "
            f"(it has {', '.join(sorted(_dim_names(sess.inputs))) or 'none'})"
        )
    onnx_model = _onnx_model()
    vocab = {} if onnx_model is None else onnx_model.embedding_rows(sess.path)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for s in sess.inputs:
        shape = shapes[s.name]
        lname = s.name.lower()
        kind = s.storage.kind
        a: np.ndarray
        if kind == "b":
            a = rng.random(shape) < 0.5
        elif kind in "iu":
            if s.name in vocab:
                a = rng.integers(0, vocab[s.name], size=shape)
            elif "mask" in lname:
                a = np.ones(shape)
            elif "position" in lname and shape:
                a = np.broadcast_to(np.arange(shape[-1]), shape)
            else:
                a = rng.integers(0, 2, size=shape)
        else:
            a = rng.standard_normal(shape)
        feeds[s.name] = np.ascontiguousarray(a, dtype=s.storage)
        if s.dtype == "bfloat16":  # keep exactly the values that are fed
            feeds[s.name] = ort_io.from_bf16_bits(ort_io.to_bf16_bits(feeds[s.name]))
    return feeds


def _dim_names(specs: Sequence[TensorSpec]) -> set[str]:
    return {
        d if isinstance(d, str) else f"{s.name}.{axis}"
        for s in specs
        for axis, d in enumerate(s.shape)
        if not (isinstance(d, int) and d >= 0)
    }


# --------------------------------------------------------------------------------------------
# One run


@dataclass
class RunResult:
    """Outputs of one run and where they came from."""

    model: Path
    adapter: Path | None
    providers: tuple[str, ...]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    output_specs: tuple[TensorSpec, ...]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "adapter": str(self.adapter) if self.adapter else None,
            "providers": list(self.providers),
            "outputs": [
                {
                    "name": s.name,
                    "dtype": s.dtype,
                    "shape": list(self.outputs[s.name].shape),
                    **_summary(self.outputs[s.name]),
                }
                for s in self.output_specs
            ],
            "notes": self.notes,
        }


def _summary(a: np.ndarray) -> dict[str, float | int | None]:
    """min/max/mean over the finite values, and how many are NaN or infinite: a mixed-batch
    row with an unfilled slot or a bad id is NaN, and must not read like a normal output."""
    if a.size == 0 or a.dtype.kind not in "biuf":
        return {"min": None, "max": None, "mean": None, "nan": 0, "inf": 0}
    f = a.astype(np.float64)
    finite = f[np.isfinite(f)]
    counts = {"nan": int(np.isnan(f).sum()), "inf": int(np.isinf(f).sum())}
    if finite.size == 0:
        return {"min": None, "max": None, "mean": None, **counts}
    return {
        "min": float(finite.min()),
        "max": float(finite.max()),
        "mean": float(finite.mean()),
        **counts,
    }


def run(
    model: str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray],
    *,
    adapter: str | os.PathLike[str] | None = None,
    providers: str | Sequence[str] = "cpu",
) -> RunResult:
    """Run ``model`` (with ``adapter`` active) on ``inputs`` (an ``.npz`` path or arrays)."""
    feeds = dict(inputs) if isinstance(inputs, Mapping) else read_npz(inputs)
    sess = open_model_session(model, providers, adapter=adapter)
    outputs = sess.run(feeds)
    return RunResult(
        sess.path, sess.adapter, sess.providers, feeds, outputs, sess.outputs, list(sess.notes)
    )
