"""``loracc combine``: several PEFT adapters into one (docs/FORMATS.md "Combining adapters")."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from loracc._lazy import lazy_module
from loracc.cli.common import (
    OnceCommand,
    emit,
    force_option,
    guard,
    json_option,
    layout_option,
    note_lines,
    output_dir_option,
    weights_option,
)
from loracc.lower.combine_methods import METHODS

if TYPE_CHECKING:
    from loracc.api import combination as api
    from loracc.lower.combine_methods import MajoritySign
else:  # torch and the API load when the command runs, not for --help
    api = lazy_module("loracc.api.combination")

__all__ = ["combine"]


@click.command(cls=OnceCommand)
@click.option(
    "--adapter",
    "adapter_dirs",
    multiple=True,
    required=True,
    type=click.Path(),
    help="PEFT adapter folder; repeat for each adapter, all for one base model.",
)
@weights_option
@click.option(
    "--method",
    required=True,
    help=f"How to combine: {', '.join(METHODS)} (peft's add_weighted_adapter types).",
)
@click.option("--rank", type=int, default=None, help="svd: the rank kept [the largest input].")
@click.option(
    "--density",
    type=float,
    default=None,
    help="ties, dare_*, magnitude_prune: the fraction of factor entries kept, in (0, 1].",
)
@click.option("--seed", type=int, default=None, help="dare_*: the mask seed [0].")
@click.option(
    "--majority-sign",
    type=click.Choice(["total", "frequency"]),
    default="total",
    show_default=True,
    help="ties, dare_ties: how the sign of each entry is elected.",
)
@output_dir_option
@force_option
@layout_option
@json_option
@guard
def combine(
    adapter_dirs: tuple[str, ...],
    weights: str | None,
    method: str,
    rank: int | None,
    density: float | None,
    seed: int | None,
    majority_sign: MajoritySign,
    out_dir: str,
    force: bool,
    layout: tuple[str, ...],
    as_json: bool,
) -> None:
    """Combine adapters into one PEFT adapter (peft's add_weighted_adapter, exact for rsLoRA,
    lora_bias and DoRA)."""
    report = api.combine(
        adapter_dirs,
        out_dir,
        method=method,
        weights=weights,
        rank=rank,
        density=density,
        seed=seed,
        majority_sign=majority_sign,
        force=force,
        layout=layout,
    )
    emit(report.to_dict(), as_json, _text)


def _text(r: dict[str, Any]) -> str:
    weights = ",".join(f"{w:g}" for w in r["weights"])
    lines = [
        f"wrote {r['output']}: --method {r['method']} (weights {weights}), {len(r['sites'])} "
        f"sites, {len(r['tensors'])} tensors"
    ]
    lines += [
        f"  {s['module']}: rank {s['rank']}{' (DoRA)' if s['dora'] else ''}" for s in r["sites"]
    ]
    return "\n".join(lines + note_lines(r))
