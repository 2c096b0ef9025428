"""The ONNX export API: merge an adapter into an ONNX model, or keep it as adapter slots.

:func:`export_onnx` binds the adapter's sites to an existing ONNX export of the base model
(TorchScript, dynamo, optimum or onnxruntime-genai), runs the merge pipeline with the ONNX
weights as the base, and either edits the bound initializers (merged) or adds LoRA branches
whose weights are onnxruntime adapter slots (``keep_lora``); :func:`bind_onnx` is its binding
table alone. :mod:`loracc.api.packing` writes adapter files for a model with slots. Nothing here
imports onnx until it is called, so ``import loracc`` works without the ``onnx`` extra.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracc.api.common import (
    LayoutChoices,
    PathLike,
    check_paths,
    onnx_base_file,
    parse_weights,
)
from loracc.api.common import adapter_paths as _paths
from loracc.api.onnx_common import (
    AdapterWriter,
    base_checkpoint,
    compile_for,
    protected_inputs,
    read_adapter,
)
from loracc.errors import ConfigError, UnsupportedError
from loracc.legality import Target

if TYPE_CHECKING:
    from loracc.io.checkpoint import Checkpoint
    from loracc.ir import Adapter
    from loracc.lower.onnx.bind import BindingTable
    from loracc.lower.onnx.slots import SlotGroup

__all__ = ["OnnxReport", "bind_onnx", "export_onnx"]


@dataclass
class OnnxReport:
    """What ``export_onnx`` did (or would do, with ``dry_run``), as ``--json`` prints it."""

    base: str
    mode: str
    outputs: list[str]
    bindings: list[dict[str, Any]]
    tensors: list[dict[str, Any]]
    changed: list[str]
    slots: list[dict[str, Any]] = field(default_factory=list)
    adapter_files: list[dict[str, str]] = field(default_factory=list)
    baked: list[str] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bind_onnx(
    base_onnx: PathLike,
    adapters: PathLike | Sequence[PathLike],
    *,
    base_weights: PathLike | None = None,
    layout: LayoutChoices = None,
) -> list[dict[str, Any]]:
    """The binding table (site -> node, initializer, orientation, rule): bind and compile
    only, no edited tensor computed (``export_onnx(..., dry_run=True)`` checks everything)."""
    ckpt = base_checkpoint(base_weights)
    _, _, table, loaded, compiled, _ = _compiled(
        onnx_base_file(base_onnx), _paths(adapters), ckpt, None, False, layout, Target.ONNX_MERGE
    )
    return table.describe([*loaded, *compiled])


def _new_folder(output: Path, genai: Sequence[Any]) -> bool:
    """Whether the export makes the output's folder: a genai folder written to a new folder."""
    return bool(genai) and not output.parent.exists()


def _rehearse(
    model: Any,
    changed: Sequence[str],
    adapter_files: Sequence[tuple[Path, AdapterWriter]],
    output: Path | None,
    files: Sequence[tuple[Path, Any]],
    new_folder: bool,
    protected: Sequence[Path],
    *,
    force: bool,
    external_data: bool,
) -> None:
    """A dry run's write without the writing: every edited tensor is computed and checked
    (shape, NaN/Inf as written), every adapter file's arrays are made, and with ``output``
    every path is checked as the writer would (suffix, inputs, existing files, --force)."""
    from loracc.io.onnx_model import output_paths
    from loracc.io.output import check_output

    for name in changed:
        model.graph.initializers[name].const_value.numpy()  # computed, checked, dropped
    for _, writer in adapter_files:
        writer.arrays()
    if output is None:
        return
    paths = output_paths(output, external_data=external_data, extra=[p for p, _ in files])
    for path in [output.parent] if new_folder else paths:
        check_output(path, protected, force=force)


def _write(
    model: Any,
    output: Path,
    files: Sequence[tuple[Path, Any]],
    new_folder: bool,
    protected: Sequence[Path],
    *,
    force: bool,
    external_data: bool,
) -> list[str]:
    """Write the model and ``files`` as one set; into a folder made as one more output when
    ``new_folder`` (so a failed export leaves no folder behind)."""
    from loracc.io.onnx_model import write_outputs
    from loracc.io.output import atomic_dir

    if not new_folder:
        written = write_outputs(
            model, output, inputs=protected, force=force, external_data=external_data, extra=files
        )
        return [str(p) for p in written]
    folder = output.parent
    with atomic_dir(folder, protected, force=force) as tmp:
        inside = [(tmp / p.name, w) for p, w in files]
        written = write_outputs(
            model, tmp / output.name, inputs=protected, force=False,
            external_data=external_data, extra=inside,
        )  # fmt: skip
    return [str(folder / p.name) for p in written]


def _adapter_paths(out: Path, adapters: Sequence[Path]) -> list[Path]:
    stem = out.with_suffix("")
    if len(adapters) == 1:
        return [stem.with_name(stem.name + ".onnx_adapter")]
    paths: list[Path] = []
    for a in adapters:
        name = a.resolve().name or "adapter"
        path = stem.with_name(f"{stem.name}.{name}.onnx_adapter")
        i = 1
        while path in paths:
            path = stem.with_name(f"{stem.name}.{name}-{i}.onnx_adapter")
            i += 1
        paths.append(path)
    return paths


def _bind_all(
    index: Any, adapters: list[Adapter], ckpt: Checkpoint | None, base_path: Path, target: Target
) -> tuple[BindingTable, list[Adapter], list[dict[str, Any]]]:
    """Bind and compile ``adapters``: a merge stacks them (each compiled against the model the
    ones before it made, :mod:`loracc.lower.stack`); keep-lora compiles each on the base."""
    from loracc.lower.onnx.bind import bind_adapter
    from loracc.lower.onnx.weights import OnnxBase
    from loracc.lower.stack import compile_stack, labelled_steps

    table = bind_adapter(index, adapters, base=ckpt)
    onnx_base = OnnxBase.from_table(table, adapters, str(base_path))
    if target is Target.ONNX_MERGE:
        done = compile_stack(adapters, onnx_base, lambda a, below: compile_for(a, below, target))
    else:
        done = [compile_for(a, onnx_base, target) for a in adapters]
    compiled = [c for c, _ in done]
    steps = labelled_steps(done)
    # passes may add targets (untying); bind whatever is new
    bind_adapter(index, compiled, base=ckpt, table=table)
    return table, compiled, steps


def _compiled(
    base_path: Path,
    adapter_paths: Sequence[Path],
    ckpt: Checkpoint | None,
    initial_adapter: PathLike | None,
    allow_nonfinite: bool,
    layout: LayoutChoices,
    target: Target,
    weights: Sequence[float] | None = None,
) -> tuple[Any, Any, BindingTable, list[Adapter], list[Adapter], list[dict[str, Any]]]:
    """The base model read, its graph indexed, the adapters read (each delta scaled by its
    weight), bound and compiled: (model, index, table, loaded, compiled, pass steps)."""
    from loracc.io.onnx_model import load_model
    from loracc.lower.onnx.index import GraphIndex
    from loracc.lower.onnx.surgery import lift_weight_constants
    from loracc.lower.stack import check_stack, weighted

    model = load_model(base_path)
    lift_weight_constants(model.graph)
    index = GraphIndex(model)
    loaded = [
        read_adapter(p, ckpt, initial_adapter, allow_nonfinite, layout, target=target, index=index)
        for p in adapter_paths
    ]
    if weights is not None:
        loaded = [weighted(a, w) for a, w in zip(loaded, weights, strict=True)]
    if target is Target.ONNX_MERGE:
        check_stack(loaded)
    table, compiled, steps = _bind_all(index, loaded, ckpt, base_path, target)
    return model, index, table, loaded, compiled, steps


def export_onnx(
    base_onnx: PathLike,
    adapters: PathLike | Sequence[PathLike],
    output: PathLike | None,
    *,
    keep_lora: bool = False,
    empty_slots: bool | None = None,
    mixed_batch: bool = False,
    base_weights: PathLike | None = None,
    initial_adapter: PathLike | None = None,
    external_data: bool | None = None,
    force: bool = False,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    layout: LayoutChoices = None,
    weights: str | Sequence[float] | None = None,
) -> OnnxReport:
    """Merge ``adapters`` into ``base_onnx``, or add them as adapter slots (``keep_lora``).

    Args:
        base_onnx: an ONNX export of the base model (external data beside it is read lazily).
        adapters: one PEFT adapter folder, or several: merged, a stack (each merged into the
            result of the ones before it, in order, one rounding; as ``loracc merge``); with
            ``keep_lora``, slots = the union of their targets, one adapter file each, the first
            adapter in the defaults.
        output: the ``.onnx`` path to write (None with ``dry_run``).
        keep_lora: explicit LoRA branches with slots, plus ``<output stem>.onnx_adapter``.
        empty_slots: with ``keep_lora``, rank-0 defaults: the plain model behaves as the base
            and the adapter is only in its file. None (the default) means True; False writes
            the first adapter into the defaults (an adapter file that names only some slots
            then mixes with them, see docs/ONNX.md).
        mixed_batch: with ``keep_lora``, one graph for rows of different adapters: an int64
            input ``lora_ids`` ([batch], −1 = base) picks each row's adapter from stacked slots,
            the adapters in order; ``<output stem>.onnx_adapter`` holds the same set
            (:mod:`loracc.lower.onnx.mixed`, docs/ONNX.md).
        base_weights: the base Hugging Face folder, to bind by value when names say nothing
            and to decide layer kinds from the checkpoint.
        initial_adapter: the adapter saved before training (pissa_niter, corda, ...).
        external_data: force external data on/off; default: as the base, or when over 2 GB.
        force: replace existing outputs.
        dry_run: everything a real export does (binding, passes, edited tensors computed and
            checked, slots, adapter files packed, the outputs' paths checked when ``output``
            is given) except writing.
        allow_nonfinite: accept NaN or Inf in the adapters' tensors, and write edited
            initializers (or slot values) holding NaN or Inf.
        layout: ``--layout`` choices for sites nothing else decides (docs/FORMATS.md).
        weights: merged only: one weight per adapter ("1.0,0.5"), scaling its delta (a DoRA
            adapter's before the normalisation).
    """
    from loracc.io.genai import genai_files
    from loracc.io.onnx_model import needs_external_data
    from loracc.lower.onnx.lora import insert_slots, pack_params, plan_groups
    from loracc.lower.onnx.merge import apply_edits, merge_edits

    start = time.perf_counter()
    base_path = onnx_base_file(base_onnx)
    adapter_paths = _paths(adapters)
    if weights is not None and keep_lora:
        raise ConfigError("--weights scales adapters merged together; --keep-lora merges none")
    scales = parse_weights(weights, len(adapter_paths))
    if not keep_lora:
        check_paths(adapter_paths, initial_adapter)
    if empty_slots is not None and not keep_lora:
        flag = "--empty-slots" if empty_slots else "--filled-slots"
        raise ConfigError(f"{flag} needs --keep-lora")
    if mixed_batch and (not keep_lora or empty_slots is not None):
        raise ConfigError(
            "--mixed-batch needs --keep-lora, without --empty-slots/--filled-slots (its slot "
            "defaults hold the adapters in --adapter order)"
        )
    if empty_slots is None:
        empty_slots = True  # a model's slots never mix two adapters (docs/ONNX.md)
    if output is None and not dry_run:
        raise ConfigError("-o/--output is required unless --dry-run")
    ckpt = base_checkpoint(base_weights)
    target = Target.ONNX_KEEP_LORA if keep_lora else Target.ONNX_MERGE
    model, index, table, loaded, compiled, steps = _compiled(
        base_path, adapter_paths, ckpt, initial_adapter, allow_nonfinite, layout, target, scales
    )
    protected = protected_inputs(base_path, adapter_paths, model, initial_adapter, base_weights)
    genai = genai_files(base_path, Path(output), protected) if output is not None else None
    if genai is not None:
        protected += genai.sources
    if external_data is None:  # decided by the base, before edits move tensors into memory
        external_data = needs_external_data(model)
    notes = [n for a in compiled for n in a.notes]
    report = OnnxReport(
        base=str(base_path),
        mode="keep-lora" if keep_lora else "merged",
        outputs=[],
        bindings=table.describe([*loaded, *compiled]),
        tensors=[tb.describe() for tb in table.tensors.values()],
        changed=[],
        passes=steps,
        notes=notes,
    )
    extra: list[tuple[Path, AdapterWriter]] = []
    if not keep_lora:
        plan = merge_edits(index, table, compiled)
        report.changed = apply_edits(index, plan, allow_nonfinite=allow_nonfinite)
    elif mixed_batch:
        extra.append(_export_mixed(index, table, compiled, report, output, str(base_path)))
    else:
        if sum(1 for a in compiled if a.replacements or a.token_rows) > 1:
            raise UnsupportedError(
                "several adapters replace base tensors (modules_to_save, biases, trainable "
                "tokens); only one adapter's replacements can be baked into the base"
            )
        groups = plan_groups(table, compiled)
        defaults = pack_params(groups, None if empty_slots else compiled[0])
        if not empty_slots:
            report.notes.append(
                f"--filled-slots: the slot defaults hold {compiled[0].name}; a file that names "
                "only some slots runs beside the rest of it (loracc run refuses such a file; "
                "a raw onnxruntime session does not)"
            )
        adapter_files = (
            _adapter_paths(Path(output), adapter_paths)
            if output is not None
            else [Path(f"{p.name}.onnx_adapter") for p in adapter_paths]
        )
        for a, path in zip(compiled, adapter_files, strict=True):
            extra.append((path, AdapterWriter(pack_params(groups, a))))
            report.adapter_files.append({"adapter": a.name, "file": str(path)})
        bake = next((a for a in compiled if a.replacements or a.token_rows), None)
        if bake is not None:
            baked = merge_edits(index, table, bake, lora=False)
            report.baked = [r.target for r in bake.replacements]
            report.baked += [f"{t.target} rows {list(t.indices)}" for t in bake.token_rows]
            report.notes.append(
                "baked into the base initializers (not swappable, present with empty slots "
                "too): " + ", ".join(report.baked)
            )
            report.changed = apply_edits(index, baked, allow_nonfinite=allow_nonfinite)
        report.slots = [_slot_row(g) for g in groups]
        insert_slots(index, table, groups, defaults)
    side = genai.files if genai is not None else []
    if genai is not None and genai.note:
        report.notes.append(genai.note)
    files = [*extra, *side]
    out = Path(output) if output is not None else None
    new_folder = out is not None and _new_folder(out, side)
    if dry_run:
        _rehearse(
            model, report.changed, extra, out, files, new_folder, protected,
            force=force, external_data=external_data,
        )  # fmt: skip
    else:
        assert out is not None
        report.outputs = _write(
            model, out, files, new_folder, protected, force=force, external_data=external_data
        )
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _slot_row(g: SlotGroup) -> dict[str, Any]:
    return {
        "key": g.key,
        "op": g.op,
        "in": g.fan_in,
        "out": g.fan_out,
        "dtype": g.dtype,
        "slots": [n for n in (g.A, g.B, g.scale, g.bias) if n],
        "members": [m.module for m in g.members],
    }


def _export_mixed(
    index: Any,
    table: BindingTable,
    compiled: Sequence[Adapter],
    report: OnnxReport,
    output: PathLike | None,
    where: str,
) -> tuple[Path, AdapterWriter]:
    """Add the mixed-batch branches and stacked slots (defaults: ``compiled`` in order); the
    adapter file of the same set."""
    from loracc.lower.onnx.mixed import IDS_INPUT, insert_mixed, plan_mixed, stack_params

    layout = plan_mixed(table, compiled, where)
    params = stack_params(layout, compiled, where)
    (path,) = _adapter_paths(Path(output or "mixed.onnx"), [Path(where)])
    report.mode = "mixed-batch"
    report.adapter_files.append({"adapter": ", ".join(layout.adapters), "file": str(path)})
    report.slots = [_slot_row(g) | {"rank": layout.ranks[g.key]} for g in layout.groups]
    ids = ", ".join(f"{i} = {name}" for i, name in enumerate(layout.adapters))
    report.notes.append(
        f"mixed batch: input '{IDS_INPUT}' (int64 [batch]) picks each row's adapter: -1 = base, "
        f"{ids}; other ids give NaN rows; stacked slots {layout.stack_bytes() / 2**20:.1f} MiB "
        "(fp32)"
    )
    insert_mixed(index, table, layout, params)
    return path, AdapterWriter(params)
