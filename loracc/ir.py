"""The adapter IR: what an adapter does to a base checkpoint, as plain frozen data.

An :class:`Adapter` is a table of :class:`Site` records, one per base tensor a LoRA delta changes,
plus whole-tensor :class:`Replacement` records (modules_to_save, saved biases, resized embeddings)
and :class:`TokenRows` (trainable tokens). Nothing here reads or writes files: ``loracc.io`` builds
the IR, ``loracc.passes`` rewrites it, ``loracc.lower`` turns it into weights or graphs.

Orientation conventions (the same as PEFT's files, so a site can be written back unchanged):

- ``LINEAR``: base ``W`` is (out, in); ``lora_A`` (r, in); ``lora_B`` (out, r); ΔW = s·B@A.
- ``CONV1D`` (transformers' GPT-2 ``Conv1D``): base stored (in, out); factors as LINEAR;
  Δstored = (s·B@A)ᵀ.
- ``EMBEDDING``: base (num, dim); ``lora_A`` (r, num); ``lora_B`` (dim, r); ΔW = (s·B@A)ᵀ.
- ``CONV``: base (out, in, *k); ``lora_A`` (r, in, *k); ``lora_B`` (out, r, 1, ...).
- ``PARAMETER`` (``target_parameters``): 2-D P (out, in) as LINEAR; 3-D P (E, d1, d2) with
  ``lora_A`` (r·E, in) and ``lora_B`` (out, r·E), experts split as PEFT's ParamWrapper does.

Two orientations of a base tensor, and the only place that converts between them
(:meth:`Site.to_stored`, :meth:`Site.to_logical`, :meth:`Site.logical_shape`,
:meth:`Site.stored_shape`):

- *logical*: the layer's own view, the one an exported graph's reference weight has: (out, in)
  for LINEAR, CONV1D and 2-D PARAMETER, (num, dim) for EMBEDDING, (out, in, *k) for CONV,
  (E, out, in) for 3-D PARAMETER.
- *stored*: the checkpoint's tensor. It is the logical one except CONV1D, stored (in, out), and a
  3-D PARAMETER whose owner has ``is_transposed=True``, stored (E, in, out).
"""

from __future__ import annotations

import enum
import weakref
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


__all__ = [
    "EMPTY_MAPPING",
    "PLAIN_INITS",
    "Adapter",
    "Replacement",
    "Site",
    "SiteKind",
    "TargetEdits",
    "TokenRows",
]

EMPTY_MAPPING: Mapping[str, Any] = MappingProxyType({})

# init_lora_weights values (as ``Site.init`` strings) whose delta is plain ``s·B@A`` on the
# unchanged base: nothing to reconstruct.
PLAIN_INITS = frozenset({"true", "false", "gaussian", "orthogonal", "mica", "eva"})


class SiteKind(str, enum.Enum):
    """The layer type of the base tensor a site changes; it fixes the delta's orientation."""

    LINEAR = "linear"
    CONV1D = "conv1d"
    EMBEDDING = "embedding"
    CONV = "conv"
    PARAMETER = "parameter"

    @property
    def channel_axis(self) -> int:
        """The axis of the logical weight DoRA normalizes per: the output channel, or the
        embedding dim (peft's DoRA embedding norm runs over the vocabulary)."""
        return 1 if self is SiteKind.EMBEDDING else 0

    def logical_shape(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[int, ...]:
        """The logical base shape factors ``lora_A`` (r, in, *k) and ``lora_B`` (out, r, ...)
        of a 2-D or convolution site imply."""
        if self is SiteKind.EMBEDDING:
            return (lora_A.shape[1], lora_B.shape[0])
        return (lora_B.shape[0], lora_A.shape[1], *lora_A.shape[2:])

    @property
    def stored_axes(self) -> tuple[int, ...]:
        """The two axes of the logical weight the checkpoint stores swapped: Conv1D's (in, out);
        none for the other kinds (3-D parameters: :meth:`Site.to_stored`)."""
        return (0, 1) if self is SiteKind.CONV1D else ()

    def stored_shape(self, logical: tuple[int, ...]) -> tuple[int, ...]:
        """A 2-D or convolution weight's stored shape from its logical one."""
        return _swap(logical, self.stored_axes)

    def stored_axis(self, logical_axis: int) -> int:
        """Where axis ``logical_axis`` of the logical weight is in the stored one."""
        return _moved(logical_axis, self.stored_axes)

    def to_stored(self, logical: torch.Tensor) -> torch.Tensor:
        """A 2-D or convolution weight in the logical orientation, viewed as stored."""
        return logical.transpose(*self.stored_axes) if self.stored_axes else logical

    def to_logical(self, stored: torch.Tensor) -> torch.Tensor:
        """A 2-D or convolution weight as stored, viewed in the logical orientation."""
        return self.to_stored(stored)  # a transpose is its own inverse


@dataclass(frozen=True, slots=True, eq=False)
class Site:
    """One base tensor changed by a low-rank delta ``scale · lora_B @ lora_A``.

    Attributes:
        module: the PEFT module path (for target_parameters, ``<module>.<param>``).
        target: the base checkpoint key the delta changes.
        kind: the layer type, which fixes orientations (module docstring).
        lora_A: the down factor, PEFT layout.
        lora_B: the up factor, PEFT layout.
        alpha: lora_alpha resolved for this module (alpha_pattern applied).
        scale: the multiplier of ``B @ A``: alpha/r, alpha/sqrt(r) with rsLoRA, 1 once folded.
        use_rslora: whether ``scale`` came from alpha/sqrt(r).
        lora_bias: ``lora_B.bias`` (out,), multiplied by ``scale`` like B.
        bias_target: the base bias key ``lora_bias`` adds to.
        magnitude: DoRA's stored ``lora_magnitude_vector``; needs the base weight to apply.
        channel_scale: DoRA folded: ``W' = channel_scale ⊙ (W + ΔW)`` per output channel
            (per embedding dim for EMBEDDING), computed by the fold-dora pass.
        init: ``init_lora_weights`` as a string ("true", "pissa", "olora", "pissa_niter_4", ...),
            or "kasa" for a ``kasa_config`` site (its base truncation not yet reconstructed).
        initial: (A0, B0) from the adapter saved before training, when the init is not
            reproducible from the base.
        experts: E for a 3-D PARAMETER target, else 0.
        transposed: a 3-D PARAMETER target whose owner has ``is_transposed=True``.
        layout_source: how the reader decided the layout (linear or conv1d, transposed experts):
            "architecture gpt2", "shape", "--layout c_proj=conv1d", ... (loracc.io.layout).
    """

    module: str
    target: str
    kind: SiteKind
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    alpha: float
    scale: float
    use_rslora: bool = False
    lora_bias: torch.Tensor | None = None
    bias_target: str | None = None
    magnitude: torch.Tensor | None = None
    channel_scale: torch.Tensor | None = None
    init: str = "true"
    initial: tuple[torch.Tensor, torch.Tensor] | None = None
    experts: int = 0
    transposed: bool = False
    layout_source: str = ""

    @property
    def rank(self) -> int:
        """The LoRA rank r (per expert for 3-D parameters)."""
        rows = self.lora_A.shape[0]
        return rows // self.experts if self.experts else rows

    @property
    def variant(self) -> str:
        """A short name of what the site needs beyond plain LoRA."""
        if self.magnitude is not None:
            return "dora"
        if self.channel_scale is not None:
            return "dora-folded"
        if self.init not in PLAIN_INITS:
            return self.init
        return "lora"

    def logical_shape(self) -> tuple[int, ...]:
        """The base tensor's shape in the logical orientation (module docstring)."""
        if self.experts:
            return (self.experts, self.lora_B.shape[0], self.lora_A.shape[1])
        return self.kind.logical_shape(self.lora_A, self.lora_B)

    def stored_shape(self) -> tuple[int, ...]:
        """The base tensor's shape as the checkpoint stores it."""
        return _swap(self.logical_shape(), self._stored_axes())

    def to_stored(self, logical: torch.Tensor) -> torch.Tensor:
        """A tensor in this site's logical orientation, viewed in its stored one."""
        axes = self._stored_axes()
        return logical.transpose(*axes) if axes else logical

    def to_logical(self, stored: torch.Tensor) -> torch.Tensor:
        """A tensor in this site's stored orientation, viewed in its logical one."""
        return self.to_stored(stored)  # a transpose is its own inverse

    def stored_axis(self, logical_axis: int) -> int:
        """Where axis ``logical_axis`` of the logical orientation is in the stored one."""
        return _moved(logical_axis, self._stored_axes())

    def _stored_axes(self) -> tuple[int, ...]:
        """The two axes the stored orientation swaps, or none."""
        if self.experts:
            return (1, 2) if self.transposed else ()
        return self.kind.stored_axes

    @property
    def num_params(self) -> int:
        """Parameters the adapter stores for this site."""
        extra = [t for t in (self.lora_bias, self.magnitude, self.channel_scale) if t is not None]
        return self.lora_A.numel() + self.lora_B.numel() + sum(t.numel() for t in extra)


def _swap(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with the two ``axes`` swapped (none: unchanged)."""
    if not axes:
        return shape
    out = list(shape)
    i, j = axes
    out[i], out[j] = out[j], out[i]
    return tuple(out)


def _moved(axis: int, axes: tuple[int, ...]) -> int:
    """Where ``axis`` goes when the two ``axes`` are swapped (none: stays)."""
    return axes[1 - axes.index(axis)] if axis in axes else axis


@dataclass(frozen=True, slots=True, eq=False)
class Replacement:
    """A base tensor replaced whole: a modules_to_save copy, a trained bias, a resized embedding."""

    target: str
    tensor: torch.Tensor
    origin: str


@dataclass(frozen=True, slots=True, eq=False)
class TokenRows:
    """Trainable tokens: rows ``indices`` of ``target`` become ``rows`` (new values, not deltas)."""

    target: str
    indices: tuple[int, ...]
    rows: torch.Tensor


# Adapter.edits_by_target per live adapter.
_EDITS: weakref.WeakKeyDictionary[Adapter, Mapping[str, TargetEdits]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True, eq=False)
class TargetEdits:
    """Everything an adapter does to one base tensor, in the fields' order of application
    (:func:`loracc.kernels.apply_edits`): the whole replacement, trainable-token rows, each
    site's delta (then its DoRA channel scale), each ``lora_bias`` whose bias this tensor is."""

    replacements: tuple[Replacement, ...] = ()
    rows: tuple[TokenRows, ...] = ()
    sites: tuple[Site, ...] = ()
    bias_sites: tuple[Site, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.replacements or self.rows or self.sites or self.bias_sites)

    @property
    def replacement(self) -> Replacement | None:
        """The replacement the tensor starts from: the last one the adapter lists."""
        return self.replacements[-1] if self.replacements else None

    @property
    def whole_tensor(self) -> bool:
        """Whether an edit acts on the tensor as a whole (not through a site's factors)."""
        return bool(self.replacements or self.rows or self.bias_sites)

    def before_deltas(self) -> TargetEdits:
        """The edits that make the tensor the site deltas add to (replacement, rows)."""
        return TargetEdits(self.replacements, self.rows)


# No slots: _EDITS holds adapters weakly, and weakref_slot needs Python 3.11 (loracc takes 3.10).
@dataclass(frozen=True, eq=False)
class Adapter:
    """A whole adapter: the sites and replacements, plus what the base's structure must become.

    Attributes:
        name: where the adapter came from (a folder), for messages.
        sites: the low-rank deltas.
        replacements: whole-tensor replacements.
        token_rows: trainable-token row replacements.
        layer_replication: PEFT's ``layer_replication`` ranges, until expanded.
        tensor_sources: output key -> base key it is copied from (set by layer-replication
            expansion and untying); keys not listed come from the base key of the same name.
        removed_keys: base keys that are not part of the output (layers dropped by
            layer_replication).
        config_updates: changes to the base's config.json (num_hidden_layers, ...).
        refusals: reasons this adapter's merge would not be equivalent to the adapted model.
        notes: what the reader ignored or decided, for ``inspect``.
        config: the adapter_config.json fields as read.
    """

    name: str
    sites: tuple[Site, ...]
    replacements: tuple[Replacement, ...] = ()
    token_rows: tuple[TokenRows, ...] = ()
    layer_replication: tuple[tuple[int, int], ...] = ()
    tensor_sources: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAPPING)
    removed_keys: frozenset[str] = frozenset()
    config_updates: Mapping[str, Any] = field(default_factory=lambda: EMPTY_MAPPING)
    refusals: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=lambda: EMPTY_MAPPING)

    def targets(self) -> set[str]:
        """Every base key this adapter changes."""
        return set(self.edits_by_target())

    def edits_by_target(self) -> Mapping[str, TargetEdits]:
        """The edits on each base key this adapter changes, keys in first-mention order
        (replacements, token rows, sites), edits in adapter order. Computed once per adapter
        (it is frozen): passes ask for one key per site."""
        edits = _EDITS.get(self)
        if edits is None:
            edits = _EDITS[self] = MappingProxyType(self._group_edits())
        return edits

    def _group_edits(self) -> dict[str, TargetEdits]:
        keys: dict[str, None] = {}  # first-mention order
        replacements: dict[str, list[Replacement]] = defaultdict(list)
        rows: dict[str, list[TokenRows]] = defaultdict(list)
        sites: dict[str, list[Site]] = defaultdict(list)
        bias_sites: dict[str, list[Site]] = defaultdict(list)
        for r in self.replacements:
            keys[r.target] = None
            replacements[r.target].append(r)
        for t in self.token_rows:
            keys[t.target] = None
            rows[t.target].append(t)
        for s in self.sites:
            keys[s.target] = None
            sites[s.target].append(s)
            if s.bias_target:
                keys[s.bias_target] = None
                bias_sites[s.bias_target].append(s)
        return {
            key: TargetEdits(
                tuple(replacements.get(key, ())),
                tuple(rows.get(key, ())),
                tuple(sites.get(key, ())),
                tuple(bias_sites.get(key, ())),
            )
            for key in keys
        }
