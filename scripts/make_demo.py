"""Make the demo's tiny Llama base and rsLoRA adapter, or check a merge of them against PEFT."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def make(out: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out / "base")
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        alpha_pattern={"down_proj": 4},
    )
    get_peft_model(model, lora).save_pretrained(out / "adapter")


def check(out: Path) -> None:
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"== merged logits vs PEFT's unmerged adapter: max relative error {err:.2e}")
    if err > 1e-5:
        raise SystemExit("demo: merged model does not match PEFT")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    check(args.out) if args.check else make(args.out)
