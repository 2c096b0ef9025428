"""The combine API: several PEFT adapters into one (peft's ``add_weighted_adapter``, corrected)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loracc.api.common import LayoutChoices, PathLike, adapter_paths, check_paths, parse_weights
from loracc.io.output import atomic_dir
from loracc.io.peft import read_peft_adapter
from loracc.io.peft_writer import write_peft_adapter
from loracc.lower.combine import CombineOptions, MajoritySign, combine_adapters

__all__ = ["CombineReport", "combine"]


@dataclass
class CombineReport:
    """What ``combine`` did, as printed by ``loracc combine --json``."""

    output: str
    method: str
    weights: list[float]
    tensors: list[str]
    sites: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def combine(
    adapter_dirs: PathLike | Sequence[PathLike],
    out_dir: PathLike,
    *,
    method: str,
    weights: str | Sequence[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    majority_sign: MajoritySign = "total",
    force: bool = False,
    layout: LayoutChoices = None,
) -> CombineReport:
    """Combine ``adapter_dirs`` into one PEFT adapter in ``out_dir`` (docs/FORMATS.md "Combining
    adapters"): plain LoRA with every scale folded, or DoRA where one adapter changes a module.

    Args:
        adapter_dirs: the PEFT adapter folders, all for one base model.
        out_dir: the adapter folder to write (the output rules of ``loracc.io.output``).
        method: cat, svd, linear, ties, dare_linear, dare_ties or magnitude_prune.
        weights: one per adapter, or "1.0,0.5" (default 1.0 each).
        rank: svd: the rank kept (default the largest input rank).
        density: ties, dare_*, magnitude_prune: the fraction of factor entries kept.
        seed: dare_*: seeds the keep masks (same seed, same bytes; default 0).
        majority_sign: ties, dare_ties: sign election by ``total`` or ``frequency``.
        force: replace an existing ``out_dir``.
        layout: ``--layout`` choices for the readers.
    """
    paths = adapter_paths(adapter_dirs)
    scales = parse_weights(weights, len(paths))
    options = CombineOptions(
        method=method,
        weights=scales,
        rank=rank,
        density=density,
        seed=seed,
        majority_sign=majority_sign,
    )
    options.check()  # before reading anything
    check_paths(paths)
    adapters = [read_peft_adapter(p, layout=layout) for p in paths]
    combined = combine_adapters(adapters, options)
    with atomic_dir(Path(out_dir), paths, force=force) as tmp:
        keys = write_peft_adapter(combined, tmp, keep_dora=True)
    return CombineReport(
        output=str(out_dir),
        method="linear" if len(adapters) == 1 else method,
        weights=list(scales),
        tensors=keys,
        sites=[
            {"module": s.module, "rank": s.rank, "dora": s.magnitude is not None}
            for s in combined.sites
        ],
        notes=list(combined.notes),
    )
