"""``loracc export --onnx`` and ``loracc pack``: the ONNX commands (:mod:`loracc.api.onnx` and
:mod:`loracc.api.packing` import the onnx extra only when they run)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from loracc._lazy import lazy_module
from loracc.cli.common import (
    OnceCommand,
    allow_nonfinite_option,
    binding_lines,
    emit,
    force_option,
    guard,
    initial_adapter_option,
    json_option,
    layout_option,
    note_lines,
    step_lines,
    timed,
    verbose_option,
    weights_option,
)
from loracc.errors import ConfigError

if TYPE_CHECKING:
    from loracc.api import onnx as onnx_api
    from loracc.api import packing as pack_api
else:  # torch and the API load when a command runs, not for --help
    onnx_api = lazy_module("loracc.api.onnx")
    pack_api = lazy_module("loracc.api.packing")

__all__ = ["export", "pack"]

base_weights_option = click.option(
    "--base-weights",
    type=click.Path(),
    default=None,
    help="Base Hugging Face folder: layer kinds come from the checkpoint (export also binds by "
    "value where the graph's names say nothing).",
)


@click.command(cls=OnceCommand)
@click.option("--onnx", "onnx_flag", is_flag=True, help="Export to ONNX (the only target so far).")
@click.option("--base", "base_onnx", required=True, type=click.Path(), help="Base model ONNX file.")
@click.option(
    "--adapter",
    "adapters",
    required=True,
    multiple=True,
    type=click.Path(),
    help="PEFT adapter folder. Repeat to stack adapters in a merged export (each merged into "
    "the result of the ones before it, in order); with --keep-lora: slots cover the union of the "
    "targets, one adapter file each (OUT.<folder>.onnx_adapter), the first adapter in the "
    "defaults.",
)
@weights_option
@click.option("-o", "--output", "output", type=click.Path(), help="Output .onnx file.")
@click.option(
    "--keep-lora",
    is_flag=True,
    help="Keep explicit LoRA branches whose weights are onnxruntime adapter slots, and write "
    "OUT.onnx_adapter beside OUT.onnx.",
)
@click.option(
    "--empty-slots/--filled-slots",
    "empty_slots",
    default=None,
    help="With --keep-lora: rank-0 slot defaults, so the plain model behaves as the base and "
    "the adapter ships only as OUT.onnx_adapter (the default); --filled-slots: the defaults hold "
    "the first adapter (a file naming only some slots then mixes with them; docs/ONNX.md).",
)
@click.option(
    "--mixed-batch",
    is_flag=True,
    help="With --keep-lora: one graph serving rows of different adapters; an int64 input "
    "lora_ids ([batch], -1 = base, i = the i-th --adapter) picks each row's adapter from "
    "stacked slots (docs/ONNX.md).",
)
@base_weights_option
@initial_adapter_option
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Write weights to OUT.onnx.data (default: as the base, or when over 2 GB).",
)
@force_option
@click.option(
    "--dry-run",
    is_flag=True,
    help="Every check of a real export (binding, passes, edited tensors, output paths); "
    "write nothing.",
)
@allow_nonfinite_option
@layout_option
@verbose_option
@json_option
@guard
def export(
    onnx_flag: bool,
    base_onnx: str,
    adapters: tuple[str, ...],
    weights: str | None,
    output: str | None,
    keep_lora: bool,
    empty_slots: bool | None,
    mixed_batch: bool,
    base_weights: str | None,
    initial_adapter: str | None,
    external_data: bool | None,
    force: bool,
    dry_run: bool,
    allow_nonfinite: bool,
    layout: tuple[str, ...],
    verbose: bool,
    as_json: bool,
) -> None:
    """Merge an adapter into an existing ONNX model, or keep it as hot-swappable slots.

    \b
    loracc export --onnx --base BASE.onnx --adapter DIR -o OUT.onnx
    loracc export --onnx --keep-lora --base BASE.onnx --adapter DIR -o OUT.onnx
    loracc export --onnx --keep-lora --mixed-batch --base BASE.onnx --adapter A1 --adapter A2 \
        -o OUT.onnx
    """
    if not onnx_flag:
        raise ConfigError("export: say --onnx (the only export target)")
    report = onnx_api.export_onnx(
        base_onnx,
        list(adapters),
        output,
        keep_lora=keep_lora,
        empty_slots=empty_slots,
        mixed_batch=mixed_batch,
        base_weights=base_weights,
        initial_adapter=initial_adapter,
        external_data=external_data,
        force=force,
        dry_run=dry_run,
        allow_nonfinite=allow_nonfinite,
        layout=layout,
        weights=weights,
    )
    emit(timed(report.to_dict(), "export"), as_json, lambda r: _export_text(r, verbose))


def _export_text(r: dict[str, Any], verbose: bool) -> str:
    """A summary; with ``verbose`` the binding table, tensor bindings and slots before it."""
    lines: list[str] = []
    if verbose:
        lines += binding_lines(r["bindings"])
        for t in r["tensors"]:
            lines.append(f"tensor {t['key']} -> {', '.join(t['initializers'])} ({t['how']})")
        for s in r["slots"]:
            lines.append(
                f"slot {s['key']} ({s['op']}, in {s['in']}, out {s['out']}): "
                + ", ".join(s["slots"])
            )
    lines += step_lines(r) + note_lines(r)
    slots = f", {len(r['slots'])} slot groups" if r["slots"] else ""
    bound = f"{r['mode']}: {len(r['bindings'])} sites bound{slots}"
    if r["outputs"]:
        lines.append(
            f"{bound}, {len(r['changed'])} initializers changed, wrote "
            f"{', '.join(r['outputs'])} in {r['seconds']:.2f}s"
        )
    else:
        lines.append(
            f"{bound}, {len(r['changed'])} initializers checked (dry run, nothing written)"
        )
    if not verbose:
        lines.append("(-v prints the binding table and the slots)")
    return "\n".join(lines)


@click.command(cls=OnceCommand)
@click.option(
    "--model", "model", required=True, type=click.Path(), help="ONNX model with adapter slots."
)
@click.option(
    "--adapter",
    "adapters",
    required=True,
    multiple=True,
    type=click.Path(),
    help="PEFT adapter folder; repeat with --mixed-batch (slot i = the i-th adapter).",
)
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(), help="NAME.onnx_adapter."
)
@click.option(
    "--mixed-batch",
    is_flag=True,
    help="The model is a --mixed-batch export: one file with the adapters' stacked slots.",
)
@base_weights_option
@initial_adapter_option
@force_option
@allow_nonfinite_option
@layout_option
@json_option
@guard
def pack(
    model: str,
    adapters: tuple[str, ...],
    output: str,
    mixed_batch: bool,
    base_weights: str | None,
    initial_adapter: str | None,
    force: bool,
    allow_nonfinite: bool,
    layout: tuple[str, ...],
    as_json: bool,
) -> None:
    """Write an onnxruntime adapter file for a model with adapter slots.

    The model is one exported with --keep-lora, or a slotted Olive / onnxruntime-genai model
    (the file then uses its slot names, a fused q/k/v adapter split as its slots are). The
    adapter is checked against the model's slots (module, shapes, dtype); ranks may differ from
    the export's. Activate it with RunOptions.add_active_adapter.

    \b
    loracc pack --model OUT.onnx --adapter DIR -o NAME.onnx_adapter
    loracc pack --mixed-batch --model OUT.onnx --adapter B1 --adapter B2 -o SET.onnx_adapter
    """
    if len(adapters) > 1 and not mixed_batch:
        raise ConfigError(
            f"pack: --adapter given {len(adapters)} times; one file holds one adapter "
            "(several need --mixed-batch and a --mixed-batch model)"
        )
    options: dict[str, Any] = dict(
        base_weights=base_weights,
        initial_adapter=initial_adapter,
        force=force,
        allow_nonfinite=allow_nonfinite,
        layout=layout,
    )
    if mixed_batch:
        report = pack_api.pack_mixed(model, list(adapters), output, **options)
    else:
        report = pack_api.pack(model, adapters[0], output, **options)
    emit(report.to_dict(), as_json, _pack_text)


def _pack_text(r: dict[str, Any]) -> str:
    lines = [
        f"packed {r['adapter']} into {r['output']}: {len(r['filled'])} of {r['slots']} slots "
        f"filled, {r['params']} parameters",
    ]
    if r["empty"]:
        lines.append(f"  rank 0 (not in this adapter): {json.dumps(r['empty'])}")
    return "\n".join(lines + note_lines(r))
