"""drop-noop-replacements: drop whole-tensor replacements equal to what the base already holds.

Identity: the merged tensors. Replacing a tensor by an equal one changes nothing, and peft saves
a targeted embedding (``modules_to_save``, a resized vocabulary) whole even when it did not
change; dropping it keeps a lowering from baking a copy into the model (an adapter file with
slots cannot carry one at all). Each dropped replacement leaves a note on the adapter.

Fields read: ``Adapter.replacements`` (target, tensor), ``Adapter.notes``; from the base, whether
its tensor equals a replacement (:class:`HeldTensors`, which the ONNX base weights provide; any
other base: skipped). PEFT fields read: modules_to_save (through the replacements).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, runtime_checkable

import torch

from loracc.ir import Adapter
from loracc.passes.base import Pass, PassContext, PassResult, Skip

__all__ = ["DropNoopReplacements", "HeldTensors"]


@runtime_checkable
class HeldTensors(Protocol):
    """Base weights that can tell whether they hold a tensor exactly."""

    def holds(self, key: str, tensor: torch.Tensor) -> bool:
        """Whether every place the base keeps ``key`` equals ``tensor`` (shape and values)."""


@dataclass(frozen=True, slots=True)
class DropNoopReplacements(Pass):
    """Drop replacements whose tensor equals the base's."""

    name: ClassVar[str] = "drop-noop-replacements"

    def run(self, adapter: Adapter, ctx: PassContext) -> PassResult:
        base = ctx.base
        if not isinstance(base, HeldTensors):
            return PassResult(adapter, skipped=(Skip("*", "the base is not an ONNX graph"),))
        keep, dropped, notes = [], [], []
        for r in adapter.replacements:
            if base.holds(r.target, r.tensor):
                dropped.append(r.target)
                notes.append(f"{r.target}: saved whole but equal to the model's tensor; ignored")
            else:
                keep.append(r)
        if not dropped:
            return PassResult(adapter)
        new = replace(adapter, replacements=tuple(keep), notes=adapter.notes + tuple(notes))
        return PassResult(new, tuple(dropped))
