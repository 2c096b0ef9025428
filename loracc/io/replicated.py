"""The base checkpoint as peft's ``layer_replication`` sees it: layer layout and a replicated view.

peft's ``replicate_layers`` builds a deeper model whose layer list is ``[i for start, end in
layer_replication for i in range(start, end)]``; the adapter's keys use the expanded indices.
:class:`LayerLayout` finds the layer list in a checkpoint's keys (``model.layers``,
``encoder.layer``, ``h``, after any number of ``model.`` wrappers, plus ``decoder.layers`` and
``transformer.h``) and maps expanded keys to stored ones; :class:`ReplicatedCheckpoint` is the
base seen through that map. The PEFT reader checks an adapter against the view; the
``expand-layer-replication`` pass uses the layout to materialize the layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loracc.arch import LAYER_KEY, LAYER_LIST_PREFERENCE
from loracc.errors import ConfigError, UnsupportedError

if TYPE_CHECKING:
    import torch

    from loracc.weights import BaseWeights, ExpertSplit

__all__ = ["MAX_REPLICATION", "LayerLayout", "ReplicatedCheckpoint"]

# How many times the base's layer count a layer_replication may build without
# --allow-large-replication: the output grows with it, and real configs stay within 2-3x.
MAX_REPLICATION = 4


@dataclass(frozen=True, slots=True)
class LayerLayout:
    """Where the layer list lives in the checkpoint and which stored layer each new one copies."""

    prefix: str
    stored: int
    mapping: tuple[int, ...]

    @classmethod
    def find(
        cls, keys: Sequence[str], ranges: Sequence[Sequence[int]], *, allow_large: bool = True
    ) -> LayerLayout:
        """The layout for ``layer_replication`` ``ranges`` over a checkpoint with ``keys``.

        Unless ``allow_large``, a layout of more than :data:`MAX_REPLICATION` times the base's
        layers is refused before it is built (a 1.6 MB config can ask for 400,000 layers).
        """
        counts: dict[str, int] = {}
        for key in keys:
            m = LAYER_KEY.match(key)
            if m:
                n = int(m["index"]) + 1
                counts[m["prefix"]] = max(counts.get(m["prefix"], 0), n)
        prefix = None
        for pattern in LAYER_LIST_PREFERENCE:
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
        for start, end in ranges:
            if not 0 <= start < end <= stored:
                raise ConfigError(
                    f"layer_replication range [{start}, {end}) does not fit the base's {stored} "
                    f"layers under '{prefix}'"
                )
        total = sum(end - start for start, end in ranges)
        if not allow_large and total > MAX_REPLICATION * stored:
            raise ConfigError(
                f"layer_replication builds {total} layers from the base's {stored}, more than "
                f"{MAX_REPLICATION}x; pass --allow-large-replication if that is intended"
            )
        mapping = [i for start, end in ranges for i in range(start, end)]
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

    def __init__(
        self, base: BaseWeights, ranges: Sequence[Sequence[int]], *, allow_large: bool = False
    ) -> None:
        self._base = base
        self.layout = LayerLayout.find(base.keys(), ranges, allow_large=allow_large)
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
