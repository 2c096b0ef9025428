"""What every ``loracc`` command shares: the command class, the error guard, report printing,
the shared options and the progress bar.

A leaf: it imports nothing from the command modules (:mod:`loracc.cli.hf`, :mod:`loracc.cli.onnx`,
:mod:`loracc.cli.golden`), which all import it.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any

import click

from loracc.errors import LoraccError, Terminated, printable

if TYPE_CHECKING:
    from loracc.passes import Pass

__all__ = [
    "LoraccGroup",
    "OnceCommand",
    "RepeatedOptionError",
    "adapter_option",
    "adapters_option",
    "allow_nonfinite_option",
    "binding_lines",
    "emit",
    "escaped_lines",
    "force_option",
    "guard",
    "initial_adapter_option",
    "json_option",
    "layout_option",
    "note_lines",
    "output_dir_option",
    "parse_passes",
    "passes_option",
    "step_lines",
    "terminal_progress",
    "weights_option",
]


# Optional dependencies (pyproject.toml extras) and how to get each.
_EXTRAS: dict[str, str] = {
    "onnx": "pip install 'loracc[onnx]'",
    "onnx_ir": "pip install 'loracc[onnx]'",
    "onnxscript": "pip install onnxscript",
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu for CUDA)",
    "torch": "pip install 'loracc[torch]'",
}


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
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
            sys.exit(e.exit_code if isinstance(e, Terminated) else 130)
        except Exception as e:  # a bug: say so in one line unless asked for the traceback
            missing = (e.name or "").partition(".")[0] if isinstance(e, ImportError) else ""
            if missing in _EXTRAS:  # not a bug: an optional dependency is missing
                if debug:
                    traceback.print_exc()
                command = click.get_current_context().command_path
                click.echo(
                    f"loracc: error: {command} needs {missing}, which is not installed: "
                    f"{_EXTRAS[missing]}",
                    err=True,
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


def emit(data: dict[str, Any], as_json: bool, text: Callable[[dict[str, Any]], str]) -> None:
    """Print a report as JSON (which escapes control characters itself) or as text, every
    string in it escaped first: names from input files must not add or disguise lines."""
    click.echo(
        json.dumps(data, indent=2, default=str) if as_json else escaped_lines(text(_escaped(data)))
    )


def escaped_lines(text: str) -> str:
    """``text`` with every line escaped: a renderer that reads its own object rather than the
    escaped data still cannot print a NUL or a bidirectional override."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


# Options several commands share, each defined once.
adapter_option = click.option(
    "--adapter", "adapter_dir", required=True, type=click.Path(), help="PEFT adapter folder."
)
adapters_option = click.option(
    "--adapter",
    "adapter_dirs",
    required=True,
    multiple=True,
    type=click.Path(),
    help="PEFT adapter folder; repeat to stack adapters: each is merged into the result of the "
    "ones before it, in order, in one pass with one rounding.",
)
weights_option = click.option(
    "--weights",
    default=None,
    metavar="W1,W2,...",
    help="One weight per --adapter, scaling its delta (a DoRA adapter's before the "
    "normalisation); default all 1.",
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


def parse_passes(spec: str | None) -> list[Pass] | None:
    from loracc.passes import parse_pipeline  # imports torch: only for commands that run passes

    return parse_pipeline(spec) if spec is not None else None


def step_lines(r: dict[str, Any]) -> list[str]:
    """The details of the passes that ran, one line each."""
    return [f"  {step['pass']}: {d}" for step in r["passes"] for d in step["details"]]


def note_lines(r: dict[str, Any], indent: str = "  ") -> list[str]:
    return [f"{indent}note: {n}" for n in r["notes"]]


def binding_lines(bindings: list[dict[str, Any]]) -> list[str]:
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


def terminal_progress() -> Callable[[int, int, str], None] | None:
    """A one-line progress display on stderr, or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int, key: str) -> None:
        now = time.monotonic()
        if done != total and now - last[0] < 0.1:
            return
        last[0] = now
        width = 30
        filled = width * done // max(total, 1)
        name = printable(key)[:60]
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name:<60}"
        sys.stderr.write(line + ("\n" if done == total else ""))
        sys.stderr.flush()

    return show
