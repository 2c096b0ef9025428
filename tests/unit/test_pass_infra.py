"""The pass infrastructure: SitePass's loop and pass options parsed from real types.

Option values were parsed by looking for "int"/"float"/"bool" in the annotation *text*, so an
option whose type name merely contains "int" (``Hint`` below, an alias of ``str``) was parsed as an
integer and refused. They now come from ``typing.get_type_hints``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch

from loracc.errors import ConfigError
from loracc.ir import Adapter, Site, SiteKind
from loracc.passes import PASSES, PassContext, Rewritten, SitePass, Skip, parse_pipeline

Hint = str  # a str whose name contains "int"


def _site(module: str, scale: float) -> Site:
    return Site(
        module=module,
        target=f"{module}.weight",
        kind=SiteKind.LINEAR,
        lora_A=torch.ones(1, 2),
        lora_B=torch.ones(3, 1),
        alpha=scale,
        scale=scale,
    )


@dataclass(frozen=True, slots=True)
class _Halve(SitePass):
    """Halves the scale of sites whose scale is above ``floor``; a test pass."""

    name: ClassVar[str] = "halve"
    floor: float = 1.0
    count: int = 1
    either: int | float = 0
    limit: float | None = None
    flag: bool = False
    hint: Hint = ""

    def rewrite(self, site: Site, adapter: Adapter, ctx: PassContext) -> Rewritten | Skip:
        if site.scale <= self.floor:
            return Skip(site.module, f"scale {site.scale} <= {self.floor}")
        return Rewritten(replace(site, scale=site.scale / 2), f"{site.module}: halved")


def test_site_pass_builds_the_result():
    adapter = Adapter("a", sites=(_site("x", 4.0), _site("y", 0.5), _site("z", 2.0)))
    result = _Halve()(adapter, PassContext())
    assert [s.scale for s in result.adapter.sites] == [2.0, 0.5, 1.0]
    assert result.adapter.sites[1] is adapter.sites[1]
    assert result.changed == ("x", "z") and result.modified
    assert result.skipped == (Skip("y", "scale 0.5 <= 1.0"),)
    assert result.details == ("x: halved", "z: halved")


def test_site_pass_returns_its_input_when_nothing_changes():
    adapter = Adapter("a", sites=(_site("y", 0.5),))
    result = _Halve()(adapter, PassContext())
    assert result.adapter is adapter and not result.modified and not result.details


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(PASSES, _Halve.name, _Halve)  # type: ignore[index]


def test_options_are_parsed_from_their_types(registered):
    (p,) = parse_pipeline("halve{floor=2,count=3,either=2.5,limit=1e-3,flag=yes,hint=abc}")
    assert p == _Halve(floor=2.0, count=3, either=2.5, limit=1e-3, flag=True, hint="abc")
    assert type(p.floor) is float and type(p.count) is int  # type: ignore[attr-defined]
    (q,) = parse_pipeline("halve{either=4}")
    assert type(q.either) is int  # type: ignore[attr-defined]
    assert parse_pipeline(p.spec()) == [p]


@pytest.mark.parametrize("item", ["count=2.5", "floor=x", "limit=none"])
def test_a_value_of_the_wrong_type_is_refused(registered, item):
    with pytest.raises(ConfigError, match=rf"^--passes: halve\{{{item}\}}: "):
        parse_pipeline(f"halve{{{item}}}")
