"""The Hugging Face Python API: load, inspect, print the IR, merge into a checkpoint, convert."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loracc.api.common import (
    LayoutChoices,
    PathLike,
    adapter_folder,
    adapter_paths,
    base_folder,
    check_paths,
    parse_weights,
)
from loracc.api.inspect import inspect_adapter
from loracc.errors import ConfigError, UnsupportedError
from loracc.io.checkpoint import Checkpoint
from loracc.io.output import atomic_dir, check_output
from loracc.io.peft import read_peft_adapter
from loracc.io.peft_writer import write_peft_adapter
from loracc.ir import Adapter
from loracc.legality import Target, require
from loracc.lower.merge import (
    MergeOptions,
    ProgressCallback,
    check_merge,
    merge_into,
    parse_size,
)
from loracc.lower.stack import (
    check_stack,
    compile_stack,
    labelled_steps,
    weighted,
)
from loracc.passes import Pass, PassContext
from loracc.pipeline import (
    PipelineResult,
    compile_adapter,
    convert_pipeline,
    in_order,
    merge_pipeline,
    pass_steps,
    pipeline_spec,
    run_pipeline,
)
from loracc.printer import print_ir
from loracc.weights import BaseWeights

__all__ = [
    "DTYPES",
    "ConvertReport",
    "MergeReport",
    "convert",
    "emit_ir",
    "inspect_adapter",
    "load_adapter",
    "merge",
]


DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(
            f"--dtype: '{name}' is not one of fp16, bf16, fp32 (or float16, bfloat16, float32)"
        ) from None


def load_adapter(
    adapter_dir: PathLike,
    base_dir: PathLike | None = None,
    *,
    initial: PathLike | None = None,
    layout: LayoutChoices = None,
) -> Adapter:
    """Read a PEFT adapter folder into the IR (with the base, kinds and shapes are checked)."""
    base = Checkpoint(base_folder(base_dir)) if base_dir is not None else None
    return read_peft_adapter(adapter_folder(adapter_dir), base, initial=initial, layout=layout)


@dataclass
class MergeReport:
    """What ``merge`` did, as printed by ``loracc merge --json``."""

    output: str
    shards: list[str]
    tensors: int
    changed: list[str]
    copied: int
    bytes_written: int  # with dry_run: the bytes the shards' tensors would take
    seconds: float  # the whole call; ``steps`` breaks it down
    sites: int
    config_updates: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False
    steps: dict[str, float] = field(default_factory=dict)  # read, passes, write (or check)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge(
    base_dir: PathLike,
    adapter_dir: PathLike | Sequence[PathLike],
    out_dir: PathLike,
    *,
    weights: str | Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    device: str = "cpu",
    initial_adapter: PathLike | None = None,
    passes: list[Pass] | None = None,
    allow_nonfinite: bool = False,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    layout: LayoutChoices = None,
    allow_large_replication: bool = False,
    dry_run: bool = False,
) -> MergeReport:
    """Merge a PEFT adapter into a Hugging Face checkpoint, streaming one tensor at a time.

    ``adapter_dir`` is one adapter folder or a list of them: a stack, merged as if each were
    merged into the result of the ones before it (DoRA's norm on the weight it is merged into),
    in one pass over the base with one rounding per tensor (:mod:`loracc.lower.stack`).
    ``weights`` (one per adapter, or "1.0,0.5") scale each adapter's delta; a DoRA adapter's
    weight scales its delta before the normalisation (docs/FORMATS.md "Stacking adapters").
    ``passes`` are optional passes added to the required ones of :func:`merge_pipeline` (or
    configuring them); the pipeline runs in the canonical order. The output folder is written
    under a temporary name and renamed at the end; an existing ``out_dir`` is refused unless
    ``force``. ``layout`` holds ``--layout`` choices (docs/FORMATS.md "Layer layouts"). A
    ``layer_replication`` building more than 4x the base's layers is refused unless
    ``allow_large_replication``. ``progress(done, total, key, bytes_done, bytes_total)`` is
    called after each tensor. ``dry_run`` runs every check of a real merge (the output path,
    the plan, every edited tensor computed and checked) and writes nothing.
    """
    clock = _Clock()
    out = Path(out_dir)
    device, device_notes = _device(device)
    options = MergeOptions(
        dtype=parse_dtype(dtype),
        max_shard_size=parse_size(max_shard_size),
        device=device,
        allow_nonfinite=allow_nonfinite,
        progress=progress,
        workers=workers or min(4, os.cpu_count() or 1),
    )
    paths = adapter_paths(adapter_dir)
    scales = parse_weights(weights, len(paths))
    check_paths(paths, initial_adapter)
    base = Checkpoint(base_folder(base_dir))
    loaded = []
    for path, scale in zip(paths, scales, strict=True):
        adapter = read_peft_adapter(
            path,
            base,
            initial=initial_adapter,
            allow_nonfinite=allow_nonfinite,
            layout=layout,
            allow_large_replication=allow_large_replication,
        )
        require(adapter, Target.MERGE, before_passes=True)  # before any pass reads the base
        loaded.append(weighted(adapter, scale))
    check_stack(loaded)
    clock.lap("read")
    pipeline = merge_pipeline(passes or ())

    def compile_one(adapter: Adapter, below: BaseWeights) -> tuple[Adapter, PipelineResult]:
        result = compile_adapter(adapter, below, pipeline, device=options.device)
        return result.adapter, result

    compiled = compile_stack(loaded, base, compile_one)
    clock.lap("passes")
    stack = [a for a, _ in compiled]
    inputs = [base.folder, *paths] + ([Path(initial_adapter)] if initial_adapter else [])
    if dry_run:
        check_output(out, inputs, force=force)
        stats = check_merge(stack, base, options)
        clock.lap("check")
    else:
        with atomic_dir(out, inputs, force=force) as tmp:
            stats = merge_into(stack, base, tmp, options)
        clock.lap("write")
    steps = labelled_steps([(a, pass_steps(result)) for a, result in compiled])
    return MergeReport(
        output=str(out),
        shards=stats.shards,
        tensors=stats.tensors,
        changed=stats.changed,
        copied=stats.copied,
        bytes_written=stats.bytes_written,
        seconds=round(clock.total(), 3),
        sites=sum(len(a.sites) for a, _ in compiled),
        config_updates=stats.config_updates,
        passes=steps,
        notes=device_notes + [n for a, _ in compiled for n in a.notes],
        dry_run=dry_run,
        steps=clock.steps,
    )


class _Clock:
    """Wall time per step of a call, in seconds (rounded to ms)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.steps: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.steps[step] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def _device(name: str) -> tuple[str, list[str]]:
    """The device deltas are computed on, and a note when ``cuda`` falls back to the CPU."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"--device: '{name}' is not a device name (cpu, cuda, cuda:N)") from e
    if device.type == "cpu":
        return name, []
    if device.type != "cuda":
        raise UnsupportedError(f"--device: '{name}': loracc computes on cpu or cuda only")
    if not torch.cuda.is_available():
        return "cpu", [f"--device {name}: no usable CUDA device here; computed on the CPU"]
    if device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"--device: '{name}': this machine has {count} CUDA device(s)")
    return name, []


def emit_ir(
    adapter_dir: PathLike,
    base_dir: PathLike | None = None,
    *,
    initial_adapter: PathLike | None = None,
    passes: list[Pass] | None = None,
    after_all: bool = False,
    device: str = "cpu",
    layout: LayoutChoices = None,
) -> str:
    """The printed IR after the pipeline, under a ``// pipeline: <spec>`` line naming the passes
    that ran.

    With a base that is the merge pipeline with ``passes`` added (the IR a merge lowers); without
    one nothing is lowered, so only ``passes`` run (in the canonical order). With ``after_all``
    the input and the IR after every pass are printed, each under a ``// <pass>`` header.
    """
    base = Checkpoint(base_folder(base_dir)) if base_dir is not None else None
    adapter_dir = adapter_folder(adapter_dir)
    adapter = read_peft_adapter(adapter_dir, base, initial=initial_adapter, layout=layout)
    pipeline = merge_pipeline(passes or ()) if base is not None else in_order([], passes or ())
    dumps = [("input", print_ir(adapter))] if after_all else []
    result = run_pipeline(
        adapter,
        pipeline,
        PassContext(base=base, device=_device(device)[0]),
        check=True,
        after=(lambda name, a: dumps.append((name, print_ir(a)))) if after_all else None,
    )
    head = f"// pipeline: {pipeline_spec(pipeline) or '(none)'}\n"
    if not after_all:
        return head + print_ir(result.adapter)
    return head + "".join(f"// {name}\n{text}" for name, text in dumps)


@dataclass
class ConvertReport:
    """What ``convert`` wrote, as printed by ``loracc convert --json``."""

    output: str
    tensors: list[str]
    sites: list[dict[str, Any]]
    passes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(
    adapter_dir: PathLike,
    out_dir: PathLike,
    *,
    base_dir: PathLike | None = None,
    initial_adapter: PathLike | None = None,
    rank: int | None = None,
    energy: float | None = None,
    force: bool = False,
    device: str = "cpu",
    layout: LayoutChoices = None,
) -> ConvertReport:
    """Write ``adapter_dir`` as a plain PEFT LoRA adapter: scales folded, residual inits
    reconstructed on the original base, optionally rank-truncated.

    peft loads the output on the original base and computes the same outputs (within the
    truncation error). DoRA is refused: it is not a low-rank delta on the original base.
    """
    if rank is not None and energy is not None:
        raise ConfigError("convert: give --rank or --energy, not both")
    base = Checkpoint(base_folder(base_dir)) if base_dir is not None else None
    adapter_dir = adapter_folder(adapter_dir)
    adapter = read_peft_adapter(adapter_dir, base, initial=initial_adapter, layout=layout)
    require(adapter, Target.PEFT_ADAPTER, before_passes=True)
    passes = convert_pipeline(base=base is not None, rank=rank, energy=energy)
    device, device_notes = _device(device)
    result = run_pipeline(adapter, passes, PassContext(base=base, device=device))
    require(result.adapter, Target.PEFT_ADAPTER, base=base)
    inputs = [adapter_dir] + [Path(p) for p in (initial_adapter,) if p is not None]
    inputs += [base.folder] if base is not None else []
    with atomic_dir(Path(out_dir), inputs, force=force) as tmp:
        keys = write_peft_adapter(result.adapter, tmp)
    before = {s.module: s.rank for s in adapter.sites}
    return ConvertReport(
        output=str(out_dir),
        tensors=keys,
        sites=[
            {"module": s.module, "rank_in": before.get(s.module), "rank": s.rank}
            for s in sorted(result.adapter.sites, key=lambda s: s.module)
        ],
        passes=pass_steps(result),
        notes=device_notes + list(result.adapter.notes),
    )
