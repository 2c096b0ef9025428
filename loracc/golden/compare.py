"""The comparison rules of a golden check: tolerances by dtype, element-wise comparison of arrays
and of summary statistics, and the :class:`Comparison` each compared output or tensor yields."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_TOLERANCES",
    "STAT_NAMES",
    "Comparison",
    "compare_arrays",
    "stat_differences",
    "tolerance",
]

# (rtol, atol) by dtype; integer and boolean outputs compare exactly unless told otherwise.
DEFAULT_TOLERANCES: Mapping[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 1e-3),
    "bfloat16": (1.6e-2, 1e-2),
}
# The summary statistics a tensor's digest comes with, in report order.
STAT_NAMES = ("mean", "std", "min", "max", "absmax", "l2", "nonfinite")


def tolerance(
    dtype: str, rtol: float | None = None, atol: float | None = None
) -> tuple[float, float]:
    """(rtol, atol) for ``dtype``: the given ones, else the dtype's default (exact for ints)."""
    d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))
    return (d_rtol if rtol is None else rtol, d_atol if atol is None else atol)


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


def stat_differences(
    rec: Mapping[str, float], now: Mapping[str, float], rtol: float, atol: float
) -> list[str]:
    """The statistics (:data:`STAT_NAMES`) of ``now`` outside the tolerance of the recorded ones,
    as ``"name recorded -> now"``; the non-finite count compares exactly."""
    out = []
    for k in STAT_NAMES:
        a, b = float(now[k]), float(rec[k])
        tol = 0.0 if k == "nonfinite" else atol + rtol * abs(b)
        if k == "mean":  # the mean of signed values can be ~0; compare against the spread
            tol = atol + rtol * max(abs(b), float(rec["std"]))
        if abs(a - b) > tol:
            out.append(f"{k} {b:.9g} -> {a:.9g}")
    return out
