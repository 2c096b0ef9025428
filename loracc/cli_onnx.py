"""``loracc export --onnx`` and ``loracc pack``: the ONNX commands (onnx extra imported lazily)."""

from __future__ import annotations

import json
from typing import Any

import click

from loracc.cli import _emit, _guard
from loracc.errors import ConfigError

__all__ = ["export", "pack"]


@click.command()
@click.option("--onnx", "onnx_flag", is_flag=True, help="Export to ONNX (the only target so far).")
@click.option("--base", "base_onnx", required=True, type=click.Path(), help="Base model ONNX file.")
@click.option(
    "--adapter",
    "adapters",
    required=True,
    multiple=True,
    type=click.Path(),
    help="PEFT adapter folder. Repeat with --keep-lora: slots cover the union of the targets, "
    "one adapter file each (OUT.<folder>.onnx_adapter), the first adapter in the defaults.",
)
@click.option("-o", "--output", "output", type=click.Path(), help="Output .onnx file.")
@click.option(
    "--keep-lora",
    is_flag=True,
    help="Keep explicit LoRA branches whose weights are onnxruntime adapter slots, and write "
    "OUT.onnx_adapter beside OUT.onnx.",
)
@click.option(
    "--empty-slots",
    is_flag=True,
    help="With --keep-lora: rank-0 slot defaults, so the plain model behaves as the base.",
)
@click.option(
    "--base-weights",
    type=click.Path(),
    default=None,
    help="Base Hugging Face folder: bind by value where the graph's names say nothing.",
)
@click.option(
    "--initial-adapter",
    type=click.Path(),
    default=None,
    help="The adapter saved before training (pissa_niter, corda, lora_ga).",
)
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Write weights to OUT.onnx.data (default: as the base, or when over 2 GB).",
)
@click.option("--force", is_flag=True, help="Replace existing outputs.")
@click.option("--dry-run", is_flag=True, help="Bind and show the binding; write nothing.")
@click.option("--allow-nonfinite", is_flag=True, help="Write edited tensors holding NaN or Inf.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_guard
def export(
    onnx_flag: bool,
    base_onnx: str,
    adapters: tuple[str, ...],
    output: str | None,
    keep_lora: bool,
    empty_slots: bool,
    base_weights: str | None,
    initial_adapter: str | None,
    external_data: bool | None,
    force: bool,
    dry_run: bool,
    allow_nonfinite: bool,
    as_json: bool,
) -> None:
    """Merge an adapter into an existing ONNX model, or keep it as hot-swappable slots.

    \b
    loracc export --onnx --base BASE.onnx --adapter DIR -o OUT.onnx
    loracc export --onnx --keep-lora --base BASE.onnx --adapter DIR -o OUT.onnx
    """
    if not onnx_flag:
        raise ConfigError("export: say --onnx (the only export target)")
    from loracc.onnx_api import export_onnx

    report = export_onnx(
        base_onnx,
        list(adapters),
        output,
        keep_lora=keep_lora,
        empty_slots=empty_slots,
        base_weights=base_weights,
        initial_adapter=initial_adapter,
        external_data=external_data,
        force=force,
        dry_run=dry_run,
        allow_nonfinite=allow_nonfinite,
    )
    _emit(report.to_dict(), as_json, _export_text)


def _export_text(r: dict[str, Any]) -> str:
    head = f"{'module':<44} {'op':<7} {'initializer':<32} {'T':<2} {'how':<12} nodes"
    lines = [head, "-" * len(head)]
    for b in r["bindings"]:
        init = b["initializer"] or ""
        how = b["how"] + (f" {b['block'][0]}:{b['block'][1]}" if b["block"] else "")
        lines.append(
            f"{b['module']:<44} {b['op']:<7} {init[:32]:<32} {'T' if b['transposed'] else '-':<2} "
            f"{how:<12} {', '.join(b['nodes'])}"
        )
    for t in r["tensors"]:
        lines.append(f"tensor {t['key']} -> {', '.join(t['initializers'])} ({t['how']})")
    for s in r["slots"]:
        lines.append(
            f"slot {s['key']} ({s['op']}, in {s['in']}, out {s['out']}): {', '.join(s['slots'])}"
        )
    for step in r["passes"]:
        for d in step["details"]:
            lines.append(f"  {step['pass']}: {d}")
    lines += [f"  note: {n}" for n in r["notes"]]
    if r["outputs"]:
        lines.append(
            f"{r['mode']}: {len(r['bindings'])} sites, {len(r['changed'])} initializers "
            f"changed, wrote {', '.join(r['outputs'])} in {r['seconds']:.2f}s"
        )
    else:
        lines.append(f"{r['mode']}: {len(r['bindings'])} sites bound (dry run, nothing written)")
    return "\n".join(lines)


@click.command()
@click.option(
    "--model", "model", required=True, type=click.Path(), help="ONNX model with adapter slots."
)
@click.option("--adapter", "adapter", required=True, type=click.Path(), help="PEFT adapter folder.")
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(), help="NAME.onnx_adapter."
)
@click.option(
    "--base-weights",
    type=click.Path(),
    default=None,
    help="Base Hugging Face folder (decides layer kinds from the checkpoint).",
)
@click.option(
    "--initial-adapter",
    type=click.Path(),
    default=None,
    help="The adapter saved before training (pissa_niter, corda, lora_ga).",
)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_guard
def pack(
    model: str,
    adapter: str,
    output: str,
    base_weights: str | None,
    initial_adapter: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write an onnxruntime adapter file for a model exported with --keep-lora.

    The adapter is checked against the model's slots (module, shapes, dtype); ranks may differ
    from the export's. Activate it with RunOptions.add_active_adapter.
    """
    from loracc.onnx_api import pack as pack_api

    report = pack_api(
        model,
        adapter,
        output,
        base_weights=base_weights,
        initial_adapter=initial_adapter,
        force=force,
    )
    _emit(report.to_dict(), as_json, _pack_text)


def _pack_text(r: dict[str, Any]) -> str:
    lines = [
        f"packed {r['adapter']} into {r['output']}: {len(r['filled'])} of {r['slots']} slots "
        f"filled, {r['params']} parameters",
    ]
    if r["empty"]:
        lines.append(f"  rank 0 (not in this adapter): {json.dumps(r['empty'])}")
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)
