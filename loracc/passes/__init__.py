"""The passes, by name, and the pipeline-string parser (``a,b{opt=1,other=x}``)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping

from loracc.errors import ConfigError
from loracc.passes.apply_graph_layout import ApplyGraphLayout
from loracc.passes.base import Pass, PassContext, PassResult, Rewritten, SitePass, Skip
from loracc.passes.drop_noop_replacements import DropNoopReplacements
from loracc.passes.expand_layer_replication import ExpandLayerReplication
from loracc.passes.fold_dora import FoldDora
from loracc.passes.fold_scaling import FoldScaling
from loracc.passes.reconstruct_residual import ReconstructResidual
from loracc.passes.truncate_rank import TruncateRank
from loracc.passes.untie_embeddings import UntieEmbeddings

__all__ = [
    "PASSES",
    "Pass",
    "PassContext",
    "PassResult",
    "Rewritten",
    "SitePass",
    "Skip",
    "parse_pipeline",
]

PASSES: Mapping[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        ApplyGraphLayout,
        ExpandLayerReplication,
        ReconstructResidual,
        UntieEmbeddings,
        FoldDora,
        FoldScaling,
        TruncateRank,
        DropNoopReplacements,
    )
}

_ITEM = re.compile(r"\s*([a-z0-9-]+)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


# Option types a pass may declare, most specific first: "8" is an int even where a float would do.
_PARSERS: dict[type, Callable[[str], object]] = {int: int, float: float, bool: _bool, str: str}


def _convert(text: str, kind: object) -> object:
    """``text`` as a value of the option type ``kind`` (one of :data:`_PARSERS`, or a union of
    them, ``None`` allowed as the default only)."""
    is_union = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
    allowed = set(typing.get_args(kind) if is_union else (kind,)) - {type(None)}
    unknown = [t for t in allowed if t not in _PARSERS]
    if unknown:
        raise TypeError(f"option type {kind} is not one of {', '.join(map(str, _PARSERS))}")
    errors = []
    for cls, parse in _PARSERS.items():
        if cls in allowed:
            try:
                return parse(text)
            except ValueError as e:
                errors.append(str(e))
    raise ValueError("; ".join(errors))


def parse_pipeline(spec: str) -> list[Pass]:
    """Parse ``"fold-scaling,truncate-rank{rank=8}"`` into pass instances."""
    passes: list[Pass] = []
    pos = 0
    spec = spec.strip()
    while pos < len(spec):
        m = _ITEM.match(spec, pos)
        if m is None or m.end() == pos:
            raise ConfigError(f"--passes: cannot parse '{spec[pos:]}'")
        name, opts = m.group(1), m.group(2)
        cls = PASSES.get(name)
        if cls is None:
            raise ConfigError(f"--passes: unknown pass '{name}'; known: {', '.join(PASSES)}")
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, object] = {}
        for item in filter(None, (opts or "").split(",")):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in fields:
                raise ConfigError(f"--passes: pass '{name}' has no option '{key}'")
            try:
                kwargs[key] = _convert(value.strip(), hints[key])
            except ValueError as e:
                raise ConfigError(f"--passes: {name}{{{item}}}: {e}") from e
        try:
            passes.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--passes: {name}: {e}") from e
        pos = m.end()
    return passes
