"""expand-layer-replication: materialize peft's ``layer_replication`` as real, renumbered layers.

Identity: peft's ``replicate_layers`` (``tuners/tuners_utils.py``) builds a deeper model whose
layer list is ``[i for start, end in layer_replication for i in range(start, end)]``: layer j of
the new model is a copy of stored layer ``map[j]`` that *shares* its base Parameters but has its
own LoRA (the adapter's keys use the expanded indices). The adapted model computes, per layer,
``W_j = W[map[j]] + Δ_j``. The pass records exactly that in the IR: ``tensor_sources`` names the
stored tensor every output key of layer j is copied from (when it is not the key itself),
``removed_keys`` drops stored layers the new list does not reach, and ``config_updates`` sets the
layer count (``num_hidden_layers`` or the architecture's alias) and re-indexes per-layer config
lists (``layer_types`` and kin: ``new[j] = old[map[j]]``; peft leaves them stale, transformers
checks their length). The merge lowering then clones before adding deltas.

Where peft is wrong: ``LoraModel._check_merge_allowed`` looks "layer_replication" up in the
wrong dict, so ``merge_and_unload`` never refuses; it adds every copy's delta into the one shared
tensor, and the merged model drifts from the adapted one (semantics §8). loracc clones first.

Finding the layer list follows peft (``model.layers``, ``encoder.layer``, ``h``, after any
number of ``model.`` wrappers) plus ``decoder.layers`` and ``transformer.h``, read from the base
checkpoint's keys.

PEFT fields read: layer_replication. Base: tensor names and config.json only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from loracc.errors import ConfigError, PassError, UnsupportedError
from loracc.ir import Adapter
from loracc.passes.base import Pass, PassContext, PassResult, Skip

if TYPE_CHECKING:
    import torch

    from loracc.io.checkpoint import BaseWeights, ExpertSplit

__all__ = ["ExpandLayerReplication", "LayerLayout", "ReplicatedCheckpoint"]

_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|layer|h))\.(?P<index>\d+)\.(?P<rest>.+)$")
# Layer-list prefixes in the order peft tries them (llama, bert, falcon), then the extras.
_PREFERENCE = (
    re.compile(r"^(?:model\.)*layers$"),
    re.compile(r"^(?:model\.)*(?:bert\.)?encoder\.layer$"),
    re.compile(r"^(?:model\.)*h$"),
    re.compile(r"^(?:model\.)*decoder\.layers$"),
    re.compile(r"^(?:model\.)*transformer\.h$"),
)
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_PER_LAYER_KEYS = frozenset({"no_rope_layers", "num_attention_heads_per_layer"})


def _per_layer(key: str) -> bool:
    return key == "layer_types" or key.endswith("_layer_types") or key in _PER_LAYER_KEYS


@dataclass(frozen=True, slots=True)
class LayerLayout:
    """Where the layer list lives in the checkpoint and which stored layer each new one copies."""

    prefix: str
    stored: int
    mapping: tuple[int, ...]

    @classmethod
    def find(cls, keys: Sequence[str], ranges: Sequence[Sequence[int]]) -> LayerLayout:
        """The layout for ``layer_replication`` ``ranges`` over a checkpoint with ``keys``."""
        counts: dict[str, int] = {}
        for key in keys:
            m = _LAYER_KEY.match(key)
            if m:
                n = int(m["index"]) + 1
                counts[m["prefix"]] = max(counts.get(m["prefix"], 0), n)
        prefix = None
        for pattern in _PREFERENCE:
            hits = sorted(p for p in counts if pattern.match(p))
            if len(hits) > 1:
                raise UnsupportedError(
                    f"layer_replication: several layer lists in the base ({', '.join(hits)})"
                )
            if hits:
                prefix = hits[0]
                break
        if prefix is None:
            raise UnsupportedError(
                "layer_replication: no layer list in the base (peft looks for model.layers, "
                f"encoder.layer or h); found {sorted(counts) or 'none'}"
            )
        stored = counts[prefix]
        mapping: list[int] = []
        for start, end in ranges:
            if not 0 <= start < end <= stored:
                raise ConfigError(
                    f"layer_replication range [{start}, {end}) does not fit the base's {stored} "
                    f"layers under '{prefix}'"
                )
            mapping.extend(range(start, end))
        return cls(prefix, stored, tuple(mapping))

    def split(self, key: str) -> tuple[int, str] | None:
        """(layer index, rest) of a key under this layer list, else None."""
        head = self.prefix + "."
        if not key.startswith(head):
            return None
        index, _, rest = key[len(head) :].partition(".")
        return (int(index), rest) if index.isdigit() and rest else None

    def key(self, index: int, rest: str) -> str:
        return f"{self.prefix}.{index}.{rest}"

    def source(self, key: str) -> str:
        """The stored key an expanded-model key is copied from (itself outside the layers)."""
        parts = self.split(key)
        if parts is None or parts[0] >= len(self.mapping):
            return key
        return self.key(self.mapping[parts[0]], parts[1])

    def expand(self, keys: Sequence[str]) -> list[str]:
        """The expanded model's keys: the stored keys with the layer list replaced."""
        by_layer: dict[int, list[str]] = {}
        out: list[str] = []
        for key in keys:
            parts = self.split(key)
            if parts is None:
                out.append(key)
            else:
                by_layer.setdefault(parts[0], []).append(parts[1])
        for j, i in enumerate(self.mapping):
            out.extend(self.key(j, rest) for rest in by_layer.get(i, []))
        return out


class ReplicatedCheckpoint:
    """A base checkpoint seen through ``layer_replication``: expanded layer j reads layer map[j].

    The PEFT reader checks the adapter's (expanded) keys against this view; the config, tied
    embeddings and expert splits are the wrapped base's.
    """

    def __init__(self, base: BaseWeights, ranges: Sequence[Sequence[int]]) -> None:
        self._base = base
        self.layout = LayerLayout.find(base.keys(), ranges)
        self._keys = self.layout.expand(base.keys())

    @property
    def config(self) -> Mapping[str, Any]:
        return self._base.config

    @property
    def tied_embeddings(self) -> tuple[str, str] | None:
        return self._base.tied_embeddings

    @property
    def expert_splits(self) -> Mapping[str, ExpertSplit]:
        return self._base.expert_splits

    def keys(self) -> list[str]:
        return list(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.layout.source(key) in self._base

    def resolve(self, key: str) -> str | None:
        stored = self._base.resolve(self.layout.source(key))
        parts = self.layout.split(key)
        if stored is None or parts is None:
            return stored
        moved = self.layout.split(stored)
        return stored if moved is None else self.layout.key(parts[0], moved[1])

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self._base.shape(self.layout.source(key))

    def read(self, key: str) -> torch.Tensor:
        return self._base.read(self.layout.source(key))


def _config_updates(
    config: Mapping[str, Any], layout: LayerLayout, updates: dict[str, Any]
) -> list[str]:
    scopes = [config]
    if isinstance(config.get("text_config"), dict):
        scopes.append(config["text_config"])
    count_key = next(
        (k for k in _LAYER_COUNT_KEYS if any(k in scope for scope in scopes)), _LAYER_COUNT_KEYS[0]
    )
    updates[count_key] = len(layout.mapping)
    changed = [f"{count_key} = {len(layout.mapping)}"]
    for scope in scopes:
        for key, value in scope.items():
            if _per_layer(key) and isinstance(value, list) and len(value) == layout.stored:
                updates[key] = [value[i] for i in layout.mapping]
                changed.append(f"{key} re-indexed")
    return changed


@dataclass(frozen=True, slots=True)
class ExpandLayerReplication(Pass):
    """Clone replicated layers into their own tensors and renumber the layer list."""

    name: ClassVar[str] = "expand-layer-replication"

    def requires(self, adapter: Adapter, ctx: PassContext) -> None:
        if adapter.layer_replication and ctx.base is None:
            raise PassError("expand-layer-replication needs the base checkpoint")

    def run(self, adapter: Adapter, ctx: PassContext) -> PassResult:
        if not adapter.layer_replication:
            return PassResult(adapter, skipped=(Skip("*", "no layer_replication"),))
        assert ctx.base is not None
        stored_keys = ctx.base.keys()
        layout = LayerLayout.find(stored_keys, adapter.layer_replication)
        out_keys = layout.expand(stored_keys)
        sources = dict(adapter.tensor_sources)
        for key in out_keys:
            src = layout.source(key)
            if src != key:
                sources[key] = src
        out_set = set(out_keys)
        removed = adapter.removed_keys | {k for k in stored_keys if k not in out_set}
        updates = dict(adapter.config_updates)
        config_notes = _config_updates(ctx.base.config, layout, updates)
        targets = adapter.targets()
        stray = sorted(t for t in targets if t not in out_set and t in removed)
        if stray:
            raise ConfigError(
                f"{adapter.name}: the adapter edits '{stray[0]}', a layer that layer_replication "
                f"{[list(p) for p in adapter.layer_replication]} does not keep"
            )
        new = replace(
            adapter,
            layer_replication=(),
            tensor_sources=MappingProxyType(sources),
            removed_keys=frozenset(removed),
            config_updates=MappingProxyType(updates),
        )
        return PassResult(
            new,
            changed=(layout.prefix,),
            details=(
                f"{layout.prefix}: {layout.stored} stored layers -> {len(layout.mapping)} "
                f"{list(layout.mapping)}; {'; '.join(config_notes)}",
            ),
        )
