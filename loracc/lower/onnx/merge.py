"""Merged ONNX lowering: edit the bound initializers, leave every other tensor as it was.

Identity: for each bound initializer ``W`` (read in its own orientation) the output holds
``round(edits(fp32(W)))`` with the edits applied in the order peft's forward composes them, the
same order (:class:`loracc.kernels.Step`), steps (:mod:`loracc.kernels`) and single rounding as
the checkpoint merge (:mod:`loracc.lower.merge`):

1. a whole replacement (modules_to_save, a trained bias, a replaced embedding),
2. trainable-token rows (``W[idx] = rows``),
3. each site's ``ΔW = s·B@A`` (fp32, matmul first, as peft), then its DoRA channel scale
   ``W ← c ⊙ (W+ΔW)`` (``c = m/‖W+ΔW‖``, computed by the fold-dora pass, which always runs
   before this lowering), on the site's rows of a fused weight only,
4. ``lora_bias``: ``b += s·b_B``.

A stack of adapters (:mod:`loracc.lower.stack`, each compiled against the model the ones before
it made) lists each adapter's edits after the previous adapter's, in the order above within
each, and still rounds once.

Every edit is written in its own orientation (the site's logical orientation, or the Hugging
Face stored one) and applied through a transposed view when the initializer is stored the other
way round; a delta is applied to the site's stored view of it (:meth:`loracc.ir.Site.to_stored`).
Nodes that read one initializer but need different edits get their own copies
(:func:`~loracc.lower.onnx.surgery.privatize`); a reader no edit concerns keeps the original.

A quantized weight (``MatMulNBits``) is dequantized to fp32, edited the same way, and
requantized with the node's own scheme by onnxruntime's quantizer, its scales and zero points
rewritten with it (:func:`loracc.lower.onnx.quant.requantized`); ``MatMulInteger`` and QDQ
(``DequantizeLinear``) weights are refused.

Edited tensors are :class:`onnx_ir.LazyTensor` objects: nothing is read or computed until the
model is written, one tensor at a time. NaN or Inf is refused in the tensor *as written*, after
rounding to the initializer's dtype (a finite fp32 value that overflows fp16 is caught too).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import onnx_ir as ir
import torch

from loracc import kernels
from loracc.errors import NonFiniteError, UnsupportedError
from loracc.io.onnx_model import tensor_dims, tensor_to_torch, torch_dtype, torch_to_tensor
from loracc.ir import Adapter, Site, TokenRows
from loracc.lower.onnx.bind import BindingTable, with_tied
from loracc.lower.onnx.index import GraphIndex, Place
from loracc.lower.onnx.quant import QuantScheme, requantized
from loracc.lower.onnx.surgery import privatize

__all__ = ["Edit", "EditPlan", "apply_edits", "merge_edits"]


@dataclass(eq=False)
class Edit:
    """One change to one initializer, applied in (``stage``, :class:`~loracc.kernels.Step`)
    order: ``stage`` is the adapter's place in a stack."""

    rank: kernels.Step
    transposed: bool
    apply: Callable[[torch.Tensor], torch.Tensor]
    label: str
    stage: int = 0


@dataclass
class EditPlan:
    """Edits per (initializer, reader node), in apply order; ``inits`` maps ids back;
    ``schemes``: the quantization of quantized initializers."""

    inits: dict[int, ir.Value] = field(default_factory=dict)
    edits: dict[tuple[int, ir.Node], list[Edit]] = field(default_factory=lambda: defaultdict(list))
    schemes: dict[int, QuantScheme] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.edits)


@dataclass
class _Target:
    init: ir.Value
    nodes: set[ir.Node] = field(default_factory=set)


def _view(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return w.mT if transposed else w  # 3-D experts: the last two axes


def _replace(tensor: torch.Tensor, transposed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(w: torch.Tensor) -> torch.Tensor:
        _view(w, transposed).copy_(tensor.to(torch.float32))
        return w

    return run


def _check_fits(place: Place, key: str, shape: tuple[int, ...]) -> None:
    """Refuse, while planning (so ``--dry-run`` refuses too), a replacement of ``key`` whose
    shape is not the initializer's as the edit sees it."""
    held = tensor_dims(place.init.const_value.shape)  # type: ignore[union-attr]
    seen = held[::-1] if place.transposed else held
    if seen != shape:
        how = f", read transposed from {list(held)}" if place.transposed else ""
        raise UnsupportedError(
            f"{key}: the adapter's replacement is {list(shape)} and the ONNX weight "
            f"'{place.init.name}' is {list(seen)}{how}: a resized tensor needs a re-export"
        )


def _rows(rows: TokenRows, transposed: bool) -> Callable:
    def run(w: torch.Tensor) -> torch.Tensor:
        kernels.put_rows(_view(w, transposed), rows)
        return w

    return run


def _delta(site: Site, transposed: bool, block: tuple[int, int] | None) -> Callable:
    assert site.magnitude is None, f"{site.module}: DoRA magnitude not folded (fold-dora)"

    def run(w: torch.Tensor) -> torch.Tensor:
        view = _view(w, transposed)  # the site's logical orientation
        if block is not None:
            view = view[block[0] : block[1]]
        kernels.add_site(site.to_stored(view), site)
        return w

    return run


def _bias(site: Site) -> Callable:
    def run(w: torch.Tensor) -> torch.Tensor:
        w += kernels.bias_delta(site)
        return w

    return run


def merge_edits(
    index: GraphIndex,
    table: BindingTable,
    adapters: Adapter | Sequence[Adapter],
    *,
    lora: bool = True,
) -> EditPlan:
    """Every (initializer, reader) pair the adapters edit, with the edits in apply order
    (several adapters: a stack, each adapter's edits after the previous one's).

    With ``lora=False`` only whole-tensor edits (replacements, token rows) are listed: what the
    keep-lora lowering bakes into the base.
    """
    plan = EditPlan()
    stack = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    for stage, adapter in enumerate(stack):
        _plan_adapter(index, table, adapter, plan, stage, lora=lora)
    for node_edits in plan.edits.values():
        node_edits.sort(key=lambda e: (e.stage, e.rank))  # stable: adapter order within a rank
    return plan


def _plan_adapter(
    index: GraphIndex, table: BindingTable, adapter: Adapter, plan: EditPlan, stage: int, *,
    lora: bool,
) -> None:  # fmt: skip
    """Add the edits of ``adapter``, the ``stage``-th of a stack, to ``plan``."""

    def add(place: Place, edit: Edit) -> None:
        plan.inits[id(place.init)] = place.init
        edit.stage = stage
        for node in place.nodes:
            plan.edits[(id(place.init), node)].append(edit)

    for r in adapter.replacements:
        tb = table.tensors[r.target]
        if r.origin == "embedding":
            tb = with_tied(index, tb)
        for place in tb.places:
            _check_fits(place, r.target, tuple(r.tensor.shape))
            whole = _replace(r.tensor, place.transposed)
            add(place, Edit(kernels.Step.REPLACE, place.transposed, whole, r.target))
    for t in adapter.token_rows:
        tb = with_tied(index, table.tensors[t.target])
        for place in tb.places:
            rows = _rows(t, place.transposed)
            add(place, Edit(kernels.Step.ROWS, place.transposed, rows, t.target))
    if lora:
        for site in adapter.sites:
            b = table.sites[site.module]
            for use in b.uses:
                if use.quant is not None:
                    if use.quant.refusal is not None:
                        raise UnsupportedError(f"{site.module}: {use.quant.refusal}")
                    plan.schemes[id(use.init)] = use.quant
            for place in b.places():
                add(
                    place,
                    Edit(
                        kernels.Step.DELTA,
                        place.transposed,
                        _delta(site, place.transposed, b.block),
                        site.module,
                    ),
                )
            if site.lora_bias is not None:
                for place in b.bias:
                    bias = Edit(kernels.Step.BIAS, False, _bias(site), f"{site.module} lora_bias")
                    add(place, bias)


def apply_edits(
    index: GraphIndex,
    plan: EditPlan,
    *,
    allow_nonfinite: bool = False,
    suffix: str = "merged",
) -> list[str]:
    """Attach lazily computed edited tensors; split initializers whose readers differ.

    Returns the names of the initializers that now hold edited values.
    """
    groups: dict[int, dict[tuple[int, ...], _Target]] = defaultdict(dict)
    lists: dict[tuple[int, ...], list[Edit]] = {}
    for (init_id, node), node_edits in plan.edits.items():
        key = tuple(id(e) for e in node_edits)
        lists[key] = node_edits
        target = groups[init_id].setdefault(key, _Target(plan.inits[init_id]))
        target.nodes.add(node)
    changed = []
    for init_id, by_edits in groups.items():
        original = plan.inits[init_id]
        source = original.const_value
        assert source is not None
        scheme = plan.schemes.get(init_id)
        if scheme is not None:
            if len(by_edits) > 1:
                raise UnsupportedError(
                    f"quantized weight '{original.name}' is read by nodes that need different "
                    "edits; it cannot be requantized for each"
                )
            (node_edits,) = [lists[key] for key in by_edits]
            name = original.name or ""
            requantized(
                scheme, source, partial(_edited, edits=node_edits, name=name, allow_nonfinite=None)
            )
            changed.append(name)
            continue
        for n, (key, target) in enumerate(by_edits.items()):
            value = privatize(index, original, target.nodes, f"{suffix}{n}" if n else suffix)
            value.const_value = _lazy(source, lists[key], value.name or "", allow_nonfinite)
            changed.append(value.name or "")
    return changed


def _lazy(
    source: ir.TensorProtocol, edits: list[Edit], name: str, allow_nonfinite: bool
) -> ir.LazyTensor:
    dtype = source.dtype

    def compute() -> ir.TensorProtocol:
        w = tensor_to_torch(source, torch.float64 if dtype == ir.DataType.DOUBLE else torch.float32)
        w = _edited(w, edits, name, allow_nonfinite, dtype)
        return torch_to_tensor(w, dtype, name=name)

    return ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(tensor_dims(source.shape)), name=name)


def _edited(
    w: torch.Tensor,
    edits: list[Edit],
    name: str,
    allow_nonfinite: bool | None,
    dtype: ir.DataType = ir.DataType.FLOAT,
) -> torch.Tensor:
    """``w`` after ``edits``, rounded once to ``dtype``, NaN or Inf refused as written unless
    ``allow_nonfinite``; None: a weight to requantize, which cannot hold them."""
    for edit in edits:
        w = edit.apply(w)
    w = w.to(torch_dtype(dtype))  # the one rounding; checked as written
    if not allow_nonfinite and not kernels.all_finite(w):
        labels = ", ".join(dict.fromkeys(e.label for e in edits))
        how = (
            "a quantized weight cannot hold them"
            if allow_nonfinite is None
            else "use --allow-nonfinite to write it anyway"
        )
        raise NonFiniteError(
            f"edited initializer '{name}' ({labels}) has NaN or Inf as {dtype.name} ({how})"
        )
    return w
