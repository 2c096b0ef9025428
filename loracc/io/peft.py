"""Read a PEFT LoRA adapter folder into the adapter IR.

The saved keys are the ground truth for what was adapted; the config supplies alpha, rsLoRA and
flags. Ranks come from tensor shapes (rank_pattern precedence is unreliable after a peft
save/load round trip). With a base checkpoint the reader also decides each site's layout
(:mod:`loracc.io.layout`: ``--layout``, the architecture table, the shape, ``fan_in_fan_out`` only
for a base without a model_type, else a refusal), checks every shape, and resolves tied output
embeddings.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, NoReturn, cast

from loracc.arch import Layout
from loracc.errors import ConfigError, FormatError, InputError, NonFiniteError, UnsupportedError
from loracc.io import peft_keys
from loracc.io.checkpoint import Checkpoint, inside, open_safetensors
from loracc.io.layout import LayoutRule, parse_layouts
from loracc.io.peft_config import (
    KNOWN_PEFT,
    LoraConfig,
    is_targeted,
    pattern_overlap_notes,
    read_config,
    resolve_pattern,
)
from loracc.io.peft_keys import CONFIG_NAME, KEY, PICKLE_NAME, WEIGHTS_NAME
from loracc.io.peft_params import ModuleTensors, ParameterSites, ParamShapes, is_kasa
from loracc.io.replicated import ReplicatedCheckpoint
from loracc.io.safetensors import TensorInfo, all_finite, read_tensor
from loracc.ir import PLAIN_INITS, Adapter, Replacement, Site, SiteKind, TokenRows
from loracc.weights import BaseWeights

if TYPE_CHECKING:  # torch loads with the values; a header-only read needs none
    import torch

__all__ = ["HeaderTensor", "adapter_files", "read_peft_adapter"]

# peft's MultiheadAttention wrapper saves its out_proj's factors under this suffix of its own path
_MHA_OUT_PROJ = f"{peft_keys.BASE_LAYER}.out_proj"


class HeaderTensor:
    """A saved tensor known from the file's header only: the part of ``torch.Tensor`` the reader
    asks about (shape, dimensions, element count, dtype). The reader is the same code with
    values or without; where it needs values (BD-LoRA's block diagonal, KaSA's product) it
    calls :func:`values`, which reads this tensor with torch. Only ``inspect`` without a base
    reads an adapter this way."""

    __slots__ = ("info", "shape")

    def __init__(self, info: TensorInfo) -> None:
        self.info = info
        self.shape = info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype_text

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.info.numel

    def is_floating_point(self) -> bool:
        return self.info.is_floating_point


def values(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a torch tensor: read now if only its header was."""
    stand_in: object = t
    return read_tensor(stand_in.info) if isinstance(stand_in, HeaderTensor) else t


def _finite(t: torch.Tensor) -> bool:
    stand_in: object = t
    if isinstance(stand_in, HeaderTensor):
        return all_finite(stand_in.info)
    from loracc import kernels  # imports torch, which t already needed

    return kernels.all_finite(t)


def adapter_files(folder: Path) -> tuple[Path, Path]:
    """(config, weights) paths of an adapter folder, refusing pickles with a way out."""
    if not folder.is_dir():
        raise InputError(f"{folder}: adapter folder not found")
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config.exists():
        raise InputError(f"{folder}: no {CONFIG_NAME}")
    if not weights.exists():
        if (folder / PICKLE_NAME).exists():
            raise InputError(
                f"{folder}: only {PICKLE_NAME} (a pickle) is present; loracc never "
                "unpickles. Convert it on a trusted machine: "
                f"safetensors.torch.save_file(torch.load('{PICKLE_NAME}'), "
                f"'{WEIGHTS_NAME}', metadata={{'format': 'pt'}})"
            )
        raise InputError(f"{folder}: no {WEIGHTS_NAME}")
    return inside(folder, CONFIG_NAME, str(folder)), inside(folder, WEIGHTS_NAME, str(folder))


def read_peft_adapter(
    folder: str | os.PathLike[str],
    base: Checkpoint | None = None,
    *,
    initial: str | os.PathLike[str] | None = None,
    allow_nonfinite: bool = False,
    layout: Iterable[str] | Mapping[str, str] | None = None,
    allow_large_replication: bool = False,
    param_shapes: ParamShapes | None = None,
    header_only: bool = False,
) -> Adapter:
    """Read a PEFT LoRA adapter folder into an :class:`Adapter`.

    Args:
        folder: the adapter folder (adapter_config.json + adapter_model.safetensors).
        base: the base checkpoint; without it, layer kinds and targets are taken from names.
        initial: the adapter saved before training, for inits that cannot be recomputed.
        allow_nonfinite: accept NaN or Inf in the adapter's tensors.
        layout: ``--layout`` choices, ``"MODULE_PATTERN=LAYOUT"`` strings or a mapping, for
            sites whose layout nothing else decides (docs/FORMATS.md "Layer layouts").
        allow_large_replication: accept a layer_replication of more than 4x the base's layers.
        param_shapes: without ``base``, the shapes of target parameters known elsewhere (an
            ONNX graph's expert weights), used only to tell which saved factors belong to
            which of several target parameters on one module.
        header_only: read the header, not the values, without a base or ``initial``: the sites
            hold :class:`HeaderTensor` factors (shapes, dtypes), the decisions are the same, and
            torch is not imported unless a site needs values (BD-LoRA, KaSA). The values are
            still checked for NaN and Inf (on their bits).
    """
    if header_only and (base is not None or initial is not None):
        raise ValueError("header_only reads an adapter without a base or initial adapter")
    config_path, weights_path = adapter_files(Path(folder))
    cfg = read_config(config_path)
    file = open_safetensors(weights_path)
    # Typed as tensors: a stand-in answers what the reader asks before it calls values(), and a
    # value operation on one fails loudly (AttributeError), never silently.
    tensors = (
        {k: cast("torch.Tensor", HeaderTensor(file.tensors[k])) for k in file.keys()}  # noqa: SIM118 (file order)
        if header_only
        else file.read_all()
    )
    _check_tensors(weights_path, tensors, allow_nonfinite)
    reader = _Reader(
        Path(folder), weights_path, cfg, base, layout, allow_large_replication, param_shapes
    )
    adapter = reader.build(tensors)
    if base is not None:
        _check_base_dtypes(adapter, base)
    if initial is not None:
        init = read_peft_adapter(initial, base, allow_nonfinite=allow_nonfinite, layout=layout)
        adapter = _attach_initial(adapter, init)
    return adapter


def _check_tensors(weights: Path, tensors: dict[str, torch.Tensor], allow_nonfinite: bool) -> None:
    """LoRA tensors are floating point, and no tensor holds NaN or Inf unless allowed."""
    for key, t in tensors.items():
        m = KEY.match(peft_keys.unprefixed(key))
        if m is not None and m["extra"]:
            continue  # training-only, never applied
        if m is not None and not t.is_floating_point():
            raise FormatError(
                f"{weights}: '{key}' has dtype {str(t.dtype).removeprefix('torch.')}; LoRA "
                "tensors need a floating-point dtype"
            )
        if not allow_nonfinite and not _finite(t):
            raise NonFiniteError(
                f"{weights}: '{key}' has NaN or Inf (use --allow-nonfinite to merge it anyway)"
            )


def _check_base_dtypes(adapter: Adapter, base: Checkpoint) -> None:
    """A low-rank delta can only be added to a floating-point base tensor."""
    for site in adapter.sites:
        stored = base.resolve(site.target)
        dtype = base.infos[stored].dtype if stored is not None else None
        if dtype is not None and not dtype.is_floating_point:
            raise UnsupportedError(
                f"{site.module}: base tensor '{stored}' is {str(dtype).removeprefix('torch.')}, "
                "not floating point (a quantized checkpoint?); a LoRA delta cannot be merged "
                "into it"
            )


def _attach_initial(adapter: Adapter, init: Adapter) -> Adapter:
    by_module = {s.module: s for s in init.sites}
    sites = []
    for site in adapter.sites:
        start = by_module.get(site.module)
        if start is None:
            raise InputError(f"initial adapter {init.name}: no factors for module '{site.module}'")
        if start.lora_A.shape != site.lora_A.shape or start.lora_B.shape != site.lora_B.shape:
            raise FormatError(
                f"initial adapter {init.name}: module '{site.module}' has factors "
                f"{tuple(start.lora_A.shape)}/{tuple(start.lora_B.shape)}, the trained adapter "
                f"{tuple(site.lora_A.shape)}/{tuple(site.lora_B.shape)}"
            )
        sites.append(replace(site, initial=(start.lora_A, start.lora_B)))
    return replace(adapter, sites=tuple(sites))


class _Reader:
    def __init__(
        self,
        folder: Path,
        weights: Path,
        cfg: LoraConfig,
        base: BaseWeights | None,
        layout: Iterable[str] | Mapping[str, str] | None = None,
        allow_large_replication: bool = False,
        param_shapes: ParamShapes | None = None,
    ):
        if base is not None and cfg["layer_replication"]:  # keys use the expanded layer indices
            try:
                base = ReplicatedCheckpoint(
                    base, cfg["layer_replication"], allow_large=allow_large_replication
                )
            except ConfigError as e:  # the layout does not know which file it came from
                raise ConfigError(f"{cfg.path}: {e}") from e
        self.folder, self.weights, self.cfg, self.base = folder, weights, cfg, base
        self.notes: list[str] = []
        self.replaced: dict[str, tuple[int, ...]] = {}  # target -> shape of a whole replacement
        self.out_dims: set[int] = set()  # lora_B out-dims of every module (QALoRA check)
        self.refusals: list[str] = list(cfg.refusals)
        self.notes += [
            f"{cfg.path.name}: unknown field '{k}' ignored (not a peft "
            f"<= {'.'.join(map(str, KNOWN_PEFT))} LoraConfig field)"
            for k in cfg.unknown
        ]
        flag = cfg.fields.get("fan_in_fan_out")
        self.layout = LayoutRule(
            base.config if base is not None else {},
            flag if isinstance(flag, bool) else None,
            parse_layouts(layout),
            str(folder),
        )
        self.params = ParameterSites(cfg, base, weights, self.layout, self.scale_for, param_shapes)

    def where(self, key: str) -> str:
        return f"{self.weights}: '{key}'"

    def build(self, tensors: dict[str, torch.Tensor]) -> Adapter:
        groups: dict[str, ModuleTensors] = defaultdict(ModuleTensors)
        replacements: list[Replacement] = []
        tokens: list[tuple[str, str, torch.Tensor]] = []
        replaced_by: dict[str, str] = {}  # replaced target -> the key that replaces it
        for raw_key, tensor in tensors.items():
            key = peft_keys.unprefixed(raw_key)
            m = KEY.match(key)
            if m is None:
                if ".lora_" in key:
                    raise UnsupportedError(
                        f"{self.where(raw_key)}: unknown LoRA tensor; loracc refuses rather than "
                        "drop it"
                    )
                replacement = self.replacement(raw_key, key, tensor)
                if replacement.target in replaced_by:
                    raise FormatError(
                        f"{self.weights}: '{replaced_by[replacement.target]}' and '{raw_key}' "
                        f"both replace '{replacement.target}'; which one was trained cannot be "
                        "known from the file"
                    )
                replaced_by[replacement.target] = raw_key
                replacements.append(replacement)
                continue
            module = m["module"]
            if m["extra"]:
                self.notes.append(f"{raw_key}: training-only tensor ignored")
            elif m["tok"]:
                tokens.append((raw_key, module, tensor))
            else:
                g = groups[module]
                g.keys.append(raw_key)
                if m["ab"] or m["emb"]:
                    setattr(g, m["ab"] or m["emb"], tensor)
                    g.embedding = g.embedding or bool(m["emb"])
                elif m["bias"]:
                    g.bias = tensor
                elif m["diag"]:
                    g.diag = tensor
                else:
                    g.magnitude = tensor
        # A resized embedding (or head) saved whole gives its target's new shape.
        self.replaced = {r.target: tuple(r.tensor.shape) for r in replacements}
        token_rows = [self.tokens(*t) for t in tokens]
        sites = self.sites(groups)
        self.layout.finish()
        self.cross_check(sites)
        layer_replication = tuple(tuple(p) for p in self.cfg["layer_replication"] or [])
        return Adapter(
            name=str(self.folder),
            sites=sites,
            replacements=tuple(replacements),
            token_rows=tuple(token_rows),
            layer_replication=layer_replication,
            refusals=tuple(self.refusals),
            notes=tuple(self.notes),
            config=MappingProxyType(dict(self.cfg.fields)),
        )

    # -- whole-tensor replacements and trainable tokens -------------------------------------

    def replacement(self, raw_key: str, key: str, tensor: torch.Tensor) -> Replacement:
        target = peft_keys.unwrap(key)
        origin = "modules_to_save"
        if target.endswith(".bias") and self.cfg["bias"] != "none":
            origin = "bias"
        if self.base is not None:
            shape = self.base.shape(target)
            if shape is None:
                raise FormatError(
                    f"{self.where(raw_key)}: replaces '{target}', which the base does not have"
                )
            target = self.base.resolve(target) or target
            if tuple(tensor.shape) != shape:
                if tensor.dim() == 2 and len(shape) == 2 and tensor.shape[1] == shape[1]:
                    origin = "embedding"  # vocabulary resized during training
                else:
                    raise FormatError(
                        f"{self.where(raw_key)}: shape {tuple(tensor.shape)}, base '{target}' "
                        f"is {shape}"
                    )
        return Replacement(target, tensor, origin)

    def tokens(self, raw_key: str, module: str, rows: torch.Tensor) -> TokenRows:
        module = module.replace(peft_keys.BASE_LAYER, "")
        spec = self.cfg["trainable_token_indices"]
        if isinstance(spec, dict):
            matches = [v for k, v in spec.items() if module.endswith(k)]
            indices = matches[0] if matches else None
        else:
            indices = spec
        if not indices:
            raise FormatError(
                f"{self.where(raw_key)}: trainable_token_indices names no indices for '{module}'"
            )
        if len(set(indices)) != len(indices):
            raise FormatError(f"{self.cfg.path}: trainable_token_indices repeats an index")
        if rows.dim() != 2 or rows.shape[0] != len(indices):
            raise FormatError(
                f"{self.where(raw_key)}: shape {tuple(rows.shape)}, expected "
                f"({len(indices)}, dim) for {len(indices)} indices"
            )
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise FormatError(f"{self.cfg.path}: trainable_token_indices must be integers")
        if min(indices) < 0:
            raise FormatError(
                f"{self.cfg.path}: trainable_token_indices has the negative index "
                f"{min(indices)} for '{module}'"
            )
        target = f"{module}.weight"
        if self.base is not None:
            shape = self._shape(target)
            if shape is None or shape[1] != rows.shape[1] or max(indices) >= shape[0]:
                raise FormatError(
                    f"{self.where(raw_key)}: rows {tuple(rows.shape)} at trainable_token_indices "
                    f"up to {max(indices)} do not fit base '{target}' {shape}"
                )
            target = self.base.resolve(target) or target
        return TokenRows(target, tuple(indices), rows)

    # -- low-rank sites -----------------------------------------------------------------------

    def sites(self, groups: dict[str, ModuleTensors]) -> tuple[Site, ...]:
        by_owner: dict[str, list[tuple[str, ModuleTensors]]] = defaultdict(list)
        for raw, g in groups.items():
            if g.A is None or g.B is None:
                present = ", ".join(g.keys)
                raise FormatError(
                    f"{self.weights}: module '{raw}' has {present} but not both factors"
                )
            attention = raw.removesuffix(_MHA_OUT_PROJ)
            if attention != raw and attention in groups:  # peft's MultiheadAttention wrapper
                self._refuse_mha(groups[attention].keys[0], attention)
            by_owner[raw.replace(peft_keys.BASE_LAYER, "")].append((raw, g))
        self.out_dims = {g.B.shape[0] for g in groups.values() if g.B is not None and g.B.dim()}
        sites: list[Site] = []
        for owner, members in by_owner.items():
            params = self.params.target_parameters(owner)
            if params:
                sites.extend(self.params.sites(owner, members, params))
            elif len(members) > 1:
                raise FormatError(f"{self.weights}: module '{owner}' is adapted twice")
            else:
                sites.append(self.module_site(owner, members[0][1]))
        return tuple(sites)

    def _shape(self, target: str) -> tuple[int, ...] | None:
        """The base shape of ``target``, or the shape of the adapter's whole replacement of it."""
        assert self.base is not None
        shape = self.base.shape(target)
        stored = self.base.resolve(target) or target
        return self.replaced.get(stored, shape) if shape is not None else None

    def scale_for(self, name: str, rank: int, full_rank: int | None = None) -> tuple[float, float]:
        """(alpha, scale) of module ``name`` whose factors have ``rank`` rows.

        ``full_rank`` is min(out, in) of a 2-D weight: an SVD/QR init (pissa, olora, ...) with
        the config's r above it keeps only that many components, and peft still scales by the
        config's r, which it set before the init cut the factors.
        """
        if rank <= 0:  # peft refuses r <= 0 when it builds the layer
            raise FormatError(f"{self.weights}: '{name}': the LoRA factors have rank 0")
        patterns = self.cfg["alpha_pattern"]
        default = self.cfg["lora_alpha"]
        alpha = float(resolve_pattern(patterns, name, default, "alpha_pattern", self.cfg.path))
        self.notes += pattern_overlap_notes(self.cfg, name, rank)
        scale_rank = rank
        if full_rank == rank and self.cfg.init not in PLAIN_INITS:
            r = int(
                resolve_pattern(
                    self.cfg["rank_pattern"], name, self.cfg["r"], "rank_pattern", self.cfg.path
                )
            )
            if r > rank:
                scale_rank = r
                self.notes.append(
                    f"{name}: init_lora_weights='{self.cfg.init}' kept {rank} components (the "
                    f"weight's full rank) of r={r}; scaled by alpha/{r} as peft does"
                )
        scale = alpha / math.sqrt(scale_rank) if self.cfg["use_rslora"] else alpha / scale_rank
        return alpha, scale

    def module_site(self, module: str, g: ModuleTensors) -> Site:
        assert g.A is not None and g.B is not None
        A, B = g.A, g.B
        key = g.keys[0]
        if g.embedding:
            kind, source = SiteKind.EMBEDDING, "lora_embedding factors"
        elif A.dim() > 2:
            kind, source = SiteKind.CONV, "convolution factors"
        else:
            kind, source = SiteKind.LINEAR, ""
        A, B = self.expand_block_diagonal(module, A, B)
        rank = A.shape[0]
        # peft gives lora_B the base's groups: (out, r/groups, 1, ...)
        grouped = kind is SiteKind.CONV and B.dim() == A.dim() and 0 < B.shape[1] < rank
        if grouped and rank % B.shape[1] == 0:
            self._refuse_grouped(key, rank // B.shape[1])
        if A.dim() < 2 or B.dim() != A.dim() or B.shape[1] != rank:
            raise FormatError(
                f"{self.where(key)}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not "
                "compose (B must be (out, r) for A (r, in))"
            )
        target = f"{module}.weight"
        expected = kind.logical_shape(A, B)
        if self.cfg["use_qalora"] and kind is SiteKind.LINEAR:
            self._check_qalora(module, key, A, B)
        if self.base is not None:
            shape = self._shape(target)
            if shape is None:
                if f"{module}.in_proj_weight" in self.base:
                    self._refuse_mha(key, module)
                raise FormatError(f"{self.where(key)}: the base has no tensor '{target}'")
            if kind is SiteKind.LINEAR and len(shape) == 2:
                decision = self.layout.weight(module, shape, (expected[0], expected[1]))
                kind, source = _KINDS[decision.layout], decision.source
            expected = kind.stored_shape(expected)
            if kind is SiteKind.CONV and tuple(shape[2:]) != tuple(A.shape[2:]):
                raise FormatError(f"{self.where(key)}: kernel {tuple(A.shape[2:])}, base {shape}")
            grouped = kind is SiteKind.CONV and 0 < shape[1] < A.shape[1]
            if grouped and A.shape[1] % shape[1] == 0:  # the base is (out, in/groups, *k)
                self._refuse_grouped(key, A.shape[1] // shape[1])
            if tuple(shape[:2]) != expected[:2]:
                raise FormatError(
                    f"{self.where(key)}: factors give {expected[:2]}, base '{target}' is {shape}"
                )
            target = self.base.resolve(target) or target
        elif kind is SiteKind.LINEAR:
            decision = self.layout.unbased(module)
            kind, source = _KINDS[decision.layout], decision.source
            expected = kind.stored_shape(expected)
        if self.cfg["use_qalora"] and kind is SiteKind.LINEAR:
            self.notes.append(f"{module}: use_qalora ignored on a dense layer, as peft does")
        full_rank = min(expected[:2]) if len(expected) == 2 else None
        alpha, scale = self.scale_for(module, rank, full_rank)
        init = self.cfg.init
        if is_kasa(self.cfg, g):
            B, init = self._kasa(module, key, kind, g.diag, A, B), "kasa"
        bias_target = None
        if g.bias is not None:
            bias_target = f"{module}.bias"
            if self.base is not None:
                stored = self.base.resolve(bias_target)
                if stored is None:
                    raise UnsupportedError(
                        f"{self.where(key)}: lora_bias on '{module}', whose base layer has no "
                        "bias (peft raises at merge too)"
                    )
                bias_target = stored
        magnitude = g.magnitude
        if magnitude is not None:
            want = expected[kind.stored_axis(kind.channel_axis)]
            if magnitude.numel() != want:
                raise FormatError(
                    f"{self.where(key)}: DoRA magnitude has {magnitude.numel()} values, "
                    f"expected {want}"
                )
        return Site(
            module=module,
            target=target,
            kind=kind,
            lora_A=A,
            lora_B=B,
            alpha=alpha,
            scale=scale,
            use_rslora=bool(self.cfg["use_rslora"]),
            lora_bias=g.bias,
            bias_target=bias_target,
            magnitude=magnitude,
            init=init,
            layout_source=source or "shape",
        )

    def _kasa(
        self,
        module: str,
        key: str,
        kind: SiteKind,
        diag: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
    ) -> torch.Tensor:
        """KaSA's ``lora_B · diag(lora_diag)``, computed as peft's ``(B * diag)`` in fp32.

        The base truncation KaSA trains against is left to reconstruct-residual (``init``
        "kasa"). peft's KaSA variant exists for nn.Linear only and raises elsewhere.
        """
        if self.cfg["kasa_config"] is None:
            raise FormatError(
                f"{self.where(key)}: lora_diag without kasa_config in {self.cfg.path.name}; "
                "peft would load this adapter as plain LoRA and drop lora_diag"
            )
        if kind is not SiteKind.LINEAR:
            raise UnsupportedError(
                f"{self.where(key)}: KaSA on a {kind.value} layer; peft applies KaSA to "
                "nn.Linear only"
            )
        if diag is None:
            raise FormatError(
                f"{self.where(key)}: kasa_config is set but '{module}' has no lora_diag (peft "
                "would draw it at random on load)"
            )
        if self.cfg.init not in PLAIN_INITS or self.cfg["use_dora"]:
            what = "use_dora" if self.cfg["use_dora"] else f"init_lora_weights='{self.cfg.init}'"
            raise UnsupportedError(
                f"{self.where(key)}: KaSA combined with {what} is not supported (peft's KaSA "
                "truncates the base the other option already changed)"
            )
        if tuple(diag.shape) != (A.shape[0],):
            raise FormatError(
                f"{self.where(key)}: lora_diag has shape {tuple(diag.shape)}, expected "
                f"({A.shape[0]},) for rank {A.shape[0]}"
            )
        return values(B).float() * values(diag).float()

    def _refuse_mha(self, key: str, module: str) -> NoReturn:
        raise UnsupportedError(
            f"{self.where(key)}: LoRA on nn.MultiheadAttention '{module}' is refused: peft "
            "0.15-0.21 adds its out_proj delta twice (in training and in merge_and_unload), a "
            "pending peft fix adds it once, so the same file means two models (docs/FORMATS.md)"
        )

    def _refuse_grouped(self, key: str, groups: int) -> NoReturn:
        """peft's LoRA branch of a grouped conv reads every input channel (lora_A is not grouped),
        so its delta is not a grouped kernel and the base's (out, in/groups, *k) weight cannot
        hold it; peft's _ConvNd.merge raises for groups > 1."""
        raise UnsupportedError(
            f"{self.where(key)}: grouped convolution (groups={groups}) is not supported by "
            "PEFT's merge either: the LoRA branch mixes all input channels, which the grouped "
            "base weight cannot hold"
        )

    def _check_qalora(self, module: str, key: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Refuse QALoRA factors of a GPTQ layer: lora_A is (r, in/group), pooled inputs."""
        group = self.cfg["qalora_group_size"] or 16
        n_in = A.shape[1]
        if self.base is not None:
            shape = self.base.shape(f"{module}.weight")
            gptq = shape is None and f"{module}.qweight" in self.base
            grouped = gptq or (shape is not None and len(shape) == 2 and n_in not in shape)
        else:  # no base: A's in-dim times the group is an out-dim of the adapter, A's is not
            grouped = n_in * group in self.out_dims and n_in not in self.out_dims
        if grouped:
            raise UnsupportedError(
                f"{self.where(key)}: QALoRA factors for a GPTQ layer: peft never merges GPTQ "
                f"layers (its QALoRA variant has no delta weight); lora_A {tuple(A.shape)} "
                f"takes inputs pooled in groups of {group}, so no dense delta of '{module}' "
                "is equivalent"
            )

    def expand_block_diagonal(
        self, module: str, A: torch.Tensor, B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BD-LoRA stores a block-diagonal factor compactly as (rows, cols/nblocks)."""
        bd = self.cfg["use_bdlora"]
        if not bd:
            return A, B
        if not isinstance(bd, dict) or not isinstance(bd.get("nblocks", 1), int):
            raise FormatError(f"{self.cfg.path}: 'use_bdlora' must be an object with nblocks")
        nb = bd.get("nblocks", 1)
        on_a = any(p in module for p in bd.get("target_modules_bd_a") or [])
        on_b = any(p in module for p in bd.get("target_modules_bd_b") or [])
        if on_a or on_b:
            import torch  # the block diagonal's shape depends on torch.chunk: compute it

            if on_a:
                A = torch.block_diag(*torch.chunk(values(A), nb, dim=0))
            else:
                B = torch.block_diag(*torch.chunk(values(B), nb, dim=0))
        return A, B

    def cross_check(self, sites: tuple[Site, ...]) -> None:
        """Note where the saved keys and the config's targeting disagree (keys win)."""
        targets = self.cfg["target_modules"]
        if targets is None or targets == "all-linear" or self.cfg["layer_replication"]:
            return
        for site in sites:
            if site.kind is not SiteKind.PARAMETER and not is_targeted(site.module, self.cfg):
                self.notes.append(
                    f"{site.module}: saved in the file but not matched by target_modules "
                    "(the file wins)"
                )


_KINDS = {Layout.LINEAR: SiteKind.LINEAR, Layout.CONV1D: SiteKind.CONV1D}
