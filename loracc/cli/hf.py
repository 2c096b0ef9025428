"""The Hugging Face commands: ``merge``, ``convert``, ``compile`` and ``inspect``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from loracc._lazy import lazy_module
from loracc.cli.common import (
    OnceCommand,
    adapter_option,
    adapters_option,
    allow_nonfinite_option,
    binding_lines,
    dtype_option,
    emit,
    escaped_lines,
    force_option,
    guard,
    human_bytes,
    initial_adapter_option,
    json_option,
    layout_option,
    make_progress,
    note_lines,
    output_dir_option,
    parse_passes,
    passes_option,
    progress_option,
    step_lines,
    timed,
    weights_option,
)
from loracc.io.inputs import prefetch

if TYPE_CHECKING:
    from loracc.api import hf as api
    from loracc.api import inspect as inspect_api
else:  # torch and the API load when a command runs, not for --help
    api = lazy_module("loracc.api.hf")
    inspect_api = lazy_module("loracc.api.inspect")  # no torch without --base

__all__ = ["compile_", "convert", "inspect_", "merge"]


@click.command(cls=OnceCommand)
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(),
    help="Base HF folder (or a hub-cache models--ORG--NAME folder, or ORG/NAME in the local "
    "Hugging Face cache).",
)
@adapters_option
@weights_option
@output_dir_option
@dtype_option
@click.option(
    "--max-shard-size", default="5GB", show_default=True, help="Shard size (5GB, 500MiB)."
)
@force_option
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where deltas are computed: cpu, cuda or cuda:N (cuda falls back to cpu, with a "
    "note, when unavailable).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Threads reading, computing and writing tensors [default: min(4, cores)].",
)
@initial_adapter_option
@passes_option("the required merge passes")
@allow_nonfinite_option
@layout_option
@click.option(
    "--allow-large-replication",
    is_flag=True,
    help="Accept a layer_replication that builds more than 4x the base's layers.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Every check of a real merge (output path, plan, every edited tensor computed and "
    "checked) and the output's size; write nothing.",
)
@progress_option
@json_option
@guard
def merge(
    base_dir: str,
    adapter_dirs: tuple[str, ...],
    weights: str | None,
    out_dir: str,
    dtype: str | None,
    max_shard_size: str,
    force: bool,
    device: str,
    workers: int | None,
    initial_adapter: str | None,
    passes_spec: str | None,
    allow_nonfinite: bool,
    layout: tuple[str, ...],
    allow_large_replication: bool,
    dry_run: bool,
    progress: str,
    as_json: bool,
) -> None:
    """Merge PEFT LoRA adapters into a Hugging Face checkpoint (streamed, bounded memory).

    \b
    loracc merge --base BASE --adapter A -o OUT
    loracc merge --base BASE --adapter A1 --adapter A2 --weights 1.0,0.5 -o OUT
    """
    prefetch([*map(Path, adapter_dirs), Path(base_dir)])  # the disk reads while torch imports
    report = api.merge(
        base_dir,
        list(adapter_dirs),
        out_dir,
        weights=weights,
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        device=device,
        initial_adapter=initial_adapter,
        passes=parse_passes(passes_spec),
        allow_nonfinite=allow_nonfinite,
        progress=make_progress(progress, "checking" if dry_run else "merging"),
        workers=workers,
        layout=layout,
        allow_large_replication=allow_large_replication,
        dry_run=dry_run,
    )
    emit(timed(report.to_dict(), "merge"), as_json, _merge_text)


def _merge_text(r: dict[str, Any]) -> str:
    size = human_bytes(r["bytes_written"])
    lines = [
        f"{'would merge' if r['dry_run'] else 'merged'} {r['sites']} sites into "
        f"{len(r['changed'])} of {r['tensors']} tensors ({r['copied']} copied unchanged) "
        f"in {r['seconds']:.2f}s",
        f"would write {r['output']}: {', '.join(r['shards'])} ({size}; dry run, nothing written)"
        if r["dry_run"]
        else f"wrote {r['output']}: {', '.join(r['shards'])} ({size})",
    ]
    lines += step_lines(r)
    lines += [f"  config.json: {k} = {json.dumps(v)}" for k, v in r["config_updates"].items()]
    lines += note_lines(r)
    return "\n".join(lines)


@click.command(cls=OnceCommand)
@adapter_option
@click.option(
    "--base",
    "base_dir",
    type=click.Path(),
    default=None,
    help="Original base HF folder (needed for pissa/olora and layer_replication).",
)
@initial_adapter_option
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Truncate to rank R.")
@click.option(
    "--energy",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=None,
    help="Truncate to keep this fraction of each delta's Frobenius energy (e.g. 0.99).",
)
@output_dir_option
@force_option
@layout_option
@json_option
@guard
def convert(
    adapter_dir: str,
    base_dir: str | None,
    initial_adapter: str | None,
    rank: int | None,
    energy: float | None,
    out_dir: str,
    force: bool,
    layout: tuple[str, ...],
    as_json: bool,
) -> None:
    """Write a plain PEFT LoRA adapter (scales folded, PiSSA/OLoRA converted, truncated)."""
    report = api.convert(
        adapter_dir,
        out_dir,
        base_dir=base_dir,
        initial_adapter=initial_adapter,
        rank=rank,
        energy=energy,
        force=force,
        layout=layout,
    )
    emit(report.to_dict(), as_json, _convert_text)


def _convert_text(r: dict[str, Any]) -> str:
    lines = [f"wrote {r['output']}: {len(r['sites'])} sites, {len(r['tensors'])} tensors"]
    return "\n".join(lines + step_lines(r) + note_lines(r))


@click.command("compile", cls=OnceCommand)
@adapter_option
@click.option("--base", "base_dir", type=click.Path(), default=None, help="Base HF folder.")
@initial_adapter_option
@passes_option("the required merge passes with --base, none without")
@click.option(
    "--emit",
    type=click.Choice(["ir"]),
    default="ir",
    show_default=True,
    help="What to print: the IR as deterministic text.",
)
@click.option("--print-after-all", is_flag=True, help="Print the IR before and after every pass.")
@layout_option
@guard
def compile_(
    adapter_dir: str,
    base_dir: str | None,
    initial_adapter: str | None,
    passes_spec: str | None,
    emit: str,
    print_after_all: bool,
    layout: tuple[str, ...],
) -> None:
    """Run passes over an adapter and print the resulting IR."""
    text = api.emit_ir(
        adapter_dir,
        base_dir,
        initial_adapter=initial_adapter,
        passes=parse_passes(passes_spec),
        after_all=print_after_all,
        layout=layout,
    )
    click.echo(escaped_lines(text), nl=False)


@click.command("inspect", cls=OnceCommand)
@click.argument("adapter_dir", type=click.Path())
@click.option(
    "--base",
    "base_dir",
    type=click.Path(),
    default=None,
    help="Base HF folder, or the base model's .onnx file (adds the ONNX binding).",
)
@layout_option
@json_option
@guard
def inspect_(
    adapter_dir: str, base_dir: str | None, layout: tuple[str, ...], as_json: bool
) -> None:
    """Show the resolved sites of an adapter and what would be refused.

    With an .onnx base, also the binding of each site to the graph (node, initializer,
    transposed), as `export --onnx --dry-run` prints it.
    """
    report = inspect_api.inspect_adapter(adapter_dir, base_dir, layout=layout)
    emit(report, as_json, _inspect_text)


def _inspect_text(r: dict[str, Any]) -> str:
    head = (
        f"{'module':<48} {'kind':<9} {'shape':>12} {'r':>4} {'alpha':>7} {'scale':>8} "
        f"{'variant':<10} {'params':>9}  layout"
    )
    lines = [head, "-" * len(head)]
    for s in r["sites"]:
        shape = "x".join(map(str, s["shape"]))
        lines.append(
            f"{s['module']:<48} {s['kind']:<9} {shape:>12} {s['rank']:>4} {s['alpha']:>7g} "
            f"{s['scale']:>8.4g} {s['variant']:<10} {s['params']:>9}  {s['layout']}"
        )
    lines.append(f"{len(r['sites'])} sites, {r['params']} parameters")
    for rep in r["replacements"]:
        lines.append(
            f"replaces {rep['target']} ({rep['origin']}, {'x'.join(map(str, rep['shape']))})"
        )
    for t in r["token_rows"]:
        lines.append(f"token rows {t['target']}: {len(t['indices'])} rows")
    if r["layer_replication"]:
        lines.append(f"layer_replication {r['layer_replication']}")
    lines += [f"REFUSED: {x}" for x in r["refusals"]]
    lines += note_lines(r, indent="")
    if "bindings" in r:
        lines += ["", f"ONNX binding ({r['base']}):", *binding_lines(r["bindings"])]
    return "\n".join(lines)
