"""The ONNX model's base weights, as passes read them (:class:`OnnxBase`).

A pass that reads base weights (DoRA folding, PiSSA/OLoRA reconstruction) gets the initializers
the binding found, under their Hugging Face keys. The ONNX base also answers what only the graph
knows: the layer kind a module's weight shows (apply-graph-layout) and whether a whole-tensor
replacement equals what the graph holds (drop-noop-replacements).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx_ir as ir
import torch

from loracc.errors import FormatError
from loracc.io.onnx_model import tensor_to_torch, torch_dtype
from loracc.ir import Adapter, SiteKind
from loracc.lower.onnx.bind import BindingTable
from loracc.lower.onnx.index import Place
from loracc.lower.onnx.quant import QuantScheme
from loracc.passes.apply_graph_layout import with_graph_experts, with_graph_layout

if TYPE_CHECKING:
    from loracc.weights import ExpertSplit

__all__ = ["BaseEntry", "OnnxBase"]


@dataclass(frozen=True)
class BaseEntry:
    """A base weight as a pass sees it: where it lives in the graph and how it is oriented
    (``quant``: how to dequantize a quantized one)."""

    init: ir.Value
    transposed: bool
    block: tuple[int, int] | None
    kind: SiteKind
    ref_shape: tuple[int, ...]
    quant: QuantScheme | None = None


class OnnxBase:
    """The ONNX model's base weights as :class:`~loracc.weights.BaseWeights`.

    Passes that read base weights (DoRA folding, PiSSA/OLoRA reconstruction) get the bound
    initializers under their Hugging Face keys, in the stored orientation of each site's kind.
    ``tied_embeddings`` is always None: every ONNX use has its own binding, and shared
    initializers are split before one user changes.
    """

    def __init__(
        self,
        entries: dict[str, BaseEntry],
        path: str = "<onnx>",
        *,
        layouts: Mapping[str, tuple[SiteKind, str]] | None = None,
        tensors: Mapping[str, Sequence[Place]] | None = None,
        experts: Mapping[str, tuple[int, bool, str]] | None = None,
    ) -> None:
        self.folder = path
        self.config: dict[str, Any] = {}
        self._entries = entries
        self._layouts = dict(layouts or {})
        self._tensors = dict(tensors or {})
        self._experts = dict(experts or {})

    @classmethod
    def from_table(
        cls, table: BindingTable, adapters: Sequence[Adapter], path: str = "<onnx>"
    ) -> OnnxBase:
        """The bound weights of ``adapters``' sites. Each entry is oriented for the site's kind
        after apply-graph-layout, the first pass to run, so every later pass reads it right."""
        layouts = {
            m: shown for m, b in table.sites.items() if (shown := b.graph_layout()) is not None
        }
        experts = {
            m: found for m, b in table.sites.items() if (found := b.graph_experts()) is not None
        }
        entries: dict[str, BaseEntry] = {}
        for adapter in adapters:
            for site in adapter.sites:
                b = table.sites[site.module]
                site = with_graph_layout(site, layouts.get(site.module))
                site = with_graph_experts(site, experts.get(site.module))
                use = b.uses[0]
                entries.setdefault(
                    site.target,
                    BaseEntry(
                        use.init,
                        use.transposed,
                        b.block,
                        site.kind,
                        site.logical_shape(),
                        use.quant,
                    ),
                )
        tensors = {key: tb.places for key, tb in table.tensors.items()}
        return cls(entries, path, layouts=layouts, tensors=tensors, experts=experts)

    def graph_layout(self, module: str) -> tuple[SiteKind, str] | None:
        """The layer kind the graph shows for ``module``, and why (apply-graph-layout)."""
        return self._layouts.get(module)

    def graph_experts(self, module: str) -> tuple[int, bool, str] | None:
        """The expert weight the graph shows for ``module`` (apply-graph-layout)."""
        return self._experts.get(module)

    def holds(self, key: str, tensor: torch.Tensor) -> bool:
        """Whether every initializer bound to ``key`` equals ``tensor`` (drop-noop-replacements)."""
        places = self._tensors.get(key)
        if not places:
            return False
        return all(_holds(p, tensor) for p in places)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def tied_embeddings(self) -> tuple[str, str] | None:
        return None

    @property
    def expert_splits(self) -> dict[str, ExpertSplit]:
        return {}

    def resolve(self, key: str) -> str | None:
        return key if key in self._entries else None

    def _entry(self, key: str) -> BaseEntry:
        try:
            return self._entries[key]
        except KeyError:
            raise FormatError(f"{self.folder}: no bound ONNX weight for '{key}'") from None

    def shape(self, key: str) -> tuple[int, ...] | None:
        e = self._entries.get(key)
        if e is None:
            return None
        return e.kind.stored_shape(e.ref_shape)

    def read_ref(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight of ``key`` in the reference orientation."""
        e = self._entry(key)
        tensor = e.init.const_value
        assert tensor is not None
        if e.quant is not None:
            t = e.quant.dequantize(tensor).to(dtype or torch_dtype(e.quant.float_dtype))
        else:
            t = tensor_to_torch(tensor, dtype or torch_dtype(tensor.dtype))
        ref = t.mT if e.transposed else t  # 3-D experts: the last two axes
        if e.block is not None:
            ref = ref[e.block[0] : e.block[1]]
        return ref.contiguous()

    def read(self, key: str) -> torch.Tensor:
        return self._entry(key).kind.to_stored(self.read_ref(key)).contiguous()


def _holds(place: Place, tensor: torch.Tensor) -> bool:
    stored = place.init.const_value
    assert stored is not None
    t = tensor_to_torch(stored)
    view = t.T if place.transposed else t
    return tuple(view.shape) == tuple(tensor.shape) and torch.equal(view, tensor.to(view.dtype))
