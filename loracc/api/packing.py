"""Adapter files for ONNX models with adapter slots: :func:`pack` writes one adapter's
``.onnx_adapter`` file (for a keep-lora export, or a slotted model another tool wrote),
:func:`pack_mixed` one file of several adapters for a mixed-batch graph,
:func:`check_adapter_files` checks files against a model and :func:`adapter_session` serves
them per request. Nothing here imports onnx until it is called."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loracc.api.common import LayoutChoices, PathLike, adapter_folder
from loracc.api.common import adapter_paths as _paths
from loracc.api.onnx_common import (
    AdapterWriter,
    SlotParams,
    base_checkpoint,
    compile_for,
    protected_inputs,
    read_adapter,
)
from loracc.errors import ConfigError, UnsupportedError
from loracc.legality import Target

if TYPE_CHECKING:
    from loracc.io.ort import AdapterSession
    from loracc.ir import Adapter
    from loracc.lower.onnx.slots import SlotGroup

__all__ = [
    "PackReport",
    "adapter_session",
    "check_adapter_files",
    "pack",
    "pack_mixed",
]


@dataclass
class PackReport:
    """What ``pack`` wrote."""

    model: str
    adapter: str
    output: str
    slots: int
    filled: list[str]
    empty: list[str]
    params: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pack(
    model: PathLike,
    adapter: PathLike,
    output: PathLike,
    *,
    base_weights: PathLike | None = None,
    initial_adapter: PathLike | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    layout: LayoutChoices = None,
) -> PackReport:
    """Write an ``.onnx_adapter`` file of ``adapter`` for a model with adapter slots.

    The model is a keep-lora export (its ``loracc.slots`` manifest), or a slotted model another
    tool wrote (Olive, onnxruntime-genai's builder): slots found by their names, the file in
    the model's names, a fused q/k/v adapter split as the model's slots are (docs/ONNX.md).
    The adapter is checked against the model's slots: every module it targets must have one,
    with the same input and output sizes (ranks may differ); DoRA and lora_bias need their
    slots. Slots the adapter does not use get rank-0 values, so no other adapter's default
    stays active. Tensors cast to the slots' dtype. ``allow_nonfinite`` accepts NaN or Inf in
    the adapter's tensors (and writes them). The output may not overwrite the model, its
    external data, the adapter, ``initial_adapter`` or ``base_weights``.
    """
    from loracc.io.onnx_model import load_model
    from loracc.io.output import atomic_files
    from loracc.lower.onnx.mixed import MIXED_KEY
    from loracc.lower.onnx.slots import MANIFEST_KEY

    model_path, adapter_path, out = Path(model), adapter_folder(adapter), Path(output)
    if out.suffix != ".onnx_adapter":
        raise ConfigError(f"{out}: an adapter file name must end in .onnx_adapter")
    onnx_model = load_model(model_path)
    if MIXED_KEY in onnx_model.metadata_props:
        raise ConfigError(
            f"{model_path}: a mixed-batch graph; write its adapter set with "
            "`loracc pack --mixed-batch`"
        )
    foreign = MANIFEST_KEY not in onnx_model.metadata_props
    if foreign:  # before the adapter is read: a model without slots is refused first
        from loracc.lower.onnx.foreign import foreign_groups

        found = foreign_groups(onnx_model, str(model_path))
    else:
        from loracc.lower.onnx.index import GraphIndex
    loaded = read_adapter(
        adapter_path,
        base_checkpoint(base_weights),
        initial_adapter,
        allow_nonfinite,
        layout,
        target=Target.ONNX_KEEP_LORA,
        index=None if foreign else GraphIndex(onnx_model),
    )
    if foreign:
        groups, params, notes = _pack_foreign(*found, loaded, model_path, adapter_path)
    else:
        groups, params, notes = _pack_manifest(onnx_model, loaded, model_path, adapter_path)
    inputs = protected_inputs(model_path, [adapter_path], onnx_model, initial_adapter, base_weights)
    with atomic_files([out], inputs, force=force) as (tmp,):
        AdapterWriter(params)(tmp)
    return PackReport(
        model=str(model_path),
        adapter=str(adapter_path),
        output=str(out),
        slots=len(groups),
        filled=sorted(g.key for g in groups if g.members),
        empty=sorted(g.key for g in groups if not g.members),
        params=sum(int(v.numel()) for v, _ in params.values()),
        notes=notes,
    )


def pack_mixed(
    model: PathLike,
    adapters: Sequence[PathLike],
    output: PathLike,
    *,
    base_weights: PathLike | None = None,
    initial_adapter: PathLike | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    layout: LayoutChoices = None,
) -> PackReport:
    """Write one ``.onnx_adapter`` file holding ``adapters`` (slot 0, 1, … in order) for a
    mixed-batch graph (``export_onnx(..., mixed_batch=True)``): activated, ``lora_ids`` selects
    among them. Refused: more adapters than the graph's slots, a rank above a slot's, a module
    without a slot, DoRA where the graph has no DoRA scale, and base tensors replaced
    (:mod:`loracc.lower.onnx.mixed`). Slots past
    the adapters given are unfilled: their ids give NaN rows."""
    from loracc.io.onnx_model import load_model
    from loracc.io.output import atomic_files
    from loracc.lower.onnx.mixed import NO_REPLACEMENTS, read_mixed, stack_params

    model_path, out = Path(model), Path(output)
    adapter_paths = _paths(adapters)
    if out.suffix != ".onnx_adapter":
        raise ConfigError(f"{out}: an adapter file name must end in .onnx_adapter")
    onnx_model = load_model(model_path)
    where = str(model_path)
    mixed = read_mixed(onnx_model, where)
    if len(adapter_paths) > mixed.slots:
        raise UnsupportedError(
            f"{where}: {len(adapter_paths)} adapters for a mixed-batch graph with {mixed.slots} "
            "adapter slots (export the graph with at least as many --adapter)"
        )
    ckpt = base_checkpoint(base_weights)
    compiled = []
    for path in adapter_paths:
        loaded = read_adapter(
            path, ckpt, initial_adapter, allow_nonfinite, layout, target=Target.ONNX_KEEP_LORA
        )
        compiled.append(
            _compile_for_slots(
                onnx_model, mixed.groups, loaded, model_path, path, f"; {NO_REPLACEMENTS}"
            )
        )
    params = stack_params(mixed, compiled, where)
    inputs = protected_inputs(model_path, adapter_paths, onnx_model, initial_adapter, base_weights)
    with atomic_files([out], inputs, force=force) as (tmp,):
        AdapterWriter(params)(tmp)
    used = {s.module for a in compiled for s in a.sites}
    notes = [n for a in compiled for n in a.notes]
    if len(compiled) < mixed.slots:
        notes.append(
            f"{len(compiled)} of {mixed.slots} adapter slots filled: lora_ids "
            f"{len(compiled)}..{mixed.slots - 1} give NaN rows"
        )
    return PackReport(
        model=where,
        adapter=", ".join(str(p) for p in adapter_paths),
        output=str(out),
        slots=len(mixed.groups),
        filled=sorted(g.key for g in mixed.groups if any(m.module in used for m in g.members)),
        empty=sorted(g.key for g in mixed.groups if all(m.module not in used for m in g.members)),
        params=sum(int(v.numel()) for v, _ in params.values()),
        notes=notes,
    )


def _pack_manifest(
    onnx_model: Any, loaded: Adapter, model_path: Path, adapter_path: Path
) -> tuple[list[SlotGroup], SlotParams, list[str]]:
    """The slot values of ``loaded`` for a keep-lora export: its manifest's groups, the passes
    run against the base weights behind the slots. Groups keep only the members it fills."""
    from loracc.lower.onnx.lora import pack_params
    from loracc.lower.onnx.slots import read_manifest

    groups = read_manifest(onnx_model, str(model_path))
    compiled = _compile_for_slots(onnx_model, groups, loaded, model_path, adapter_path)
    params = pack_params(groups, compiled)
    used = {s.module for s in compiled.sites}
    for g in groups:
        g.members = [m for m in g.members if m.module in used]
    return groups, params, list(compiled.notes)


def _compile_for_slots(
    onnx_model: Any,
    groups: Sequence[SlotGroup],
    loaded: Adapter,
    model_path: Path,
    adapter_path: Path,
    replaced: str = ": export a model with this adapter (--keep-lora) to bake them",
) -> Adapter:
    """``loaded`` compiled for the slot ``groups`` of ``onnx_model``: the passes run against the
    base weights behind the slots, checked to fit them; base tensors it really replaces are
    refused with the ``replaced`` hint."""
    from loracc.ir import SiteKind
    from loracc.lower.onnx.bind import bind_adapter
    from loracc.lower.onnx.index import GraphIndex
    from loracc.lower.onnx.lora import check_fits, manifest_base
    from loracc.lower.onnx.surgery import lift_weight_constants
    from loracc.lower.onnx.weights import OnnxBase
    from loracc.passes import PassContext
    from loracc.passes.apply_graph_layout import graph_layout
    from loracc.passes.drop_noop_replacements import DropNoopReplacements

    if loaded.replacements:
        lift_weight_constants(onnx_model.graph)
        replacing = replace(loaded, sites=(), token_rows=())
        table = bind_adapter(GraphIndex(onnx_model), [replacing])
        ctx = PassContext(base=OnnxBase.from_table(table, [replacing], str(model_path)))
        loaded = DropNoopReplacements()(loaded, ctx).adapter
    _refuse_replacements(loaded, adapter_path, replaced)
    kinds = {m.module: SiteKind(m.kind) for g in groups for m in g.members}
    sites = tuple(
        graph_layout(s, kinds[s.module], f"slot manifest of {model_path}")
        if s.module in kinds
        and s.kind in (SiteKind.LINEAR, SiteKind.CONV1D)
        and kinds[s.module] in (SiteKind.LINEAR, SiteKind.CONV1D)
        else s
        for s in loaded.sites
    )
    loaded = replace(loaded, sites=sites)
    group_of = {m.module: g for g in groups for m in g.members}
    check_fits(group_of, loaded, str(model_path))
    base = manifest_base(onnx_model, groups, str(model_path))
    compiled, _ = compile_for(loaded, base, Target.ONNX_KEEP_LORA)
    check_fits(group_of, compiled, str(model_path))
    return compiled


def _refuse_replacements(adapter: Adapter, adapter_path: Path, hint: str) -> None:
    if adapter.replacements or adapter.token_rows:
        names = [r.target for r in adapter.replacements] + [t.target for t in adapter.token_rows]
        raise UnsupportedError(
            f"{adapter_path}: replaces base tensors ({', '.join(names)}); an adapter file holds "
            f"only LoRA slots{hint}"
        )


def _pack_foreign(
    groups: list[SlotGroup],
    fixed: dict[str, int],
    loaded: Adapter,
    model_path: Path,
    adapter_path: Path,
) -> tuple[list[SlotGroup], SlotParams, list[str]]:
    """The slot values of ``loaded`` for a slotted model another tool wrote (``groups`` and
    ``fixed`` ranks from :func:`~loracc.lower.onnx.foreign.foreign_groups`). The base weights
    behind its slots are not described, so only plain LoRA factors are packed."""
    from torch.nn.functional import pad

    from loracc.lower.onnx.foreign import match_foreign
    from loracc.lower.onnx.lora import pack_params
    from loracc.lower.onnx.slots import MANIFEST_KEY
    from loracc.lower.onnx.weights import OnnxBase

    where = str(model_path)
    _refuse_replacements(loaded, adapter_path, "")
    # the checks before any pass: a pass that needs base weights fails on the empty base below
    match_foreign(groups, loaded, where)
    compiled, _ = compile_for(loaded, OnnxBase({}, where), Target.ONNX_KEEP_LORA)
    compiled = match_foreign(groups, compiled, where)
    params = pack_params(groups, compiled)
    for g in groups:
        rank = fixed.get(g.key)
        have = params[g.A][0].shape[1]
        if rank is not None and have != rank:
            if have > rank:
                raise UnsupportedError(
                    f"{adapter_path}: rank {have} for '{g.key}', whose slot in {where} has the "
                    f"fixed rank {rank}"
                )
            a, b = params[g.A][0], params[g.B][0]  # zero rank columns/rows add nothing
            params[g.A] = (pad(a, (0, rank - have)), g.dtype)
            params[g.B] = (pad(b, (0, 0, 0, rank - have)), g.dtype)
    notes = [*compiled.notes, f"slots found by their names (no '{MANIFEST_KEY}' metadata)"]
    return groups, params, notes


def check_adapter_files(model: PathLike, *adapter_files: PathLike) -> None:
    """Refuse adapter files that, activated together on ``model``, leave some of its active slot
    defaults in place (:func:`loracc.lower.onnx.slots.check_adapter_files`)."""
    from loracc.lower.onnx.slots import check_adapter_files as check

    check(model, *adapter_files)


def adapter_session(
    session: Any, adapters: Mapping[str, PathLike], *, model: PathLike | None = None
) -> AdapterSession:
    """``session`` (an ``onnxruntime.InferenceSession`` of ``model``) wrapped so that each
    request runs the adapter chosen with ``with wrapped.active(name):``, also for callers that
    pass no ``RunOptions`` or run through IOBinding (optimum's ``ORTModelForCausalLM``:
    ``ort_model.session = loracc.adapter_session(ort_model.session, {...})``).

    ``adapters`` maps names to ``.onnx_adapter`` files. Each file is checked against the model
    first (:func:`check_adapter_files`: it must not leave filled slot defaults beside it), and
    the defaults of every slot the files set are kept, so an IOBinding request without adapter
    runs the model's own defaults. ``model`` defaults to the path the session was created from.

    Raises:
        InputError: a file sets a tensor that is not one of the model's adapter slots.
        UnsupportedError: a file leaves filled slot defaults of the model in place.
    """
    from loracc.errors import InputError
    from loracc.io.onnx_model import load_model
    from loracc.io.ort import AdapterSession, adapter_names, session_device

    path = Path(model if model is not None else session._model_path)
    graph = load_model(path).graph
    slot_inputs = {v.name for v in graph.inputs} & set(graph.initializers)
    defaults = {}
    for file in adapters.values():
        check_adapter_files(path, file)
        for name in sorted(adapter_names(file)):
            if name not in slot_inputs:
                raise InputError(
                    f"{file}: '{name}' is not an adapter slot of {path} (write the file with "
                    "`loracc pack --model` for this model)"
                )
            value = graph.initializers[name].const_value
            assert value is not None  # an initializer has a value
            defaults[name] = value.numpy()
    return AdapterSession(session, adapters, defaults, *session_device(session))
