"""What every artifact kind of a golden check shares: the :class:`Artifact` protocol, the options
of ``record`` and ``check``, the :class:`CheckReport`, and the notes about fingerprints and
library versions."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from loracc.golden.compare import Comparison

__all__ = [
    "Artifact",
    "CheckOptions",
    "CheckReport",
    "RecordOptions",
    "library_versions",
]


@dataclass(frozen=True)
class RecordOptions:
    """What ``record`` was asked for; an artifact kind refuses the options it cannot use."""

    adapter: str | os.PathLike[str] | None = None
    inputs: str | os.PathLike[str] | None = None
    seed: int | None = None
    dims: Mapping[str, int] | None = None
    providers: str | Sequence[str] = "cpu"

    def inputs_given(self) -> list[str]:
        """The flags given that choose what the model runs on (``providers`` has a default)."""
        options = (("--adapter", self.adapter), ("--inputs", self.inputs), ("--seed", self.seed))
        given = [flag for flag, value in options if value is not None]
        return given + (["--dim"] if self.dims else [])


@dataclass(frozen=True)
class CheckOptions:
    """What ``check`` was asked for: tolerances replace the per-dtype defaults when given."""

    adapter: str | os.PathLike[str] | None = None
    rtol: float | None = None
    atol: float | None = None
    providers: str | Sequence[str] = "cpu"
    strict_fingerprint: bool = False


@dataclass
class CheckReport:
    """What ``check`` found; ``passed`` decides the exit code. Each artifact kind subclasses it
    to name what it compares (:attr:`unit`)."""

    unit: ClassVar[str] = "values"

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
            lines.append(f"PASS: {len(self.comparisons)} {self.unit} match the golden")
        else:
            what = f"{len(failed)} of {len(self.comparisons)} {self.unit} differ"
            if self.problems and not failed:
                what = f"{len(self.problems)} problem(s)"
            lines.append(f"FAIL: {what}")
        return "\n".join(lines)

    def note_fingerprint(self, what: str, recorded: str, now: str, strict: bool) -> None:
        """A changed fingerprint: a problem with ``strict``, else a note (values are compared)."""
        if recorded == now:
            return
        msg = (
            f"{what} fingerprint differs from the recorded one "
            f"(recorded {recorded[:12]}, now {now[:12]})"
        )
        if strict:
            self.problems.append(msg)
        else:
            self.notes.append(msg + "; values compared anyway")

    def note_versions(self, recorded: Mapping[str, str], now: Mapping[str, str]) -> None:
        """A note for each library whose version changed since the golden was recorded."""
        for k in sorted(set(recorded) & set(now)):
            if recorded[k] != now[k]:
                self.notes.append(f"{k} {recorded[k]} when recorded, now {now[k]}")


class Artifact(Protocol):
    """One kind of artifact a golden records: how to read it, record it and check it.

    ``kind`` is the golden file's ``kind``; ``description`` names the kind in messages
    ("an ONNX model"). An artifact is made from the model path the user gave.
    """

    kind: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, model: str | os.PathLike[str]) -> None: ...

    def input_files(self, options: RecordOptions) -> list[Path]:
        """What recording reads, which the golden may not overwrite."""
        ...

    def record(self, options: RecordOptions) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The golden's metadata (``format`` and ``kind`` included) and arrays."""
        ...

    def check(
        self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], options: CheckOptions
    ) -> CheckReport:
        """Compare the artifact with a golden of this kind; ``golden`` and ``passed`` are left
        for the caller to fill in."""
        ...


def library_versions(**extra: str) -> dict[str, str]:
    """Python, platform, numpy and loracc versions, plus ``extra`` (an artifact kind's runtime)."""
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
    return {**out, **extra}
