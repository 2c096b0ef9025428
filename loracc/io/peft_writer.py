"""Write the adapter IR back as a plain PEFT LoRA adapter folder (``loracc convert``).

The output is what peft 0.21 writes for a vanilla LoRA: ``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.``-prefixed keys. Only plain sites can be
written: every scale must already be folded (``fold-scaling``: scale 1, alpha = r), residual
inits reconstructed, and no DoRA magnitude or channel scale may remain, because a plain LoRA on
the original base cannot express ``m/‖W + ΔW‖``. The one exception is ``keep_dora`` (``loracc
combine``): saved magnitudes are written back as ``lora_magnitude_vector`` with ``use_dora``
true, a DoRA adapter whose magnitudes are still the trained ones.

Config: ``r`` and ``lora_alpha`` are the largest rank; ``rank_pattern`` and ``alpha_pattern``
give every other module its own rank as both r and alpha (escaped full module names, which
peft's ``(.*\\.)?(K)$`` lookup matches exactly), so every scale is 1; ``use_rslora`` false,
``init_lora_weights`` true, ``use_dora`` false, ``use_bdlora`` null (the reader expanded
BD-LoRA's block-diagonal factors to dense ones, which peft would misread as compact blocks);
``target_modules`` is the exact list of adapted modules (peft targets an exact name without the
layer filters, so ``layers_to_transform``, ``layers_pattern`` and ``exclude_modules`` are
dropped). Other fields (``modules_to_save``, ``trainable_token_indices``, ``bias``,
``lora_bias``, ``layer_replication``, ``task_type``, ``target_parameters``, ...) are carried
through.

Keys: ``<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_B.bias``), Embedding
``<module>.lora_embedding_A`` / ``_B``; a whole-tensor replacement (modules_to_save copy, bias,
embedding) under its base name, with ``.base_layer`` before the parameter when the module also
carries a LoRA site (where peft keeps the wrapped layer); trainable tokens as
``<module>.token_adapter.trainable_tokens_delta``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from loracc.io import peft_keys
from loracc.io.safetensors import SafetensorsWriter
from loracc.ir import Adapter, Site, SiteKind
from loracc.legality import Target, require

__all__ = ["adapter_config", "adapter_tensors", "write_peft_adapter"]

_DROPPED = (
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "kasa_config",  # the truncation is reconstructed as rank-2r factors on the original base
    "runtime_config",
)


def _owner(site: Site) -> str:
    return site.module.rsplit(".", 1)[0] if site.kind is SiteKind.PARAMETER else site.module


def _dora_checked(adapter: Adapter, keep_dora: bool) -> bool:
    """Ask the legality table about ``adapter`` (its DoRA magnitudes set aside when
    ``keep_dora``: ``loracc combine`` writes them as saved); whether any magnitude is written."""
    dora = keep_dora and any(s.magnitude is not None for s in adapter.sites)
    if dora:
        adapter = replace(adapter, sites=tuple(replace(s, magnitude=None) for s in adapter.sites))
    require(adapter, Target.PEFT_ADAPTER)
    return dora


def adapter_tensors(adapter: Adapter, *, keep_dora: bool = False) -> dict[str, torch.Tensor]:
    """The adapter_model.safetensors content of a plain adapter, keyed as peft saves it (with
    ``keep_dora``, DoRA magnitudes too)."""
    _dora_checked(adapter, keep_dora)
    out: dict[str, torch.Tensor] = {}
    wrapped = {_owner(s) for s in adapter.sites}
    for site in sorted(adapter.sites, key=lambda s: s.module):
        module = _owner(site)
        key_A, key_B = peft_keys.factor_keys(module, embedding=site.kind is SiteKind.EMBEDDING)
        out[key_A], out[key_B] = site.lora_A, site.lora_B
        if site.lora_bias is not None:
            out[peft_keys.lora_bias_key(module)] = site.lora_bias
        if keep_dora and site.magnitude is not None:
            out[peft_keys.magnitude_key(module)] = site.magnitude
    for r in adapter.replacements:
        out[peft_keys.whole_tensor_key(r.target, wrapped)] = r.tensor
    for t in adapter.token_rows:
        out[peft_keys.token_rows_key(t.target.removesuffix(".weight"))] = t.rows
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def adapter_config(adapter: Adapter, *, keep_dora: bool = False) -> dict[str, Any]:
    """adapter_config.json of the plain adapter: alpha = r for every module, so scale 1."""
    dora = _dora_checked(adapter, keep_dora)
    config: dict[str, Any] = {k: v for k, v in adapter.config.items() if k not in _DROPPED}
    ranks = {s.module: s.rank for s in adapter.sites}
    top = max(ranks.values(), default=int(config.get("r", 8)))
    pattern = {re.escape(m): r for m, r in sorted(ranks.items()) if r != top}
    modules = sorted({s.module for s in adapter.sites if s.kind is not SiteKind.PARAMETER})
    config.update(
        peft_type="LORA",
        r=top,
        lora_alpha=top,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        use_dora=dora,
        init_lora_weights=True,
        target_modules=modules,
        ensure_weight_tying=False,
        inference_mode=True,
    )
    if "use_bdlora" in config:
        config["use_bdlora"] = None  # the factors are dense now
    if not any(s.kind is SiteKind.PARAMETER for s in adapter.sites):
        config["target_parameters"] = None
    return config


def write_peft_adapter(adapter: Adapter, folder: Path, *, keep_dora: bool = False) -> list[str]:
    """Write ``adapter`` (plain, folded; DoRA sites kept as DoRA with ``keep_dora``) into
    ``folder``; return the tensor keys written."""
    tensors = adapter_tensors(adapter, keep_dora=keep_dora)
    config = adapter_config(adapter, keep_dora=keep_dora)
    folder = Path(folder)
    writer = SafetensorsWriter(
        folder / peft_keys.WEIGHTS_NAME,
        [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
        {"format": "pt"},
    )
    try:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
    except BaseException:  # disk full, Ctrl-C: close the file the output layer removes
        writer.abort()
        raise
    writer.close()
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    (folder / peft_keys.CONFIG_NAME).write_text(text + "\n")
    return list(tensors)
