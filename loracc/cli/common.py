"""What every ``loracc`` command shares: the command class, the error guard, report printing
(``--json`` prints one JSON object on stdout whatever the exit code), the shared options, the
progress display and the command's wall time.

A leaf: it imports nothing from the command modules (:mod:`loracc.cli.hf`, :mod:`loracc.cli.onnx`,
:mod:`loracc.cli.golden`), which all import it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, NoReturn

import click

from loracc.errors import LoraccError, Terminated, printable

if TYPE_CHECKING:
    from loracc.passes import Pass

__all__ = [
    "LoraccGroup",
    "OnceCommand",
    "Progress",
    "RepeatedOptionError",
    "adapter_option",
    "adapters_option",
    "allow_nonfinite_option",
    "binding_lines",
    "command_seconds",
    "dtype_option",
    "emit",
    "escaped_lines",
    "force_option",
    "guard",
    "human_bytes",
    "initial_adapter_option",
    "json_option",
    "layout_option",
    "make_progress",
    "note_lines",
    "output_dir_option",
    "parse_passes",
    "passes_option",
    "progress_option",
    "step_lines",
    "timed",
    "verbose_option",
    "weights_option",
]

_IMPORTED = time.perf_counter()  # the fallback start of the command, where /proc is missing


# Optional dependencies (pyproject.toml extras) and how to get each.
_EXTRAS: dict[str, str] = {
    "onnx": "pip install 'loracc[onnx]'",
    "onnx_ir": "pip install 'loracc[onnx]'",
    "onnxscript": "pip install onnxscript",
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu for CUDA)",
    "torch": "pip install 'loracc[torch]'",
}


def _fail(message: str, exit_code: int, as_json: bool, prefix: str = "error: ") -> NoReturn:
    """Print ``message`` as loracc's one line on stderr and, with ``--json``, as the command's
    JSON object on stdout; exit with ``exit_code``."""
    click.echo(f"loracc: {prefix}{printable(message)}", err=True)
    if as_json:
        _echo_json({"ok": False, "exit_code": exit_code, "error": message})
    sys.exit(exit_code)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LoraccError into a one-line message and its exit code; --debug shows tracebacks.
    With ``--json`` the error is also the JSON object on stdout (``ok``, ``exit_code``,
    ``error``), so a CI step that saves stdout always has one."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        as_json = bool(ctx.params.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except LoraccError as e:
            if debug:
                traceback.print_exc()
            _fail(str(e), e.exit_code, as_json)
        except KeyboardInterrupt as e:
            terminated = isinstance(e, Terminated)
            code = e.exit_code if isinstance(e, Terminated) else 130
            _fail("terminated" if terminated else "interrupted", code, as_json, prefix="")
        except Exception as e:  # a bug: say so in one line unless asked for the traceback
            missing = (e.name or "").partition(".")[0] if isinstance(e, ImportError) else ""
            if missing in _EXTRAS:  # not a bug: an optional dependency is missing
                if debug:
                    traceback.print_exc()
                command = click.get_current_context().command_path
                _fail(
                    f"{command} needs {missing}, which is not installed: {_EXTRAS[missing]}",
                    2,
                    as_json,
                )
            if debug:
                raise
            _fail(
                f"{e!r} (rerun with --debug for the traceback)",
                1,
                as_json,
                prefix="internal error: ",
            )

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
        given = list(args)  # click's parser consumes ``args``
        try:
            return self._parse_once(ctx, args)
        except click.ClickException as e:  # a usage error: with --json, a JSON object too
            if "--json" in given[: given.index("--") if "--" in given else None]:
                _echo_json({"ok": False, "exit_code": e.exit_code, "error": e.format_message()})
            raise

    def _parse_once(self, ctx: click.Context, args: list[str]) -> list[str]:
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


def emit(
    data: dict[str, Any],
    as_json: bool,
    text: Callable[[dict[str, Any]], str],
    exit_code: int = 0,
) -> None:
    """Print a report as JSON (which escapes control characters itself; ``ok`` and
    ``exit_code`` first, as in an error's object) or as text, every string in it escaped
    first: names from input files must not add or disguise lines."""
    if as_json:
        _echo_json({"ok": exit_code == 0, "exit_code": exit_code, **data})
    else:
        click.echo(escaped_lines(text(_escaped(data))))


def _echo_json(data: dict[str, Any]) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


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
    "--adapter",
    "adapter_dir",
    required=True,
    type=click.Path(),
    help="PEFT adapter folder (or its adapter_model.safetensors, or ORG/NAME in the local "
    "Hugging Face cache).",
)
adapters_option = click.option(
    "--adapter",
    "adapter_dirs",
    required=True,
    multiple=True,
    type=click.Path(),
    help="PEFT adapter folder (or its adapter_model.safetensors, or ORG/NAME in the local "
    "Hugging Face cache); repeat to stack adapters: each is merged into the result of the "
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
json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the result as one JSON object on stdout; errors too ({ok, exit_code, error}).",
)
verbose_option = click.option(
    "-v", "--verbose", is_flag=True, help="Print the binding table and every slot too."
)
dtype_option = click.option(
    "--dtype",
    default=None,
    metavar="DTYPE",
    help="Cast floating tensors to fp16, bf16 or fp32 (or float16, bfloat16, float32).",
)
progress_option = click.option(
    "--progress",
    type=click.Choice(["auto", "never", "always"]),
    default="auto",
    show_default=True,
    help="Progress on stderr. auto: a bar on a terminal, else a line every 5 s (CI logs); "
    "always: the bar even when stderr is not a terminal; never: none.",
)
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


def human_bytes(n: float) -> str:
    """``n`` bytes in B, kB, MB or GB (powers of 1000, as --max-shard-size reads "5GB")."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    hours = f"{s // 3600}:" if s >= 3600 else ""
    return f"{hours}{s // 60 % 60 if hours else s // 60:0{2 if hours else 1}d}:{s % 60:02d}"


class Progress:
    """Progress of a long step on stderr: ``(done, total, key, bytes_done, bytes_total)``
    calls, the first with ``done == 0`` when the step starts.

    ``bar``: one line redrawn at most every 0.1 s, with bytes, bytes/s and ETA (a terminal).
    Otherwise one line every ``every`` seconds, so a CI log shows a long run is alive, and a
    last one at the end when any was printed.
    """

    def __init__(
        self,
        what: str,
        *,
        bar: bool,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.bar, self.every, self.clock = what, bar, every, clock
        self.start = self.last = clock()
        self.lines = 0

    def __call__(self, done: int, total: int, key: str, done_bytes: int, total_bytes: int) -> None:
        now = self.clock()
        if done == 0:
            self.start = self.last = now
            return
        finished = done == total
        if not finished and now - self.last < (0.1 if self.bar else self.every):
            return
        if not self.bar and finished and not self.lines:
            return  # a short step: nothing to say
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done_bytes / elapsed
        eta = (total_bytes - done_bytes) / rate if rate > 0 else 0.0
        part = done_bytes / total_bytes if total_bytes else done / max(total, 1)
        size = f"{human_bytes(done_bytes)}/{human_bytes(total_bytes)}"
        status = (
            f"{part:4.0%} {size} {human_bytes(rate)}/s "
            + (f"in {_clock(elapsed)}" if finished else f"ETA {_clock(eta)}")
            + f" ({done}/{total} tensors)"
        )
        if self.bar:
            filled = int(24 * part)
            name = "" if finished else printable(key)[:40]
            line = f"\r{self.what} [{'#' * filled}{'.' * (24 - filled)}] {status} {name:<40}"
            sys.stderr.write(line + ("\n" if finished else ""))
        else:
            sys.stderr.write(f"{self.what}: {status}\n")
            self.lines += 1
        sys.stderr.flush()


def make_progress(mode: str, what: str) -> Progress | None:
    """The display ``--progress MODE`` asks for (see :data:`progress_option`)."""
    if mode == "never":
        return None
    return Progress(what, bar=mode == "always" or sys.stderr.isatty())


def command_seconds() -> float:
    """Wall time since this process started (interpreter start and imports included), from
    /proc where there is one; else since loracc.cli was imported."""
    try:
        with open("/proc/self/stat", "rb") as f:
            started = int(f.read().rpartition(b")")[2].split()[19])  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


def timed(data: dict[str, Any], step: str) -> dict[str, Any]:
    """``data`` (a report with ``seconds`` for the library call) with ``seconds`` the whole
    command's wall time, and ``steps`` its breakdown: the call's own steps (or ``step`` for
    the whole call) and ``startup`` for the rest (interpreter, imports, parsing)."""
    total = command_seconds()
    steps = dict(data.get("steps") or {step: data["seconds"]})
    steps["startup"] = round(max(total - data["seconds"], 0.0), 3)
    return {**data, "seconds": round(total, 3), "steps": steps}
