"""Stacking: several adapters merged one after another, as one edit list per output tensor.

Identity: merging A1 into the base, then A2 into that result, and so on (peft: ``merge_and_unload``,
load the next adapter on the merged model, merge again), with each adapter's delta scaled by its
weight ``w``. Every adapter is compiled against the model the adapters before it made
(:class:`StackedBase`), so a DoRA norm is taken on the weight it is merged into, and the lowerings
apply the adapters' edits in command-line order to each tensor in fp32 and round once:

- plain LoRA: ``W + w1·ΔW1 + w2·ΔW2 + …`` (order does not matter),
- DoRA: ``W' = m·(W + w·ΔW)/‖W + w·ΔW‖`` on the weight ``W`` it is merged into (order matters).

An adapter's weight multiplies its sites' scale (and alpha, so alpha/r still gives it) before any
pass, so a DoRA weight scales the delta before the normalisation and a lora_bias with its delta.

Refused, naming the adapter (:func:`check_stack`, :func:`check_stage`), because the stack would not
say what the user means: ``layer_replication`` in a stack (the later adapters' layers are not the
base's); a residual-base init (pissa, olora, kasa, corda, ...) after the first adapter (was it
trained on the base or on the stack below it?); a weight other than 1 on an adapter that replaces
tensors (modules_to_save, trainable tokens: a replacement is not a delta) or has a residual init;
and a later adapter replacing (or overwriting token rows of) a tensor an earlier one changed, which
would silently discard the earlier change. A later adapter's whole copy of a tensor that equals the
base's (peft saves the embedding layers whenever they are targeted) is no replacement at all: it
is dropped, with a note, so the earlier adapters' changes stay (peft's sequential merge loads the
copy and loses them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from loracc import kernels
from loracc.errors import UnsupportedError
from loracc.ir import PLAIN_INITS, Adapter, TargetEdits
from loracc.weights import BaseWeights, ExpertSplit

__all__ = [
    "Chain",
    "StackedBase",
    "check_stack",
    "check_stage",
    "compile_stack",
    "labelled_steps",
    "output_chains",
    "stacked",
    "weighted",
]


@dataclass(frozen=True, slots=True)
class Chain:
    """How one output tensor is made: the base key it starts from, then each adapter's edits on
    it in stack order (adapters that leave it alone omitted; everything before the last whole
    replacement dropped, since the replacement does not read it)."""

    source: str
    stages: tuple[TargetEdits, ...] = ()

    def then(self, edits: TargetEdits | None) -> Chain:
        if not edits:
            return self
        if edits.replacement is not None:
            return Chain(self.source, (edits,))
        return Chain(self.source, (*self.stages, edits))

    def shape(self, base_shape: tuple[int, ...]) -> tuple[int, ...]:
        for edits in reversed(self.stages):
            if edits.replacement is not None:
                return tuple(edits.replacement.tensor.shape)
        return base_shape

    def apply(self, read: Callable[[], torch.Tensor], device: str = "cpu") -> torch.Tensor:
        """The fp32 tensor: ``read()`` (not called when a replacement supplies it), each stage's
        edits applied in turn (:func:`loracc.kernels.apply_edits`)."""
        stages = self.stages or (TargetEdits(),)
        w = kernels.apply_edits(read, stages[0], device=device)
        for edits in stages[1:]:
            w = kernels.apply_edits(_given(w), edits, device=device)
        return w


def _given(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


def output_chains(
    adapters: Sequence[Adapter], base_keys: Sequence[str], *, strict: bool = True
) -> dict[str, Chain]:
    """Every output key after ``adapters`` (in order: the base's, less removed keys, then new
    ones), each with its :class:`Chain`. A target that is none of them is refused, or with
    ``strict=False`` taken as a base key the listing left out (an ONNX base lists only the
    weights sites bind, not the tensors replacements bind)."""
    chains = {key: Chain(key) for key in base_keys}
    for adapter in adapters:
        edits = adapter.edits_by_target()
        keys = [k for k in chains if k not in adapter.removed_keys]
        keys += [k for k in adapter.tensor_sources if k not in chains]
        missing = sorted(set(edits) - set(keys))
        if missing and strict:
            raise UnsupportedError(f"{adapter.name}: targets '{missing[0]}', not in the output")
        keys += missing
        new = {}
        for key in keys:
            src = adapter.tensor_sources.get(key, key)
            before = chains.get(src) or Chain(src)  # a tied head: the base resolves it
            new[key] = before.then(edits.get(key))
        chains = new
    return chains


class StackedBase:
    """:class:`~loracc.weights.BaseWeights` of ``base`` after ``adapters`` (compiled), unrounded:
    what the next adapter in a stack is compiled against. ``read`` gives fp32."""

    def __init__(self, base: BaseWeights, adapters: Sequence[Adapter]) -> None:
        self.base = base
        self._chains = output_chains(adapters, base.keys(), strict=False)
        tied = base.tied_embeddings
        self._tied = tied if tied is None or tied[0] not in self._chains else None

    @property
    def config(self) -> Mapping[str, Any]:
        return self.base.config

    @property
    def tied_embeddings(self) -> tuple[str, str] | None:
        return self._tied

    @property
    def expert_splits(self) -> Mapping[str, ExpertSplit]:
        return self.base.expert_splits

    def keys(self) -> list[str]:
        return list(self._chains)

    def __iter__(self) -> Iterator[str]:
        return iter(self._chains)

    def __contains__(self, key: object) -> bool:
        return key in self._chains

    def resolve(self, key: str) -> str | None:
        return key if key in self._chains else self.base.resolve(key)

    def shape(self, key: str) -> tuple[int, ...] | None:
        chain = self._chains.get(key)
        if chain is None:
            return self.base.shape(key)
        base_shape = self.base.shape(chain.source)
        return chain.shape(base_shape) if base_shape is not None else None

    def changed(self, key: str) -> bool:
        """Whether an adapter below changed the values of ``key`` (an untied copy is the same)."""
        chain = self._chains.get(key)
        return chain is not None and bool(chain.stages)

    def read(self, key: str) -> torch.Tensor:
        chain = self._chains.get(key)
        if chain is None:
            return self.base.read(key)
        return chain.apply(lambda: self.base.read(chain.source))


class _StackedOnnxBase(StackedBase):
    """A stacked ONNX base: the graph's layer kinds, and ``holds`` for tensors no adapter below
    changed (the passes that ask: apply-graph-layout, drop-noop-replacements)."""

    def graph_layout(self, module: str) -> Any:
        return self.base.graph_layout(module)  # type: ignore[attr-defined]

    def holds(self, key: str, tensor: torch.Tensor) -> bool:
        return not self.changed(key) and self.base.holds(key, tensor)  # type: ignore[attr-defined]


def stacked(base: BaseWeights, adapters: Sequence[Adapter]) -> BaseWeights:
    """``base`` itself for the first adapter, else the model ``adapters`` made of it."""
    if not adapters:
        return base
    onnx = hasattr(base, "graph_layout") and hasattr(base, "holds")
    return (_StackedOnnxBase if onnx else StackedBase)(base, adapters)


def weighted(adapter: Adapter, weight: float) -> Adapter:
    """``adapter`` with every delta scaled by ``weight`` (module docstring); refused where a
    weight has no meaning."""
    if weight == 1.0:
        return adapter
    what = [f"replaces '{r.target}' ({r.origin})" for r in adapter.replacements]
    what += [f"sets rows of '{t.target}' (trainable tokens)" for t in adapter.token_rows]
    what += [f"'{s.module}' has init_lora_weights='{s.init}'" for s in adapter.sites
             if s.init not in PLAIN_INITS or s.initial is not None]  # fmt: skip
    if what:
        raise UnsupportedError(
            f"{adapter.name}: --weights {weight:g}: the adapter {what[0]}, which is not a delta "
            "a weight can scale; give it weight 1"
        )
    sites = tuple(replace(s, scale=s.scale * weight, alpha=s.alpha * weight) for s in adapter.sites)
    return replace(adapter, sites=sites)


def labelled_steps(
    done: Sequence[tuple[Adapter, Sequence[dict[str, Any]]]],
) -> list[dict[str, Any]]:
    """The reports' pass steps of each (adapter, steps); in a stack each names its adapter."""
    many = len(done) > 1
    return [
        {**step, "adapter": a.name} if many else dict(step) for a, steps in done for step in steps
    ]


def check_stack(adapters: Sequence[Adapter]) -> None:
    """Refuse, before any pass reads the base, a stack whose meaning is unclear."""
    if len(adapters) < 2:
        return
    for i, adapter in enumerate(adapters):
        if adapter.layer_replication:
            raise UnsupportedError(
                f"{adapter.name}: layer_replication in a stack of {len(adapters)} adapters: the "
                "other adapters' layers would not be the base's; merge it alone, then stack the "
                "others on the merged checkpoint"
            )
        residual = next((s for s in adapter.sites if s.init not in PLAIN_INITS), None)
        if i > 0 and residual is not None:
            raise UnsupportedError(
                f"{adapter.name}: '{residual.module}' has init_lora_weights='{residual.init}' "
                f"(a residual base) and is adapter {i + 1} of the stack: it is unclear whether it "
                "was trained on the base or on the adapters before it; convert it to plain LoRA "
                "(`loracc convert --base`) or put it first"
            )


def check_stage(adapter: Adapter, below: BaseWeights) -> None:
    """Refuse a compiled adapter that would overwrite what the adapters ``below`` changed."""
    if not isinstance(below, StackedBase):
        return
    whole = [(r.target, f"replaces it ({r.origin})") for r in adapter.replacements]
    whole += [(t.target, "sets rows of it (trainable tokens)") for t in adapter.token_rows]
    for key, how in whole:
        if below.changed(key):
            raise UnsupportedError(
                f"{adapter.name}: {how}, but an adapter before it in the stack changed "
                f"'{key}': the merge would discard that change; merge them separately or drop "
                "one of the two edits"
            )


_Extra = TypeVar("_Extra")


def _holds(base: BaseWeights, key: str, tensor: torch.Tensor) -> bool:
    """Whether ``base`` stores exactly ``tensor`` as ``key``."""
    if hasattr(base, "holds"):  # an ONNX base: every initializer bound to the key
        return bool(base.holds(key, tensor))
    tied = base.tied_embeddings
    stored = tied[1] if tied is not None and key == tied[0] else base.resolve(key)
    if stored is None or base.shape(stored) != tuple(tensor.shape):
        return False
    return torch.equal(base.read(stored).to(tensor.dtype), tensor)


def _without_base_copies(adapter: Adapter, base: BaseWeights) -> Adapter:
    """``adapter`` less the replacements equal to the (unstacked) base's tensor."""
    copies = [r for r in adapter.replacements if _holds(base, r.target, r.tensor)]
    if not copies:
        return adapter
    notes = tuple(
        f"{adapter.name}: '{r.target}' is saved whole but equals the base's; in a stack it is "
        "not a replacement (the adapters before it keep their change)"
        for r in copies
    )
    kept = tuple(r for r in adapter.replacements if r not in copies)
    return replace(adapter, replacements=kept, notes=adapter.notes + notes)


def compile_stack(
    adapters: Sequence[Adapter],
    base: BaseWeights,
    compile_one: Callable[[Adapter, BaseWeights], tuple[Adapter, _Extra]],
) -> list[tuple[Adapter, _Extra]]:
    """Each adapter compiled against the model the ones before it made (:func:`stacked`):
    ``compile_one(adapter, below)`` gives the compiled adapter and what else its caller keeps."""
    done: list[tuple[Adapter, _Extra]] = []
    for adapter in adapters:
        below = stacked(base, [a for a, _ in done])
        if below is not base:
            adapter = _without_base_copies(adapter, base)
        compiled, extra = compile_one(adapter, below)
        check_stage(compiled, below)
        done.append((compiled, extra))
    return done
