"""A tiny HF-named attention stack (split q/k/v or fused ``qkv_proj``) and PEFT adapters on it.

Used by tests/e2e/test_adapter_files.py and scripts/build_olive_fixture.py (the Olive fixtures are
built from the same model, so the tests can rebuild PEFT's reference).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

H, Q, KV = 16, 16, 8  # hidden size, q rows, k/v rows (grouped-query sizes)
LAYERS = 2
PROJ_ROWS = {"q_proj": Q, "k_proj": KV, "v_proj": KV}


class Attn(torch.nn.Module):
    """q/k/v (split, or one fused ``qkv_proj`` as Phi-3 has) and o_proj, no biases."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.qkv_proj = torch.nn.Linear(H, Q + 2 * KV, bias=False)
        else:
            self.q_proj = torch.nn.Linear(H, Q, bias=False)
            self.k_proj = torch.nn.Linear(H, KV, bias=False)
            self.v_proj = torch.nn.Linear(H, KV, bias=False)
        self.o_proj = torch.nn.Linear(Q + 2 * KV, H, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.fused:
            qkv = self.qkv_proj(h)
        else:
            qkv = torch.cat([self.q_proj(h), self.k_proj(h), self.v_proj(h)], -1)
        return self.o_proj(torch.tanh(qkv))


class Layer(torch.nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.self_attn = Attn(fused)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.self_attn(h)


class Inner(torch.nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer(fused) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Tiny(torch.nn.Module):
    """``model.layers.N.self_attn.{q,k,v,o}_proj`` (or ``qkv_proj``), as HF decoders name them."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.model = Inner(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def fused_copy(split: Tiny) -> Tiny:
    """The same function with q/k/v stacked into one ``qkv_proj`` weight."""
    fused = Tiny(fused=True)
    with torch.no_grad():
        for s, f in zip(split.model.layers, fused.model.layers, strict=True):
            a = s.self_attn
            f.self_attn.qkv_proj.weight.copy_(
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            )
            f.self_attn.o_proj.weight.copy_(a.o_proj.weight)
    return fused.eval()


def peft_adapter(
    base: Tiny, folder: Path, targets: list[str], r: int, alpha: int, seed: int
) -> Any:
    """A PEFT adapter with random (non-zero) factors saved to ``folder``; PEFT's model back."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(str(folder))
    return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
