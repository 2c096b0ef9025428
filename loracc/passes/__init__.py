"""The passes, by name, and the pipeline-string parser (``a,b{opt=1,other=x}``)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from loracc.errors import ConfigError
from loracc.passes.base import Pass, PassContext, PassResult, Skip
from loracc.passes.expand_layer_replication import ExpandLayerReplication
from loracc.passes.fold_dora import FoldDora
from loracc.passes.fold_scaling import FoldScaling
from loracc.passes.reconstruct_residual import ReconstructResidual
from loracc.passes.truncate_rank import TruncateRank
from loracc.passes.untie_embeddings import UntieEmbeddings

__all__ = ["PASSES", "Pass", "PassContext", "PassResult", "Skip", "parse_pipeline"]

PASSES: Mapping[str, type[Pass]] = {
    cls.name: cls
    for cls in (
        ExpandLayerReplication,
        ReconstructResidual,
        UntieEmbeddings,
        FoldDora,
        FoldScaling,
        TruncateRank,
    )
}

_ITEM = re.compile(r"\s*([a-z0-9-]+)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def _convert(text: str, kind: object) -> object:
    kind_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if "float" in kind_name and "int" in kind_name:
        return float(text) if any(c in text for c in ".eE") else int(text)
    if "int" in kind_name:
        return int(text)
    if "float" in kind_name:
        return float(text)
    if "bool" in kind_name:
        return text.lower() in ("1", "true", "yes")
    return text


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
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs: dict[str, object] = {}
        for item in filter(None, (opts or "").split(",")):
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if key not in fields:
                raise ConfigError(f"--passes: pass '{name}' has no option '{key}'")
            try:
                kwargs[key] = _convert(value.strip(), fields[key].type)
            except ValueError as e:
                raise ConfigError(f"--passes: {name}{{{item}}}: {e}") from e
        try:
            passes.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--passes: {name}: {e}") from e
        pos = m.end()
    return passes
