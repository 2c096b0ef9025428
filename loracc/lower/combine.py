"""Combine several adapters into one (``loracc combine``), as peft's ``add_weighted_adapter``.

Every input site contributes ``w·s·B@A`` (w its adapter's weight, s its scale: alpha/r, or
alpha/√r under rsLoRA). The output is a plain adapter: scale 1 on every site (alpha = r), the
weights and scales folded into the factors, so no flag of the inputs (``use_rslora``,
``alpha_pattern``) is needed to read it. Per module, over the adapters that change it:

- ``cat``: ``A' = [w₁s₁A₁; w₂s₂A₂; …]``, ``B' = [B₁ B₂ …]``, so ``B'@A' = Σ wᵢsᵢBᵢ@Aᵢ`` exactly;
  rank Σrᵢ. (peft: the same products, in the same operation order.)
- ``svd``: the ``cat`` factors truncated to rank R (``--rank``, default the largest input rank)
  by :func:`loracc.passes.truncate_rank.truncate_factors`: QRs of the stacked factors and an
  SVD of the (Σr)×(Σr) core, never of the (out, in) delta; exact (the ``cat`` factors, kept)
  when Σr ≤ R. (peft: a dense SVD of the summed delta; same product up to rounding.)
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: peft's factor-wise
  task arithmetic: ``A' = f(A₁…Aₖ; sign(wᵢsᵢ)·√|wᵢsᵢ|)``, ``B' = f(B₁…Bₖ; √|wᵢsᵢ|)`` with f the
  method (weighted sum; magnitude trim + sign election + disjoint mean; random drop with rescale)
  of ``peft.utils.merge_utils``. Note that ``linear`` is not the sum of the deltas (its product
  has cross terms ``Bᵢ@Aⱼ``): it is peft's definition; ``cat`` is the exact sum. Every adapter
  that changes a module must have the same rank there. A module only one adapter changes gets
  f of that one factor pair and ``w·s`` folded into B.
- One adapter in all: ``linear`` (as peft; ``cat`` and ``svd`` without ``rank`` give the same
  product, the other methods and ``rank`` are refused rather than ignored), so one adapter with
  weight 1 comes back as itself (its scale folded into B).

What peft gets wrong and loracc defines (peft issue #3761):

- rsLoRA: the folded output has scale 1 (peft 0.21 copies ``use_rslora`` onto alpha = r, scaling
  the result by √r).
- ``lora_bias``: the output bias is ``Σ wᵢsᵢ·biasᵢ`` for every method: the bias is added after
  the factors, not a factor, so nothing is pruned or sign-elected in it (peft drops it).
- DoRA: a module is DoRA in the output when one adapter changes it: the delta is that adapter's
  (weighted, by the method) and the magnitude vector is kept, so its weight scales the delta
  before normalisation, and weight 1 gives the adapter back. Two DoRA adapters on one module are
  refused: each magnitude normalises a different weight, so no magnitude is exact for their sum.
  DoRA and plain adapters together are refused: ``use_dora`` is one flag per adapter, and a plain
  module's magnitude ‖W + ΔW‖ needs the base (peft keeps the magnitude it computed for a zero
  delta).

Whole tensors (modules_to_save copies, saved biases, the embedding peft saves with an
``embed_tokens`` target) are kept when every adapter replaces them with the same tensor, else
refused: a replacement is not a delta, so nothing combines two of them.

Refused (one line naming the adapter or module): residual inits (PiSSA, OLoRA, CorDA, KaSA, ...:
``loracc convert --base`` them first), ``target_parameters`` (peft refuses them too),
trainable tokens, layer_replication, different ranks on one module for the factor-wise methods,
the ``*_svd`` forms of the pruning methods (their pruning acts on the dense delta, which has no
low-rank factors to truncate), and options the method does not use.

Random methods (``dare_*``): each factor's keep mask is drawn from a generator seeded from
``seed`` (default 0), the module and the adapter's position, so a seed gives identical bytes.
peft draws from the global torch generator in its module order, so its masks cannot be
reproduced bit for bit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch

from loracc.errors import ConfigError, UnsupportedError
from loracc.ir import PLAIN_INITS, Adapter, Replacement, Site, SiteKind
from loracc.lower.combine_methods import FACTOR_WISE, METHODS, MajoritySign
from loracc.lower.combine_methods import PRUNING as _PRUNING
from loracc.passes.truncate_rank import truncate_factors

__all__ = ["FACTOR_WISE", "METHODS", "CombineOptions", "combine_adapters"]

_DENSE_SVD = tuple(f"{m}_svd" for m in _PRUNING)


@dataclass(frozen=True, slots=True)
class CombineOptions:
    """How to combine: peft's ``add_weighted_adapter`` arguments.

    Attributes:
        method: one of :data:`METHODS`.
        weights: one finite number per adapter (default 1.0 each).
        rank: ``svd`` only: the rank kept (default the largest input rank).
        density: the pruning methods: the fraction of entries kept, in (0, 1].
        seed: ``dare_*``: seeds the keep masks (None: 0).
        majority_sign: ``ties``/``dare_ties``: sign election by ``total`` or ``frequency``.
    """

    method: str
    weights: tuple[float, ...] | None = None
    rank: int | None = None
    density: float | None = None
    seed: int | None = None
    majority_sign: MajoritySign = "total"

    def check(self) -> None:
        """Refuse options that do not fit the method (the weights: :func:`loracc.api.common.
        parse_weights`, the one reading of ``--weights``)."""
        m = self.method
        if m in _DENSE_SVD:
            raise UnsupportedError(
                f"--method {m}: the pruning acts on the dense (out, in) delta, which has no "
                "low-rank factors to truncate without a dense SVD of a full weight; use "
                f"--method {m.removesuffix('_svd')} or svd"
            )
        if m not in METHODS:
            raise ConfigError(f"--method: '{m}' is not one of {', '.join(METHODS)}")
        if self.rank is not None and (m != "svd" or self.rank < 1):
            raise ConfigError(f"--rank {self.rank}: needs --method svd and a rank >= 1")
        if m in _PRUNING and self.density is None:
            raise ConfigError(f"--method {m} needs --density D (the fraction kept, in (0, 1])")
        if self.density is not None and m not in _PRUNING:
            raise ConfigError(f"--density: --method {m} does not prune")
        if self.density is not None and not 0 < self.density <= 1:
            raise ConfigError(f"--density {self.density}: must be in (0, 1]")
        if self.majority_sign not in ("total", "frequency"):
            raise ConfigError(f"--majority-sign: '{self.majority_sign}' is not total or frequency")
        if self.seed is not None and not m.startswith("dare_"):
            raise ConfigError(f"--seed: --method {m} draws nothing at random")
        if self.majority_sign != "total" and m not in ("ties", "dare_ties"):
            raise ConfigError(f"--majority-sign: --method {m} elects no signs")


@dataclass(frozen=True, slots=True)
class _Part:
    """One adapter's site of a module, with its weight and its position among the adapters."""

    index: int
    site: Site
    weight: float

    @property
    def ws(self) -> float:
        """The multiplier of ``B@A`` (weight × scale), as peft computes it."""
        return self.weight * self.site.scale


def combine_adapters(adapters: Sequence[Adapter], options: CombineOptions) -> Adapter:
    """The adapter ``options.method`` makes of ``adapters`` (plain sites: scale 1, alpha = r)."""
    if not adapters:
        raise ConfigError("combine: give at least one --adapter")
    options.check()
    for adapter in adapters:
        _check_adapter(adapter)
    _check_dora_mix(adapters)
    replacements = _shared_replacements(adapters)
    if len(adapters) == 1:
        _check_single(adapters[0], options)
    weights = options.weights or (1.0,) * len(adapters)
    method = "linear" if len(adapters) == 1 else options.method
    rank = options.rank or max((s.rank for a in adapters for s in a.sites), default=1)
    parts: dict[str, list[_Part]] = {}
    for i, (adapter, w) in enumerate(zip(adapters, weights, strict=True)):
        for site in adapter.sites:
            parts.setdefault(site.module, []).append(_Part(i, site, w))
    names = [a.name for a in adapters]
    sites = tuple(
        _combine_module(module, parts[module], names, method, rank, options)
        for module in sorted(parts)
    )
    if any(s.lora_bias is not None for s in sites):
        sites = tuple(_with_bias(s, names) for s in sites)  # peft's lora_bias is adapter-wide
    config = dict(adapters[0].config)
    config["lora_bias"] = any(s.lora_bias is not None for s in sites)
    return Adapter(
        name=f"combine({', '.join(names)})",
        sites=sites,
        replacements=replacements,
        config=MappingProxyType(config),
        notes=tuple(n for a in adapters for n in a.notes),
    )


def _check_adapter(adapter: Adapter) -> None:
    """Refuse what a combined plain (or DoRA) adapter cannot carry."""
    name = adapter.name
    whole = [
        (adapter.refusals, adapter.refusals[0] if adapter.refusals else ""),
        (adapter.token_rows, "trainable tokens replace whole rows"),
        (adapter.layer_replication, "layer_replication changes the base's layers"),
    ]
    for used, reason in whole:
        if used:
            raise UnsupportedError(f"{name}: cannot combine: {reason}")
    for site in adapter.sites:
        if site.kind is SiteKind.PARAMETER:
            raise UnsupportedError(
                f"{name}: {site.module}: cannot combine target_parameters sites (peft's "
                "add_weighted_adapter refuses them too)"
            )
        if site.init not in PLAIN_INITS or site.initial is not None:
            raise UnsupportedError(
                f"{name}: {site.module}: init '{site.init}' changes the base weight; write it "
                "as a plain adapter first with `loracc convert --base BASE`, then combine that"
            )


def _shared_replacements(adapters: Sequence[Adapter]) -> tuple[Replacement, ...]:
    """The whole tensors every adapter replaces alike (peft saves the embedding it wraps, and
    such copies are the base's), kept; any other replacement has no combination and is refused."""
    first = {r.target: r for r in adapters[0].replacements}
    for adapter in adapters:
        mine = {r.target: r for r in adapter.replacements}
        for target in sorted(first.keys() | mine.keys()):
            a, b = first.get(target), mine.get(target)
            if a is not None and b is not None and torch.equal(a.tensor, b.tensor):
                continue
            owner, replaced = (adapter.name, b) if b is not None else (adapters[0].name, a)
            assert replaced is not None  # target comes from one of the two
            raise UnsupportedError(
                f"{owner}: cannot combine: it replaces {target} whole ({replaced.origin}) and "
                "the other adapters do not replace it with the same tensor"
            )
    return adapters[0].replacements


def _check_single(adapter: Adapter, options: CombineOptions) -> None:
    """One adapter is combined with ``linear`` (peft's rule; cat and svd at its own rank give the
    same product): refuse the options that would then be ignored."""
    if options.method not in ("linear", "cat", "svd") or options.rank is not None:
        asked = f"--method {options.method}" + (f" --rank {options.rank}" if options.rank else "")
        raise UnsupportedError(
            f"{adapter.name}: one adapter is combined with linear (as peft does), so {asked} "
            "would be ignored; use --method linear, or `loracc convert --rank R` to truncate"
        )


def _check_dora_mix(adapters: Sequence[Adapter]) -> None:
    dora = [any(s.magnitude is not None for s in a.sites) for a in adapters]
    if any(dora) and not all(dora):
        plain = adapters[dora.index(False)].name
        other = adapters[dora.index(True)].name
        raise UnsupportedError(
            f"{plain}: cannot combine plain LoRA with DoRA adapter {other}: use_dora is one flag "
            "per adapter, and a plain module's DoRA magnitude needs the base weight"
        )


def _combine_module(
    module: str,
    parts: list[_Part],
    names: list[str],
    method: str,
    rank: int,
    options: CombineOptions,
) -> Site:
    first = parts[0].site
    for p in parts[1:]:
        shape, other = first.logical_shape(), p.site.logical_shape()
        if (p.site.kind, p.site.target) != (first.kind, first.target) or shape != other:
            raise UnsupportedError(
                f"{names[p.index]}: {module}: {p.site.kind.value} {other} on {p.site.target} but "
                f"{names[parts[0].index]} has {first.kind.value} {shape} on {first.target}"
            )
    if len(parts) > 1 and any(p.site.magnitude is not None for p in parts):
        raise UnsupportedError(
            f"{names[parts[1].index]}: {module}: DoRA on a module {names[parts[0].index]} also "
            "changes: each magnitude normalises a different weight, so no magnitude is exact "
            "for the combined delta"
        )
    if method == "cat" or method == "svd":
        A, B = _stacked(parts)
        if method == "svd" and A.shape[0] > rank:
            A, B = _truncated(first, A, B, rank)
    else:
        A, B = _factor_wise(module, parts, names, method, options)
    bias = _bias_sum(parts)
    bias_target = next((p.site.bias_target for p in parts if p.site.bias_target), None)
    return replace(
        first,
        lora_A=A.contiguous(),
        lora_B=B.contiguous(),
        alpha=float(A.shape[0]),
        scale=1.0,
        use_rslora=False,
        lora_bias=bias,
        bias_target=bias_target,
        initial=None,
    )


def _stacked(parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cat`` factors, peft's operations: ``A·w·s`` stacked on rows, B on columns."""
    A = torch.cat([p.site.lora_A * p.weight * p.site.scale for p in parts], dim=0)
    B = torch.cat([p.site.lora_B for p in parts], dim=1)
    return A, B


def _truncated(
    site: Site, A: torch.Tensor, B: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B@A`` cut to ``rank`` from its factors (conv factors flattened as truncate-rank does)."""
    t = truncate_factors(A.flatten(1), B.flatten(1), rank=rank)
    A_new = t.A.to(A.dtype).reshape(t.rank, *A.shape[1:])
    B_new = t.B.to(B.dtype)
    if site.kind is SiteKind.CONV:
        B_new = B_new.reshape(B_new.shape[0], t.rank, *B.shape[2:])
    return A_new, B_new


def _factor_wise(
    module: str, parts: list[_Part], names: list[str], method: str, options: CombineOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {p.site.rank for p in parts}
    if len(ranks) > 1:
        listed = ", ".join(f"{names[p.index]} r={p.site.rank}" for p in parts)
        raise UnsupportedError(
            f"{module}: --method {method} combines the factors entry by entry and needs one "
            f"rank; found {listed} (use --method cat or svd)"
        )
    As = [p.site.lora_A for p in parts]
    Bs = [p.site.lora_B for p in parts]
    if len(parts) == 1:  # fold w·s into B: the adapter itself when nothing is pruned
        (p,) = parts
        A = _MERGES[method](As, torch.ones(1), _mask_options(options, module, p.index, "A"))
        B = _MERGES[method](Bs, torch.ones(1), _mask_options(options, module, p.index, "B"))
        return A.to(As[0].dtype), (B * p.ws).to(Bs[0].dtype)
    signs = [1.0 if p.ws >= 0 else -1.0 for p in parts]
    w_A = torch.tensor([math.sqrt(abs(p.ws)) * s for p, s in zip(parts, signs, strict=True)])
    w_B = torch.tensor([math.sqrt(abs(p.ws)) for p in parts])
    ids = [p.index for p in parts]
    A = _MERGES[method](As, w_A, _mask_options(options, module, ids, "A"))
    B = _MERGES[method](Bs, w_B, _mask_options(options, module, ids, "B"))
    return A.to(As[0].dtype), B.to(Bs[0].dtype)


def _bias_sum(parts: list[_Part]) -> torch.Tensor | None:
    """``Σ wᵢsᵢ·biasᵢ`` over the parts with a ``lora_bias``, in fp32, stored in their dtype."""
    terms = [(p.site.lora_bias, p.ws) for p in parts if p.site.lora_bias is not None]
    if not terms:
        return None
    total = torch.zeros(terms[0][0].shape, dtype=torch.float32)
    for bias, ws in terms:
        total = total + bias.float() * ws
    return total.to(terms[0][0].dtype)


def _with_bias(site: Site, names: list[str]) -> Site:
    """``site`` with a zero ``lora_bias`` when it has none (the output's flag is adapter-wide)."""
    if site.lora_bias is not None:
        return site
    if site.kind is SiteKind.EMBEDDING:
        raise UnsupportedError(
            f"{', '.join(names)}: {site.module}: an Embedding site in an adapter with lora_bias: "
            "peft has no lora_bias for Embedding layers"
        )
    zero = torch.zeros(site.lora_B.shape[0], dtype=site.lora_B.dtype)
    return replace(site, lora_bias=zero, bias_target=site.bias_target or _bias_key(site))


def _bias_key(site: Site) -> str:
    return site.target.removesuffix(".weight") + ".bias"


# ---------------------------------------------------------------------------------------------
# peft.utils.merge_utils, operation for operation (fp32 products as peft computes them)


@dataclass(frozen=True, slots=True)
class _MaskOptions:
    density: float | None
    majority_sign: MajoritySign
    generators: Callable[[int], torch.Generator]


def _mask_options(
    options: CombineOptions, module: str, ids: int | list[int], factor: str
) -> _MaskOptions:
    """The pruning options of one factor; the ``j``-th tensor's generator is seeded from the seed,
    the module, the factor and the adapter's position, so masks do not depend on other modules."""
    positions = [ids] if isinstance(ids, int) else ids

    def generator(j: int) -> torch.Generator:
        text = f"{options.seed or 0}\0{module}\0{factor}\0{positions[j]}".encode()
        seed = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
        return torch.Generator().manual_seed(seed)

    return _MaskOptions(options.density, options.majority_sign, generator)


def _weighted_sum(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (tensors * weights.view(weights.shape + (1,) * (tensors.dim() - 1))).sum(dim=0)


def _magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _randomly_pruned(tensor: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=gen)
    return tensor * mask / density


def _ties_merge(tensors: torch.Tensor, weights: torch.Tensor, sign: MajoritySign) -> torch.Tensor:
    signs = tensors.sign()
    magnitude = tensors.sum(dim=0) if sign == "total" else signs.sum(dim=0)
    majority = signs == torch.where(magnitude >= 0, 1, -1)
    weighted = tensors * weights.view(weights.shape + (1,) * (tensors.dim() - 1))
    return (weighted * majority).sum(dim=0) / torch.clamp(majority.sum(dim=0), min=1.0)


def _linear(ts: list[torch.Tensor], w: torch.Tensor, o: _MaskOptions) -> torch.Tensor:
    return _weighted_sum(torch.stack(ts), w)


def _magnitude_prune(ts: list[torch.Tensor], w: torch.Tensor, o: _MaskOptions) -> torch.Tensor:
    assert o.density is not None
    return _weighted_sum(torch.stack([_magnitude_pruned(t, o.density) for t in ts]), w)


def _ties(ts: list[torch.Tensor], w: torch.Tensor, o: _MaskOptions) -> torch.Tensor:
    assert o.density is not None
    pruned = torch.stack([_magnitude_pruned(t, o.density) for t in ts])
    return _ties_merge(pruned, w, o.majority_sign)


def _dare_pruned(ts: list[torch.Tensor], o: _MaskOptions) -> torch.Tensor:
    assert o.density is not None
    density = o.density
    return torch.stack([_randomly_pruned(t, density, o.generators(j)) for j, t in enumerate(ts)])


def _dare_linear(ts: list[torch.Tensor], w: torch.Tensor, o: _MaskOptions) -> torch.Tensor:
    return _weighted_sum(_dare_pruned(ts, o), w)


def _dare_ties(ts: list[torch.Tensor], w: torch.Tensor, o: _MaskOptions) -> torch.Tensor:
    return _ties_merge(_dare_pruned(ts, o), w, o.majority_sign)


_MERGES: dict[str, Callable[[list[torch.Tensor], torch.Tensor, _MaskOptions], torch.Tensor]] = {
    "linear": _linear,
    "ties": _ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
    "magnitude_prune": _magnitude_prune,
}
