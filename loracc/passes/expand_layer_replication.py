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
checkpoint's keys (``loracc.io.replicated.LayerLayout``, shared with the PEFT reader).

PEFT fields read: layer_replication. Base: tensor names and config.json only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, ClassVar

from loracc.arch import LAYER_COUNT_KEYS, PER_LAYER_CONFIG_KEYS
from loracc.errors import ConfigError, PassError
from loracc.io.replicated import LayerLayout, ReplicatedCheckpoint
from loracc.ir import Adapter
from loracc.passes.base import Pass, PassContext, PassResult, Skip

__all__ = ["ExpandLayerReplication", "LayerLayout", "ReplicatedCheckpoint"]


def _per_layer(key: str) -> bool:
    return key == "layer_types" or key.endswith("_layer_types") or key in PER_LAYER_CONFIG_KEYS


def _config_updates(
    config: Mapping[str, Any], layout: LayerLayout, updates: dict[str, Any]
) -> list[str]:
    scopes = [config]
    if isinstance(config.get("text_config"), dict):
        scopes.append(config["text_config"])
    count_key = next(
        (k for k in LAYER_COUNT_KEYS if any(k in scope for scope in scopes)), LAYER_COUNT_KEYS[0]
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
