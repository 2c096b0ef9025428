"""target_parameters: LoRA on a module's parameters (nn.Parameter, fused 3-D MoE experts).

peft wraps each named parameter in a ParamWrapper whose delta ``s·B @ A`` is added to the
parameter itself; a fused expert parameter (E, out, in) (or, ``is_transposed``, (E, in, out)) gets
factors A (r·E, in) and B (out, r·E). Which parameter a saved group belongs to is decided by the
shapes first, then peft's registration order; the 3-D layout by :class:`LayoutRule.experts`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from loracc.arch import FUSED_EXPERTS, Layout
from loracc.errors import FormatError, UnsupportedError
from loracc.io import peft_keys
from loracc.io.layout import LayoutRule
from loracc.io.peft_config import LoraConfig, is_targeted, resolve_pattern
from loracc.ir import Site, SiteKind
from loracc.weights import BaseWeights, ExpertSplit

if TYPE_CHECKING:
    import torch

__all__ = ["ModuleTensors", "ParamShapes", "ParameterSites", "is_kasa"]

# The shape of a target parameter ("<module>.<param>") known without a base, or None.
ParamShapes = Callable[[str], "tuple[int, ...] | None"]


@dataclass
class ModuleTensors:
    """The saved tensors of one adapted module, as found in the file."""

    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    diag: torch.Tensor | None = None  # KaSA's singular values, between lora_A and lora_B
    embedding: bool = False
    keys: list[str] = field(default_factory=list)


def is_kasa(cfg: LoraConfig, g: ModuleTensors) -> bool:
    """Whether module ``g`` is KaSA: peft turns any non-null kasa_config, even {}, on."""
    return cfg["kasa_config"] is not None or g.diag is not None


class ParameterSites:
    """The sites of the modules that target_parameters names, for one adapter over one base."""

    def __init__(
        self,
        cfg: LoraConfig,
        base: BaseWeights | None,
        weights: Path,
        layout: LayoutRule,
        scale_for: Callable[[str, int], tuple[float, float]],
        param_shapes: ParamShapes | None = None,
    ) -> None:
        self.cfg, self.base, self.weights, self.layout = cfg, base, weights, layout
        self.scale_for = scale_for
        self.param_shapes = param_shapes

    def target_parameters(self, owner: str) -> list[str]:
        """Base keys of ``owner``'s parameters named by target_parameters, in config order."""
        names = self.cfg["target_parameters"] or []
        if not names:
            return []
        found = []
        candidates = (
            [*self.base.keys(), *self.base.expert_splits] if self.base is not None else None
        )
        for t in names:
            if candidates is None:  # a "."-suffix of "<owner>.<param>", as peft matches
                t_owner, _, param = t.rpartition(".")
                if t_owner and (owner == t_owner or owner.endswith("." + t_owner)):
                    found.append(f"{owner}.{param}")
                elif not t_owner and not is_targeted(owner, self.cfg):
                    found.append(f"{owner}.{param}")  # a bare name: any module's parameter
                continue
            found.extend(
                k
                for k in candidates
                if k.rsplit(".", 1)[0] == owner and (k == t or k.endswith("." + t))
            )
        return list(dict.fromkeys(found))

    def sites(
        self, owner: str, members: list[tuple[str, ModuleTensors]], params: list[str]
    ) -> list[Site]:
        # peft nests one wrapper per parameter in the module's parameter order: the first
        # registered is innermost (most .base_layer infixes). Neither the adapter nor a
        # checkpoint records that order, so shapes decide; where they cannot, only the
        # transformers fused-experts order (gate_up_proj before down_proj) is known.
        inner_first = sorted(members, key=lambda m: -m[0].count(peft_keys.BASE_LAYER))
        assigned = self._assign(owner, inner_first, params)
        pairs = zip(inner_first, assigned, strict=True)
        return [s for (_, g), param in pairs for s in self._parameter_site(owner, param, g)]

    def _assign(
        self, owner: str, inner_first: list[tuple[str, ModuleTensors]], params: list[str]
    ) -> list[str]:
        """The parameter of each member (innermost first), or a refusal."""
        fitting = []
        for raw, g in inner_first:
            assert g.A is not None and g.B is not None
            fits = [p for p in params if self._param_fits(p, g.A, g.B)]
            if not fits:
                raise FormatError(
                    f"{self.weights}: factors of '{raw}' ({tuple(g.A.shape)}, "
                    f"{tuple(g.B.shape)}) fit none of {params}"
                )
            fitting.append(fits)
        if len(params) == len(inner_first) and all(len(f) == 1 for f in fitting):
            chosen = [f[0] for f in fitting]
            if len(set(chosen)) == len(chosen):
                return chosen
        known = _fused_experts_order(params)
        if known is not None and len(known) == len(inner_first):
            gate_up, down = (g for _, g in inner_first)
            if all(p in f for p, f in zip(known, fitting, strict=True)) and _gate_up_then_down(
                gate_up, down
            ):
                return known
        leaves = [p.rsplit(".", 1)[1] for p in params]
        shapes = "pass --base" if self.base is None else "the base's shapes tie"
        raise UnsupportedError(
            f"{self.weights}: '{owner}': {len(inner_first)} factor groups for target_parameters "
            f"{leaves} and the factor shapes do not say which is which (peft nests them in the "
            f"module's parameter order, which the adapter does not record); {shapes}"
        )

    def _unbased_experts(self, name: str, g: ModuleTensors) -> tuple[int, str]:
        """The expert count of ``name`` without a base: peft builds a wrapper's factors with
        r·E rows, r resolved from the config as peft resolves it when it loads the adapter."""
        assert g.A is not None and g.B is not None
        r = int(
            resolve_pattern(
                self.cfg["rank_pattern"], name, self.cfg["r"], "rank_pattern", self.cfg.path
            )
        )
        rows = g.A.shape[0]
        if r <= 0 or rows % r or g.B.shape[1] != rows:
            raise FormatError(
                f"{self.weights}: '{name}': factors ({tuple(g.A.shape)}, {tuple(g.B.shape)}) do "
                f"not split into r={r} per expert, so the expert count is unknown; pass --base"
            )
        experts = rows // r
        if experts == 1 and name.rsplit(".", 1)[1] not in FUSED_EXPERTS:
            return 0, f"target_parameters: no base; r={r} rows, a 2-D parameter"
        return experts, f"target_parameters: no base; {experts} experts of r={r}, layout unknown"

    def _param_shape(self, param: str) -> tuple[int, ...] | None:
        return self.base.shape(param) if self.base is not None else None

    def _param_fits(self, param: str, A: torch.Tensor, B: torch.Tensor) -> bool:
        shape = self._param_shape(param)
        if shape is None and self.param_shapes is not None:
            shape = self.param_shapes(param)  # tells the factors apart only (the layout: later)
        return shape is None or bool(_param_readings(shape, A, B))

    def _parameter_site(self, owner: str, param: str, g: ModuleTensors) -> list[Site]:
        assert g.A is not None and g.B is not None
        shape = self._param_shape(param)
        name = f"{owner}.{param.rsplit('.', 1)[1]}"
        experts, transposed, source = 0, False, "target_parameters: no base"
        if shape is None and self.param_shapes is None:
            experts, source = self._unbased_experts(name, g)
        elif shape is not None and len(shape) == 3:
            experts = shape[0]
            decision = self.layout.experts(name, shape, g.A.shape[1], g.B.shape[0])
            transposed, source = decision.layout is Layout.EXPERTS_IN_OUT, decision.source
        elif shape is not None:
            source = "target_parameters: a 2-D parameter is (out, in)"
        rank = g.A.shape[0] // experts if experts else g.A.shape[0]
        alpha, scale = self.scale_for(name, rank)
        if g.magnitude is not None or g.bias is not None or is_kasa(self.cfg, g):
            raise UnsupportedError(
                f"{self.weights}: '{name}': DoRA, lora_bias or KaSA on target_parameters (peft "
                "has none)"
            )
        site = Site(
            module=name,
            target=param,
            kind=SiteKind.PARAMETER,
            lora_A=g.A,
            lora_B=g.B,
            alpha=alpha,
            scale=scale,
            use_rslora=bool(self.cfg["use_rslora"]),
            init=self.cfg.init,
            experts=experts,
            transposed=transposed,
            layout_source=source,
        )
        split = self.base.expert_splits.get(param) if self.base is not None else None
        return [site] if split is None else _split_experts(site, split, self.base)


def _split_experts(site: Site, split: ExpertSplit, base: BaseWeights | None) -> list[Site]:
    """One LINEAR site per stored per-expert tensor of a fused expert parameter.

    Expert e's delta is ``s·B3[e] @ A3[e]`` (peft's ParamWrapper split: A expert-major, B with
    the expert index fastest); its rows are cut at the stored tensors' boundaries.
    """
    assert base is not None
    if site.transposed:
        raise UnsupportedError(
            f"{site.module}: a transposed fused expert parameter stored per expert is not supported"
        )
    E, r = site.experts, site.rank
    A3 = site.lora_A.reshape(E, r, site.lora_A.shape[1])
    B3 = site.lora_B.reshape(site.lora_B.shape[0], r, E).permute(2, 0, 1)
    out = []
    for e, keys in enumerate(split.keys):
        row = 0
        for key in keys:
            shape = base.shape(key)
            assert shape is not None  # a stored per-expert tensor
            rows = shape[0]
            out.append(
                replace(
                    site,
                    module=key.removesuffix(".weight"),
                    target=key,
                    kind=SiteKind.LINEAR,
                    lora_A=A3[e].contiguous(),
                    lora_B=B3[e, row : row + rows].contiguous(),
                    experts=0,
                )
            )
            row += rows
    return out


def _param_readings(shape: tuple[int, ...], A: torch.Tensor, B: torch.Tensor) -> list[bool]:
    """The readings (transposed or not) under which factors A (r·E, in), B (out, r·E) fit
    parameter ``shape``: a 2-D parameter is (out, in); a 3-D one (E, out, in) or, transposed,
    (E, in, out) (:meth:`LayoutRule.experts` decides between them)."""
    if len(shape) == 2:
        return [False] if (B.shape[0], A.shape[1]) == shape else []
    if len(shape) != 3 or A.shape[0] % shape[0]:
        return []
    _, d1, d2 = shape
    return [t for t in (False, True) if (A.shape[1], B.shape[0]) == ((d1, d2) if t else (d2, d1))]


def _fused_experts_order(params: list[str]) -> list[str] | None:
    """``params`` in the order transformers' fused experts modules register them (gate_up_proj,
    then down_proj), when they are exactly those two, else None."""
    by_leaf = {p.rsplit(".", 1)[1]: p for p in params}
    if len(by_leaf) != len(params) or set(by_leaf) != set(FUSED_EXPERTS):
        return None
    return [by_leaf[leaf] for leaf in FUSED_EXPERTS]


def _gate_up_then_down(gate_up: ModuleTensors, down: ModuleTensors) -> bool:
    """Whether the factors read as a fused gate/up projection (hidden -> 2·inter) followed by
    the down projection (inter -> hidden): the check that the fused-experts order applies."""
    assert gate_up.A is not None and gate_up.B is not None
    assert down.A is not None and down.B is not None
    hidden, gate_up_out = gate_up.A.shape[1], gate_up.B.shape[0]
    return down.B.shape[0] == hidden and gate_up_out == 2 * down.A.shape[1]
