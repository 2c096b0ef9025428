"""Golden checks of an ONNX model (a ``.onnx`` file, or a folder holding one, optionally with an
``.onnx_adapter``).

Deterministic inputs (from an ``.npz`` file, or generated from the graph's input specs with a
seed) are run with onnxruntime on the chosen providers (:mod:`loracc.runner`). The golden stores
the inputs, the outputs, the graph's input/output specs, the providers, library versions and the
model's (and adapter's) fingerprint. ``check`` reruns the stored inputs and compares every output
element with ``|got - ref| <= atol + rtol * |ref|``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from loracc import runner
from loracc.errors import InputError
from loracc.golden.artifact import CheckOptions, CheckReport, RecordOptions, library_versions
from loracc.golden.compare import compare_arrays, tolerance
from loracc.golden.file import GOLDEN_FORMAT
from loracc.io import ort as ort_io
from loracc.io.npz import read_npz
from loracc.io.ort import Session, TensorSpec

__all__ = ["OnnxArtifact", "OnnxReport"]


class OnnxReport(CheckReport):
    """A check of an ONNX model: it compares the graph's outputs."""

    unit = "outputs"


def _versions() -> dict[str, str]:
    return library_versions(onnxruntime=ort_io.version())


class OnnxArtifact:
    """An ONNX model (and adapter), recorded by what it outputs on fixed inputs."""

    kind: ClassVar[str] = "onnx"
    description: ClassVar[str] = "an ONNX model"

    def __init__(self, model: str | os.PathLike[str]) -> None:
        self.model = model

    def input_files(self, options: RecordOptions) -> list[Path]:
        return runner.input_files(self.model, options.adapter, options.inputs)

    def record(self, options: RecordOptions) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if options.inputs is not None and (options.seed is not None or options.dims):
            raise InputError("give either --inputs or --seed/--dim, not both")
        sess = runner.open_model_session(self.model, options.providers, adapter=options.adapter)
        if options.inputs is not None:
            feeds = read_npz(options.inputs)
            source: dict[str, Any] = {"file": Path(options.inputs).name}
        else:
            seed = 0 if options.seed is None else options.seed
            feeds = runner.generate_inputs(sess, seed=seed, dims=options.dims)
            source = {"seed": seed, "dims": dict(options.dims or {})}
        outputs = sess.run(feeds)
        for s in sess.inputs:  # store bf16 inputs as the float32 of the values fed
            if s.dtype == "bfloat16" and feeds[s.name].dtype == np.uint16:
                feeds[s.name] = ort_io.from_bf16_bits(feeds[s.name])
        meta: dict[str, Any] = {
            "format": GOLDEN_FORMAT,
            "kind": self.kind,
            "model": {"file": sess.path.name, "fingerprint": runner.model_fingerprint(sess.path)},
            "adapter": None
            if sess.adapter is None
            else {"file": sess.adapter.name, "fingerprint": runner.file_digest(sess.adapter)},
            "providers": list(sess.providers),
            "requested_providers": list(sess.requested),
            "inputs": [s.to_dict() for s in sess.inputs],
            "outputs": [s.to_dict() for s in sess.outputs],
            "input_source": source,
            "versions": _versions(),
            "notes": list(sess.notes),
        }
        arrays = {f"input/{k}": v for k, v in feeds.items()}
        arrays.update({f"output/{k}": v for k, v in outputs.items()})
        return meta, arrays

    def check(
        self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], options: CheckOptions
    ) -> CheckReport:
        rec_adapter = meta.get("adapter")
        if rec_adapter and options.adapter is None:
            raise InputError(
                f"the golden was recorded with adapter {rec_adapter['file']}; "
                "pass it with --adapter"
            )
        if options.adapter is not None and not rec_adapter:
            raise InputError("the golden was recorded without an adapter; drop --adapter")
        strict = options.strict_fingerprint
        sess = runner.open_model_session(self.model, options.providers, adapter=options.adapter)
        report = OnnxReport(
            self.kind,
            str(sess.path),
            "",
            False,
            providers=list(sess.providers),
            recorded_providers=list(meta.get("providers", [])),
            notes=list(sess.notes),
        )
        now_fp = runner.model_fingerprint(sess.path)
        report.note_fingerprint("model", meta["model"]["fingerprint"], now_fp, strict)
        if rec_adapter and sess.adapter is not None:
            now = runner.file_digest(sess.adapter)
            report.note_fingerprint("adapter", rec_adapter["fingerprint"], now, strict)
        report.note_versions(meta.get("versions", {}), _versions())
        _compare_run(report, sess, meta, arrays, options)
        return report


def _compare_run(
    report: CheckReport,
    sess: Session,
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    options: CheckOptions,
) -> None:
    """Run the recorded inputs (if they still fit the graph) and compare every recorded output."""
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
        return
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
        r, a = tolerance(s.dtype, options.rtol, options.atol)
        c = compare_arrays(s.name, got[s.name], arrays[f"output/{s.name}"], s.dtype, r, a)
        if now_outputs[s.name].dtype != s.dtype:
            c.passed = False
            c.problem = f"dtype changed: golden {s.dtype}, now {now_outputs[s.name].dtype}"
        report.comparisons.append(c)


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
