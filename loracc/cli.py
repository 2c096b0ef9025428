"""The ``loracc`` command line: parse, call :mod:`loracc.api`, map errors to exit codes.

Exit codes: 0 success, 1 regression or internal error, 2 bad input, refusal or usage.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from loracc import api
from loracc.errors import LoraccError, Terminated, printable
from loracc.lower.merge import terminal_progress
from loracc.passes import Pass, parse_pipeline

__all__ = ["main"]


# Optional dependencies (pyproject.toml extras) and how to get each.
_EXTRAS: dict[str, str] = {
    "onnx": "pip install 'loracc[onnx]'",
    "onnx_ir": "pip install 'loracc[onnx]'",
    "onnxscript": "pip install onnxscript",
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu for CUDA)",
}


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LoraccError into a one-line message and its exit code; --debug shows tracebacks."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except LoraccError as e:
            if debug:
                traceback.print_exc()
            click.echo(f"loracc: error: {printable(str(e))}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            click.echo(f"loracc: {'terminated' if terminated else 'interrupted'}", err=True)
            sys.exit(e.exit_code if terminated else 130)
        except Exception as e:  # a bug: say so in one line unless asked for the traceback
            missing = (e.name or "").partition(".")[0] if isinstance(e, ImportError) else ""
            if missing in _EXTRAS:  # not a bug: an optional dependency is missing
                if debug:
                    traceback.print_exc()
                click.echo(
                    f"loracc: error: {missing} is not installed: {_EXTRAS[missing]}", err=True
                )
                sys.exit(2)
            if debug:
                raise
            click.echo(
                f"loracc: internal error: {printable(repr(e))} (rerun with --debug for the "
                "traceback)",
                err=True,
            )
            sys.exit(1)

    return run


class RepeatedOptionError(click.UsageError):
    """An option that takes one value was given more than once (exit 2, one line)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"loracc: error: {self.format_message()}", err=True)


def _repeatable(option: click.Option) -> bool:
    """Whether giving ``option`` twice is meaningful or harmless: lists, counters, plain flags."""
    plain_flag = option.is_flag and not option.secondary_opts
    return option.multiple or option.count or plain_flag


class OnceCommand(click.Command):
    """A command whose single-valued options may be given once.

    click keeps the last value of a repeated option, so ``merge --adapter A --adapter B`` would
    merge B alone with exit 0. Every loracc command refuses that instead (lists, counters and plain
    flags excepted), so no option can silently lose a value.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            for param in dict.fromkeys(order):
                times = order.count(param)
                if isinstance(param, click.Option) and times > 1 and not _repeatable(param):
                    raise RepeatedOptionError(
                        f"{ctx.command_path.split(' ', 1)[-1]}: "
                        f"{'/'.join(param.opts + param.secondary_opts)} "
                        f"given {times} times; it takes one value and loracc will not keep only "
                        "the last",
                        ctx,
                    )
        return super().parse_args(ctx, args)


class LoraccGroup(click.Group):
    """A group whose commands (and sub-groups' commands) are :class:`OnceCommand`."""

    command_class = OnceCommand
    group_class = type  # sub-groups are LoraccGroups too


def _emit(data: dict[str, Any], as_json: bool, text: Callable[[dict[str, Any]], str]) -> None:
    """Print a report as JSON (which escapes control characters itself) or as text, every
    string in it escaped first: names from input files must not add or disguise lines."""
    click.echo(
        json.dumps(data, indent=2, default=str) if as_json else _lines(text(_printable(data)))
    )


def _lines(text: str) -> str:
    """``text`` with every line escaped: a renderer that reads its own object rather than the
    escaped data still cannot print a NUL or a bidirectional override."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


# Options several commands share, each defined once (cli_onnx and cli_golden use them too).
adapter_option = click.option(
    "--adapter", "adapter_dir", required=True, type=click.Path(), help="PEFT adapter folder."
)
initial_adapter_option = click.option(
    "--initial-adapter",
    type=click.Path(),
    default=None,
    help="The adapter saved before training (pissa_niter, corda, lora_ga, ...).",
)
output_dir_option = click.option(
    "-o", "--output", "out_dir", required=True, type=click.Path(), help="Output folder."
)
force_option = click.option("--force", is_flag=True, help="Replace existing outputs.")
allow_nonfinite_option = click.option(
    "--allow-nonfinite", is_flag=True, help="Write edited tensors holding NaN or Inf."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
layout_option = click.option(
    "--layout",
    "layout",
    multiple=True,
    metavar="MODULE_PATTERN=LAYOUT",
    help="Layout of the matching sites, before the architecture table (repeatable): linear, "
    "conv1d, experts-out-in or experts-in-out. MODULE_PATTERN is a module path suffix or a regex.",
)


def passes_option(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--passes PIPELINE``; ``default`` says what runs without it."""
    return click.option(
        "--passes",
        "passes_spec",
        default=None,
        help="Optional passes to add, or required ones to configure, e.g. "
        "'truncate-rank{rank=8}'; the required passes always run and everything runs in the "
        f"canonical order (docs/PASSES.md) (default: {default}).",
    )


def _pipeline(spec: str | None) -> list[Pass] | None:
    return parse_pipeline(spec) if spec is not None else None


def _step_lines(r: dict[str, Any]) -> list[str]:
    """The details of the passes that ran, one line each."""
    return [f"  {step['pass']}: {d}" for step in r["passes"] for d in step["details"]]


def _note_lines(r: dict[str, Any], indent: str = "  ") -> list[str]:
    return [f"{indent}note: {n}" for n in r["notes"]]


def _binding_lines(bindings: list[dict[str, Any]]) -> list[str]:
    """The ONNX binding table: site -> op, initializer, transposed (T), rule, nodes."""
    head = f"{'module':<44} {'op':<7} {'initializer':<32} {'T':<2} {'how':<12} nodes"
    lines = [head, "-" * len(head)]
    for b in bindings:
        init = b["initializer"] or ""
        how = b["how"] + (f" {b['block'][0]}:{b['block'][1]}" if b["block"] else "")
        lines.append(
            f"{b['module']:<44} {b['op']:<7} {init[:32]:<32} {'T' if b['transposed'] else '-':<2} "
            f"{how:<12} {', '.join(b['nodes'])}"
        )
    return lines


@click.group(cls=LoraccGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="loracc")
def main(debug: bool) -> None:
    """loracc: compile PEFT LoRA adapters into merged checkpoints and ONNX models."""


@main.command()
@click.option("--base", "base_dir", required=True, type=click.Path(), help="Base HF folder.")
@adapter_option
@output_dir_option
@click.option("--dtype", default=None, help="Cast floating tensors: float32, float16, bfloat16.")
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
@json_option
@_guard
def merge(
    base_dir: str,
    adapter_dir: str,
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
    as_json: bool,
) -> None:
    """Merge a PEFT LoRA adapter into a Hugging Face checkpoint (streamed, bounded memory)."""
    report = api.merge(
        base_dir,
        adapter_dir,
        out_dir,
        dtype=dtype,
        max_shard_size=max_shard_size,
        force=force,
        device=device,
        initial_adapter=initial_adapter,
        passes=_pipeline(passes_spec),
        allow_nonfinite=allow_nonfinite,
        progress=None if as_json else terminal_progress(),
        workers=workers,
        layout=layout,
        allow_large_replication=allow_large_replication,
    )
    _emit(report.to_dict(), as_json, _merge_text)


def _merge_text(r: dict[str, Any]) -> str:
    lines = [
        f"merged {r['sites']} sites into {len(r['changed'])} of {r['tensors']} tensors "
        f"({r['copied']} copied unchanged) in {r['seconds']:.2f}s",
        f"wrote {r['output']}: {', '.join(r['shards'])} ({r['bytes_written'] / 1e6:.1f} MB)",
    ]
    lines += _step_lines(r)
    lines += [f"  config.json: {k} = {json.dumps(v)}" for k, v in r["config_updates"].items()]
    lines += _note_lines(r)
    return "\n".join(lines)


@main.command()
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
@_guard
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
    _emit(report.to_dict(), as_json, _convert_text)


def _convert_text(r: dict[str, Any]) -> str:
    lines = [f"wrote {r['output']}: {len(r['sites'])} sites, {len(r['tensors'])} tensors"]
    return "\n".join(lines + _step_lines(r) + _note_lines(r))


@main.command(name="compile")
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
@_guard
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
        passes=_pipeline(passes_spec),
        after_all=print_after_all,
        layout=layout,
    )
    click.echo(_lines(text), nl=False)


@main.command()
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
@_guard
def inspect(adapter_dir: str, base_dir: str | None, layout: tuple[str, ...], as_json: bool) -> None:
    """Show the resolved sites of an adapter and what would be refused.

    With an .onnx base, also the binding of each site to the graph (node, initializer,
    transposed), as `export --onnx --dry-run` prints it.
    """
    _emit(api.inspect(adapter_dir, base_dir, layout=layout), as_json, _inspect_text)


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
    lines += _note_lines(r, indent="")
    if "bindings" in r:
        lines += ["", f"ONNX binding ({r['base']}):", *_binding_lines(r["bindings"])]
    return "\n".join(lines)


from loracc.cli_golden import golden, run  # noqa: E402

main.add_command(golden)
main.add_command(run)

from loracc.cli_onnx import export, pack  # noqa: E402

main.add_command(export)
main.add_command(pack)

if __name__ == "__main__":
    main()
