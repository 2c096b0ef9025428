"""``loracc golden record|check`` and ``loracc run``: golden-output regression checks for CI.

Registered on the ``loracc`` group by :mod:`loracc.cli`. Exit codes: 0 pass, 1
regression (``golden check``), 2 bad input or an unusable provider.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from loracc import golden as golden_lib
from loracc import runner
from loracc.cli.common import (
    LoraccGroup,
    OnceCommand,
    emit,
    force_option,
    guard,
    json_option,
    note_lines,
)
from loracc.io.npz import write_npz
from loracc.io.output import check_output

__all__ = ["golden", "run"]

golden_model_option = click.option(
    "--model", required=True, type=click.Path(), help="ONNX model or merged HF folder."
)
onnx_adapter_option = click.option(
    "--adapter", type=click.Path(), default=None, help="An .onnx_adapter to activate."
)
providers_option = click.option(
    "--providers",
    default="cpu",
    show_default=True,
    help="Execution providers in priority order, e.g. 'cuda' or 'cuda,cpu'; a later one is used "
    "only when listed (fallback).",
)


@click.group(cls=LoraccGroup)
def golden() -> None:
    """Record a compiled artifact's outputs and check them later (regression tests in CI)."""


@golden.command("record")
@golden_model_option
@onnx_adapter_option
@click.option("--inputs", type=click.Path(), default=None, help="Inputs as an .npz file.")
@click.option("--seed", type=int, default=None, help="Generate inputs with this seed (default 0).")
@click.option(
    "--dim",
    "dims",
    multiple=True,
    metavar="NAME=SIZE",
    help="Size of a symbolic input dimension (repeatable).",
)
@providers_option
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Golden .npz.")
@force_option
@json_option
@guard
def record(
    model: str,
    adapter: str | None,
    inputs: str | None,
    seed: int | None,
    dims: tuple[str, ...],
    providers: str,
    out: str,
    force: bool,
    as_json: bool,
) -> None:
    """Run MODEL on deterministic inputs and store inputs, outputs and fingerprints."""
    meta = golden_lib.record(
        model,
        out,
        adapter=adapter,
        inputs=inputs,
        seed=seed,
        dims=runner.parse_dims(dims),
        providers=providers,
        force=force,
    )
    meta = {"golden": out, **meta}
    emit(meta, as_json, _record_text)


def _record_text(m: dict[str, Any]) -> str:
    fp = m["model"]["fingerprint"][:12]
    if m["kind"] == "hf":
        return (
            f"recorded {m['golden']}: {len(m['tensors'])} tensor digests of "
            f"{m['model']['folder']} (fingerprint {fp})"
        )
    outs = ", ".join(
        f"{o['name']} {o['dtype']}[{','.join(map(str, o['shape']))}]" for o in m["outputs"]
    )
    src = m["input_source"]
    if "file" in src:
        how = f"inputs from {src['file']}"
    else:
        dims = "".join(f", {k}={v}" for k, v in src["dims"].items())
        how = f"inputs from seed {src['seed']}{dims}"
    lines = [
        f"recorded {m['golden']}: {len(m['outputs'])} output(s) ({outs})",
        f"  {how}; providers {', '.join(m['providers'])}; model fingerprint {fp}",
    ]
    if m["adapter"]:
        lines.append(f"  adapter {m['adapter']['file']} ({m['adapter']['fingerprint'][:12]})")
    return "\n".join(lines + note_lines(m))


@golden.command("check")
@golden_model_option
@click.option("--golden", "golden_path", required=True, type=click.Path(), help="Golden .npz.")
@onnx_adapter_option
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default by dtype).")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default by dtype).")
@providers_option
@click.option(
    "--strict-fingerprint",
    is_flag=True,
    help="Fail when the model or adapter file differs from the recorded one.",
)
@click.option("-v", "--verbose", is_flag=True, help="List identical HF tensors too.")
@json_option
@guard
def check(
    model: str,
    golden_path: str,
    adapter: str | None,
    rtol: float | None,
    atol: float | None,
    providers: str,
    strict_fingerprint: bool,
    verbose: bool,
    as_json: bool,
) -> None:
    """Rerun the golden's inputs on MODEL and compare; exit 1 on a regression."""
    report = golden_lib.check(
        model,
        golden_path,
        adapter=adapter,
        rtol=rtol,
        atol=atol,
        providers=providers,
        strict_fingerprint=strict_fingerprint,
    )
    code = 0 if report.passed else 1
    text = report.text(verbose or report.kind == "onnx")
    emit(report.to_dict(), as_json, lambda _: text, exit_code=code)
    sys.exit(code)


@click.command("run", cls=OnceCommand)
@click.option("--model", required=True, type=click.Path(), help="ONNX model (file or folder).")
@onnx_adapter_option
@click.option("--inputs", required=True, type=click.Path(), help="Inputs as an .npz file.")
@click.option("-o", "--output", "out", type=click.Path(), default=None, help="Write outputs .npz.")
@providers_option
@force_option
@json_option
@guard
def run(
    model: str,
    adapter: str | None,
    inputs: str,
    out: str | None,
    providers: str,
    force: bool,
    as_json: bool,
) -> None:
    """Run an ONNX model once with onnxruntime (optionally with an adapter active)."""
    read = runner.input_files(model, adapter, inputs)
    if out is not None:
        check_output(Path(out), read, force=force)  # refuse before running, and again at the end
    result = runner.run(model, inputs, adapter=adapter, providers=providers)
    if out is not None:
        write_npz(out, result.outputs, inputs=read, force=force)
    data = {**result.to_dict(), "written": out}
    emit(data, as_json, _run_text)


def _run_text(r: dict[str, Any]) -> str:
    head = f"ran {r['model']}" + (f" with {r['adapter']}" if r["adapter"] else "")
    lines = [f"{head} on {', '.join(r['providers'])}"]
    for o in r["outputs"]:
        shape = ",".join(map(str, o["shape"]))
        stats = (
            f"min {o['min']:.6g}  max {o['max']:.6g}  mean {o['mean']:.6g}"
            if o["min"] is not None
            else "no finite values"
        )
        bad = [f"{o[k]} {label}" for k, label in (("nan", "NaN"), ("inf", "infinite")) if o.get(k)]
        if bad:
            stats += f"  ({' and '.join(bad)}; min/max/mean over the finite values)"
        lines.append(f"  {o['name']} {o['dtype']}[{shape}]  {stats}")
    lines += note_lines(r)
    if r["written"]:
        lines.append(f"wrote {r['written']}")
    return "\n".join(lines)
