"""LoRA variants the reader rewrites into plain factors, checked against PEFT's unmerged forward."""

from __future__ import annotations

import pytest
import torch

import loracc
from tests.support import peft_oracle as po

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny_llama(path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(po.llama_config())
    model.save_pretrained(path)
    return model


def test_bdlora_block_diagonal_factors_merge_like_the_forward(tmp_path) -> None:
    from peft.tuners.lora.config import BdLoraConfig

    model = _tiny_llama(tmp_path / "base")
    bd = BdLoraConfig(target_modules_bd_a=["o_proj"], target_modules_bd_b=["q_proj"], nblocks=2)
    pm = peft.get_peft_model(
        model,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_bdlora=bd),
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_()
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm.eval()(ids).logits
    loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_embedding_lora_on_a_classifier_with_tie_flag_adds_no_lm_head(tmp_path) -> None:
    """A sequence classifier has no LM head, whatever tie_word_embeddings says: nothing to untie."""
    torch.manual_seed(0)
    cfg = po.llama_config(tie=True, num_labels=3)
    model = transformers.LlamaForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "base")
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    pm = peft.get_peft_model(model, lora)
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm.eval()(ids).logits
    report = loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert report.config_updates == {}
    assert not any("lm_head" in k for k in report.changed)
    out = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        got = out(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_resized_tied_vocab_with_trainable_tokens_keeps_the_tie(tmp_path) -> None:
    """GPT-2 (tied) resized 128 -> 136 with trainable tokens: peft saves the resized table and the
    rows for both wte and lm_head (identical); the merge applies them once and keeps the tie."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "base")
    model.resize_token_embeddings(136)
    with torch.no_grad():
        model.transformer.wte.weight[128:] = torch.randn(8, 32) * 0.02
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn"],
        init_lora_weights=False,
        trainable_token_indices=[3, 130],
    )
    pm = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_()
    pm.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    ids = torch.tensor([[3, 130, 135, 7, 1], [0, 131, 3, 64, 2]])
    with torch.no_grad():
        want = pm.eval()(ids).logits
    report = loracc.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert report.config_updates == {"vocab_size": 136}
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        got = out(ids).logits
    assert got.shape[-1] == 136
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
