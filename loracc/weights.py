"""The base-weights protocol: what passes and readers need from a base model, with no I/O.

Passes (``PassContext.base``), the PEFT reader and the lowerings read base tensors through
:class:`BaseWeights`, one tensor at a time. The implementations live with their formats:
:class:`loracc.io.checkpoint.Checkpoint` (a Hugging Face folder), the ``layer_replication`` view
(:class:`loracc.io.replicated.ReplicatedCheckpoint`) and the ONNX export's bound initializers
(``OnnxBase`` in :mod:`loracc.lower`). This module sits in the core so that code depending on the
protocol does not depend on a format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["BaseWeights", "ExpertSplit"]


@dataclass(frozen=True, slots=True)
class ExpertSplit:
    """A fused expert parameter (E, out, in) stored as per-expert 2-D tensors.

    ``keys[e]`` lists the stored tensors whose rows, stacked in order, make expert ``e``.
    """

    keys: tuple[tuple[str, ...], ...]
    shape: tuple[int, int, int]


class BaseWeights(Protocol):
    """Base weights by Hugging Face key: what passes (``PassContext.base``) and the PEFT reader use.

    :class:`~loracc.io.checkpoint.Checkpoint` is the real one; the PEFT reader's view through
    ``layer_replication`` (``ReplicatedCheckpoint``) and the ONNX export's bound initializers
    (``OnnxBase``) stand in for it.
    """

    @property
    def config(self) -> Mapping[str, Any]:
        """The model's ``config.json`` (empty when there is none)."""
        ...

    @property
    def tied_embeddings(self) -> tuple[str, str] | None:
        """(output key, input-embedding key) when the output embedding is tied and not stored."""
        ...

    @property
    def expert_splits(self) -> Mapping[str, ExpertSplit]:
        """Fused expert parameters stored as per-expert tensors, by parameter key."""
        ...

    def keys(self) -> list[str]:
        """Stored tensor names."""
        ...

    def __contains__(self, key: object) -> bool: ...

    def resolve(self, key: str) -> str | None:
        """The stored name of a module-path key, or None."""
        ...

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of ``key`` (stored, renamed, fused or tied), or None."""
        ...

    def read(self, key: str) -> torch.Tensor:
        """One stored tensor, as a fresh CPU tensor."""
        ...
