"""target_parameters on fused MoE experts, merged into a checkpoint that stores experts one by one.

transformers >= 5 holds Mixtral's experts as fused 3-D parameters (gate_up_proj, down_proj) but
save_pretrained writes the original per-expert w1/w2/w3 tensors under block_sparse_moe. The oracle
is PEFT's unmerged forward on the fused model.
"""

from __future__ import annotations

import pytest
import torch

import loracc
from tests.support import peft_oracle as po

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("moe")
    cfg = transformers.MixtralConfig(**po.TINY_DECODER, num_local_experts=3, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg)
    model.save_pretrained(d / "base")
    lora = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "gate"],
        init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    pm = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    pm.save_pretrained(d / "adapter")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = pm.eval()(ids).logits
    return d, ids, want


def test_fused_expert_adapter_merges_into_per_expert_checkpoint(moe) -> None:
    d, ids, want = moe
    report = loracc.merge(d / "base", d / "adapter", d / "out")
    assert any(".block_sparse_moe.experts.2.w3.weight" in k for k in report.changed)
    assert any(".block_sparse_moe.gate.weight" in k for k in report.changed)
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(d / "out")(ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(d / "base")(ids).logits
    assert (base - want).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inspect_names_the_stored_expert_tensors(moe) -> None:
    d, _, _ = moe
    sites = loracc.inspect(d / "adapter", d / "base")["sites"]
    experts = [s for s in sites if ".experts." in s["target"]]
    assert len(experts) == 2 * 3 * 3  # layers x experts x (w1, w2, w3)
    assert all(s["kind"] == "linear" and s["rank"] == 2 for s in experts)
