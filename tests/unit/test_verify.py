"""loracc.verify against deliberately broken IR: every invariant is reported, each on its own.

Each case starts from a well-formed adapter (two Linear sites, a replacement, token rows, a tensor
source; verify finds nothing) and breaks exactly one invariant; verify must report that one and
nothing else. The last tests check that :func:`loracc.pipeline.run_pipeline` verifies by itself
(``LORACC_VERIFY=1`` or ``check=True``), names the pass that broke the IR, and so verifies every
pipeline the API runs (``convert``'s was never verified while the API read the variable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import loracc
from loracc import pipeline
from loracc.errors import VerifyError
from loracc.ir import Adapter, Replacement, Site, SiteKind, TokenRows
from loracc.passes import Pass, PassContext, PassResult
from loracc.pipeline import VERIFY_ENV, run_pipeline
from loracc.verify import problems, verify
from tests.support import make_corpus as mc

OUT, IN, R = 6, 5, 2


def _site(module: str = "layers.0.q_proj", **kw: object) -> Site:
    fields: dict[str, object] = {
        "module": module,
        "target": f"{module}.weight",
        "kind": SiteKind.LINEAR,
        "lora_A": torch.randn(R, IN),
        "lora_B": torch.randn(OUT, R),
        "alpha": 4.0,
        "scale": 2.0,
    }
    return Site(**(fields | kw))  # type: ignore[arg-type]


def _adapter() -> Adapter:
    return Adapter(
        name="adapter",
        sites=(_site(), _site("layers.0.v_proj")),
        replacements=(Replacement("lm_head.weight", torch.zeros(OUT, IN), "modules_to_save"),),
        token_rows=(TokenRows("embed.weight", (1, 3), torch.zeros(2, IN)),),
        tensor_sources={"layers.1.q_proj.weight": "layers.0.q_proj.weight"},
    )


def _with_site(**kw: object) -> Callable[[Adapter], Adapter]:
    """Break the first site: replace its fields by ``kw``."""
    return lambda a: replace(a, sites=(replace(a.sites[0], **kw), *a.sites[1:]))  # type: ignore[arg-type]


def _conv_site(**kw: object) -> Callable[[Adapter], Adapter]:
    conv = _site(
        "conv",
        kind=SiteKind.CONV,
        lora_A=torch.randn(R, IN, 3, 3),
        lora_B=torch.randn(OUT, R, 1, 1),
    )
    return lambda a: replace(a, sites=(*a.sites, replace(conv, **kw)))  # type: ignore[arg-type]


# (invariant, how to break it, the message verify must give)
BROKEN: list[tuple[str, Callable[[Adapter], Adapter], str]] = [
    (
        "floating-point factors",
        _with_site(lora_A=torch.ones(R, IN, dtype=torch.int64)),
        "layers.0.q_proj: factors must be floating point, got torch.int64/torch.float32",
    ),
    (
        "factor ranks agree",
        _with_site(lora_B=torch.randn(OUT, R, 1)),
        f"layers.0.q_proj: lora_A ({R}, {IN}) and lora_B ({OUT}, {R}, 1) ranks differ",
    ),
    (
        "factors at least 2-D",
        _with_site(lora_A=torch.randn(R), lora_B=torch.randn(OUT)),
        f"layers.0.q_proj: lora_A ({R},) and lora_B ({OUT},) ranks differ",
    ),
    (
        "inner dimensions match",
        _with_site(lora_B=torch.randn(OUT, R + 1)),
        f"layers.0.q_proj: lora_B has {R + 1} columns, lora_A {R} rows",
    ),
    (
        "expert rows split evenly",
        _with_site(kind=SiteKind.PARAMETER, experts=3),
        f"layers.0.q_proj: {R} rows of lora_A do not split into 3 experts",
    ),
    (
        "conv lora_B kernel is 1",
        _conv_site(lora_B=torch.randn(OUT, R, 3, 3)),
        "conv: conv lora_B kernel must be 1, got (3, 3)",
    ),
    (
        "non-conv factors are 2-D",
        _with_site(lora_A=torch.randn(R, IN, 1), lora_B=torch.randn(OUT, R, 1)),
        "layers.0.q_proj: linear factors must be 2-D",
    ),
    (
        "finite scale",
        _with_site(scale=float("nan")),
        "layers.0.q_proj: scale nan is not finite",
    ),
    (
        "lora bias has out entries",
        _with_site(lora_bias=torch.zeros(OUT + 1), bias_target="layers.0.q_proj.bias"),
        f"layers.0.q_proj: lora bias ({OUT + 1},), expected ({OUT},)",
    ),
    (
        "lora bias has a target",
        _with_site(lora_bias=torch.zeros(OUT)),
        "layers.0.q_proj: lora bias without a bias target",
    ),
    (
        "magnitude per output channel",
        _with_site(magnitude=torch.ones(OUT - 1)),
        f"layers.0.q_proj: DoRA magnitude has {OUT - 1} values, expected {OUT}",
    ),
    (
        "channel scale per output channel",
        _with_site(channel_scale=torch.ones(OUT + 2)),
        f"layers.0.q_proj: DoRA channel scale has {OUT + 2} values, expected {OUT}",
    ),
    (
        "magnitude or channel scale, not both",
        _with_site(magnitude=torch.ones(OUT), channel_scale=torch.ones(OUT)),
        "layers.0.q_proj: both a raw DoRA magnitude and a folded channel scale",
    ),
    (
        "initial factors shaped like the factors",
        _with_site(init="pissa", initial=(torch.randn(R + 1, IN), torch.randn(OUT, R + 1))),
        f"layers.0.q_proj: initial factors ({R + 1}, {IN})/({OUT}, {R + 1}) differ",
    ),
    (
        "one site per module and target",
        lambda a: replace(a, sites=(*a.sites, _site())),
        "layers.0.q_proj: two sites for the same module and target",
    ),
    (
        "a tensor is replaced once",
        lambda a: replace(a, replacements=a.replacements * 2),
        "a base tensor is replaced twice",
    ),
    (
        "one token row per index",
        lambda a: replace(a, token_rows=(TokenRows("embed.weight", (1, 3), torch.zeros(3, IN)),)),
        f"embed.weight: 2 token indices, rows (3, {IN})",
    ),
    (
        "token rows are 2-D",
        lambda a: replace(a, token_rows=(TokenRows("embed.weight", (1, 3), torch.zeros(2)),)),
        "embed.weight: 2 token indices, rows (2,)",
    ),
    (
        "token indices are distinct",
        lambda a: replace(a, token_rows=(TokenRows("embed.weight", (3, 3), torch.zeros(2, IN)),)),
        "embed.weight: a token index repeats",
    ),
    (
        "tensor sources name both keys",
        lambda a: replace(a, tensor_sources={"layers.1.q_proj.weight": ""}),
        "tensor source 'layers.1.q_proj.weight' <- '' is empty",
    ),
]


def test_the_unbroken_adapter_is_valid():
    assert problems(_adapter()) == []
    verify(_adapter())


@pytest.mark.parametrize(("invariant", "brk", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_broken_invariant_is_reported_alone(invariant, brk, message):
    assert problems(brk(_adapter())) == [message]
    with pytest.raises(VerifyError, match=r"^IR invalid: ") as info:
        verify(brk(_adapter()))
    assert message in str(info.value)


def test_every_broken_invariant_is_reported_at_once():
    broken = _with_site(scale=float("inf"), lora_bias=torch.zeros(OUT))(_adapter())
    broken = replace(broken, replacements=broken.replacements * 2)
    assert problems(broken) == [
        "layers.0.q_proj: scale inf is not finite",
        "layers.0.q_proj: lora bias without a bias target",
        "a base tensor is replaced twice",
    ]


@dataclass(frozen=True, slots=True)
class _BreakScale(Pass):
    """A buggy pass: leaves a non-finite scale behind."""

    name: ClassVar[str] = "break-scale"

    def run(self, adapter: Adapter, ctx: PassContext) -> PassResult:
        broken = _with_site(scale=float("nan"))(adapter)
        return PassResult(broken, (broken.sites[0].module,))


def test_run_pipeline_verifies_under_the_environment(monkeypatch):
    monkeypatch.setenv(VERIFY_ENV, "1")
    with pytest.raises(VerifyError, match=r"IR invalid after pass 'break-scale': .* not finite"):
        run_pipeline(_adapter(), [_BreakScale()], PassContext())


def test_run_pipeline_verifies_with_check(monkeypatch):
    monkeypatch.delenv(VERIFY_ENV, raising=False)
    result = run_pipeline(_adapter(), [_BreakScale()], PassContext())  # unchecked: no error
    assert problems(result.adapter)
    with pytest.raises(VerifyError, match="after pass 'break-scale'"):
        run_pipeline(_adapter(), [_BreakScale()], PassContext(), check=True)


def test_run_pipeline_verifies_its_input(monkeypatch):
    monkeypatch.setenv(VERIFY_ENV, "1")
    broken = replace(_adapter(), replacements=_adapter().replacements * 2)
    with pytest.raises(VerifyError, match=r"^IR invalid: a base tensor is replaced twice"):
        run_pipeline(broken, [], PassContext())


@pytest.mark.parametrize(
    ("run", "passes"),
    [
        (
            lambda base, adapter, out: loracc.convert(adapter, out, base_dir=base, rank=2),
            ["expand-layer-replication", "reconstruct-residual", "truncate-rank", "fold-scaling"],
        ),
        (
            lambda base, adapter, out: loracc.merge(base, adapter, out),
            ["expand-layer-replication", "reconstruct-residual", "untie-embeddings", "fold-dora"],
        ),
    ],
    ids=["convert", "merge"],
)
def test_api_pipelines_are_verified(run, passes, tmp_path: Path, monkeypatch):
    """The tests' LORACC_VERIFY=1 reaches every pipeline: verified before and after each pass."""
    monkeypatch.setenv(VERIFY_ENV, "1")
    checked: list[str | None] = []

    def recording(adapter: Adapter, *, after: str | None = None) -> None:
        checked.append(after)
        verify(adapter, after=after)

    monkeypatch.setattr(pipeline, "verify", recording)
    mc.write_base(tmp_path / "base")
    mc.write_adapter(tmp_path / "adapter")
    run(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert checked == [None, *passes]
