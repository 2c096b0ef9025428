"""PEFT's own LoRA test matrix, rebuilt for loracc: every case is merged by PEFT and by loracc.

The 46 LoRA-family entries of ``TEST_CASES`` in peft's ``tests/test_custom_models.py`` (MLP,
transformers Conv1D + Embedding, Conv1d/2d/3d, grouped convs, MHA, nn.Parameter, DoRA, lora_bias,
KaSA, MiCA, VeLoRA, MonteCLoRA, BD-LoRA) on the same tiny models, then what that list leaves out:
init variants, rsLoRA, rank/alpha patterns, layers_to_transform, tiny decoders where PEFT's own
merge is wrong, and a square-shape twin of every site whose layout the shape alone cannot decide
(square Linear, square Conv1D with and without config.json, square fused MoE experts).

Each case saves a seeded base (safetensors, plus config.json where the case says so) and a PEFT
adapter with random non-zero factors, then :func:`run_case` merges it with loracc and classifies
the result against PEFT (reloaded from disk, as a user would):

* ``bit-identical``: every output tensor ``torch.equal`` to PEFT's ``merge_and_unload()``;
* ``within tolerance``: max |loracc - PEFT| <= :data:`RTOL` * max |PEFT| per tensor (fp32), or,
  where PEFT's merge is known wrong, the merged model's forward within :data:`FORWARD_RTOL` of
  PEFT's unmerged forward;
* ``refused``: a :class:`loracc.LoraccError` with exit code 2 (its reason is checked by the test);
* ``WRONG``: anything else: a merge that differs from PEFT with exit 0.

Nothing here asserts; the tests do. Nothing here imports loracc except :func:`run_case`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tests.support import peft_oracle as po

RTOL = 1e-6  # fp32 tensors: max abs error relative to the tensor's max abs value
FORWARD_RTOL = 1e-5  # model outputs, where PEFT's merge is wrong and its forward is the oracle
ADAPTER_STD = 0.1

BIT_IDENTICAL, WITHIN_TOLERANCE, REFUSED, WRONG = (
    "bit-identical",
    "within tolerance",
    "refused",
    "WRONG",
)

# --------------------------------------------------------------------------------------------
# PEFT's tiny models (tests/test_custom_models.py), and square twins


def _conv1d_cls() -> type[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


class MLP(nn.Module):
    def __init__(self, hidden: int = 20) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, hidden)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(self.relu(self.lin0(x))), dim=-1)


class Block(nn.Module):
    def __init__(self, size: int = 10, hidden: int = 12) -> None:
        super().__init__()
        self.lin0 = nn.Linear(size, hidden)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


class DeepMLP(nn.Module):
    """PEFT's DeepMLP with 4 blocks instead of 12, layers.N.lin0/lin1 10 -> 12 -> 10 (not square:
    without config.json loracc refuses a square nn.Linear, see the square twins)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(4)])
        self.head = nn.Linear(10, 2)  # PEFT's "out": modules_to_save=["out"] also hits lora_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return torch.log_softmax(self.head(x), dim=-1)


class ModelEmbConv1D(nn.Module):
    """Embedding (100, 5) + transformers Conv1D; ``conv_out=5`` makes the Conv1D square."""

    def __init__(self, conv_out: int = 1) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = _conv1d_cls()(conv_out, 5)
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(10 * conv_out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1d(self.emb(x)))
        return torch.log_softmax(self.lin0(x.flatten(1)), dim=-1)


class ModelConv1D(nn.Module):
    def __init__(self, kernel: int = 2) -> None:
        super().__init__()
        channels = 1 if kernel == 2 else 3
        self.conv1d = nn.Conv1d(channels, 1 if kernel == 2 else 10, kernel)
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(9 if kernel == 2 else 100, 2)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1d(x.reshape(-1, self.channels, 10)))
        return self.lin0(x.flatten(1))


class ModelConvNd(nn.Module):
    """PEFT's ModelConv2D / ModelConv3D: conv{2,3}d (5 -> 10, kernel 3) then a Linear."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims
        self.add_module(f"conv{dims}d", (nn.Conv2d if dims == 2 else nn.Conv3d)(5, 10, 3))
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = torch.stack([x] * 3, dim=-1)
        x = self.relu(getattr(self, f"conv{self.dims}d")(x.reshape(-1, 5, *[3] * self.dims)))
        return torch.log_softmax(self.lin0(x.flatten(1)), dim=-1)


class ModelConvKernel(nn.Module):
    """PEFT's ModelConv2D1x1 (kernel (1, 1)), and a Conv3d with kernel (1, 1, 3)."""

    def __init__(self, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.kernel = kernel
        conv = nn.Conv2d(1, 10, kernel) if len(kernel) == 2 else nn.Conv3d(5, 10, kernel)
        self.add_module(f"conv{len(kernel)}d", conv)
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(90, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(self, f"conv{len(self.kernel)}d")
        x = x.reshape(-1, 1, 3, 3) if len(self.kernel) == 2 else x.reshape(-1, 5, 3, 3, 3)
        return self.lin0(self.relu(conv(x)).flatten(1))


class ModelConv2DGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin0(x.flatten()).reshape(2, 16, 3, 3)
        return self.lin1(self.relu(self.conv2d(x)).flatten(1))


class ModelConv2DGroups2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.lin0 = nn.Linear(12800, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.arange(9 * 16 * 20 * 20, dtype=torch.float32).view(9, 16, 20, 20) / 1e4
        return self.lin0(self.relu(self.conv2d(x)).flatten(1))


class ModelMha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.mha(x, x, x)
        return torch.log_softmax(self.lin0(x), dim=-1)


class _LinearUsingParameter(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Wide(nn.Module):
    """Not in peft's list: tensors of 200-320 rows, several of the streamed merge's row blocks
    once tests/e2e/test_merge_stream.py shrinks them (64 rows at least)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, 24)
        self.up = nn.Linear(24, 320)
        self.down = nn.Linear(320, 200)
        self.head = nn.Linear(200, 260)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.emb(x)))))


class MlpUsingParameters(nn.Module):
    def __init__(self, hidden: int = 20) -> None:
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, hidden)
        self.relu = nn.ReLU()
        self.lin1 = _LinearUsingParameter(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(self.relu(self.lin0(x))), dim=-1)


def _float_inputs(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def _id_inputs(vocab: int, *shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(7))


@dataclass(frozen=True)
class Model:
    """A tiny base: ``make`` builds it; ``hf`` says it is a transformers model (save_pretrained)."""

    make: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    hf: bool = False


def _hf_causal(config: Callable[[], Any]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config(), dtype=torch.float32)

    return make


def _gpt2_square() -> Any:
    cfg = po.gpt2_config(tie=True)
    cfg.n_inner = cfg.n_embd  # c_fc and mlp.c_proj square, like attn.c_proj
    return cfg


def _tiny_decoder(config_class: str, **kw: Any) -> Model:
    """A tiny transformers decoder: peft_oracle.TINY_DECODER's sizes with ``kw`` on top."""

    def config() -> Any:
        import transformers

        return getattr(transformers, config_class)(**{**po.TINY_DECODER, **kw})

    return Model(_hf_causal(config), _IDS, hf=True)


_IDS = _id_inputs(po.VOCAB, 2, 9)

MODELS: dict[str, Model] = {
    "MLP": Model(MLP, _float_inputs(4, 10)),
    "MLPSquare": Model(lambda: MLP(hidden=10), _float_inputs(4, 10)),
    "DeepMLP": Model(DeepMLP, _float_inputs(4, 10)),
    "EmbConv1D": Model(ModelEmbConv1D, _id_inputs(100, 4, 10)),
    "EmbConv1DSquare": Model(lambda: ModelEmbConv1D(conv_out=5), _id_inputs(100, 4, 10)),
    "Conv1d": Model(ModelConv1D, _float_inputs(4, 10)),
    "Conv1dKernel1": Model(lambda: ModelConv1D(kernel=1), _float_inputs(4, 30)),
    "Conv2d": Model(lambda: ModelConvNd(2), _float_inputs(4, 45)),
    "Conv2d1x1": Model(lambda: ModelConvKernel((1, 1)), _float_inputs(4, 9)),
    "Conv3d11k": Model(lambda: ModelConvKernel((1, 1, 3)), _float_inputs(4, 135)),
    "Conv2dGroups": Model(ModelConv2DGroups, _float_inputs(2, 45)),
    "Conv2dGroups2": Model(ModelConv2DGroups2, _float_inputs(1, 1)),
    "Conv3d": Model(lambda: ModelConvNd(3), _float_inputs(4, 45)),
    "MHA": Model(ModelMha, _float_inputs(3, 2, 10)),
    "MlpUsingParameters": Model(MlpUsingParameters, _float_inputs(4, 10)),
    "MlpUsingParametersSquare": Model(lambda: MlpUsingParameters(10), _float_inputs(4, 10)),
    "Wide": Model(Wide, _id_inputs(300, 2, 5)),
    "llama": Model(_hf_causal(po.llama_config), _IDS, hf=True),
    "gpt2_tied": Model(_hf_causal(po.gpt2_config), _IDS, hf=True),
    "gpt2_square": Model(_hf_causal(_gpt2_square), _IDS, hf=True),
    **{
        name: _tiny_decoder(
            "GptOssConfig",
            intermediate_size=size,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"],
        )
        for name, size in (("gpt_oss", 48), ("gpt_oss_square", 32))
    },
    # Experts' intermediate_size == hidden_size (32) below: square expert matrices.
    "llama4_square": _tiny_decoder(
        "Llama4TextConfig",
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_local_experts=4,
        num_experts_per_tok=1,
        head_dim=8,
        interleave_moe_layer_step=1,
        no_rope_layers=[1, 1],
        attention_chunk_size=64,
    ),
    "qwen3moe_square": _tiny_decoder(
        "Qwen3MoeConfig", moe_intermediate_size=32, head_dim=8, num_experts=4, num_experts_per_tok=2
    ),
    "qwen2moe_square": _tiny_decoder(
        "Qwen2MoeConfig",
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "deepseek_v3_square": _tiny_decoder(
        "DeepseekV3Config",
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    ),
    "mixtral_square": _tiny_decoder(
        "MixtralConfig", intermediate_size=32, num_local_experts=3, num_experts_per_tok=2
    ),
}

# --------------------------------------------------------------------------------------------
# Cases

# Documented refusal reasons (docs/FORMATS.md, docs/ERRORS.md, issue 10), as regexes.
GROUPED_CONV = r"grouped convolution \(groups=\d+\) is not supported by PEFT's merge either"
MHA_TWICE = r"nn\.MultiheadAttention .*out_proj delta twice"
KASA = r"kasa"
LAYOUT = r"--layout"


@dataclass(frozen=True)
class MatrixCase:
    name: str
    model: str
    lora: Mapping[str, Any]
    # config.json saved with a custom (non-transformers) base; None: no config.json at all.
    config: Mapping[str, Any] | None = None
    # Regex of the documented reason when loracc may refuse; a refusal with another reason fails.
    refusal: str | None = None
    # "merge": PEFT's merge_and_unload() tensors; "forward": PEFT's unmerged forward (in memory,
    # before saving: the trained model), where PEFT's merge or reload is known wrong.
    oracle: str = "merge"
    # loracc's --layout MODULE_PATTERN=LAYOUT choices.
    layout: Mapping[str, str] | None = None
    # Save the adapter as initialised too and pass it to loracc as --initial-adapter.
    initial_adapter: bool = False
    # Oracle "merge": bit-identity is required (loracc's fp32 claim), unless the merge recomputes
    # an SVD/QR or PEFT's formula differs in op order; then RTOL applies.
    exact: bool = True
    xfail: str | None = None
    base_dtype: torch.dtype = torch.float32
    from_peft: bool = False  # one of the 46 LoRA entries of peft's TEST_CASES


def _peft(name: str, model: str, lora: Mapping[str, Any], **kw: Any) -> MatrixCase:
    return MatrixCase(name, model, lora, from_peft=True, **kw)


def _bdlora(**kw: Any) -> Any:
    from peft.tuners.lora.config import BdLoraConfig

    return BdLoraConfig(**kw)


def _sub(cls_name: str, **kw: Any) -> Any:
    import peft

    return getattr(peft, cls_name)(**kw)


def peft_cases() -> list[MatrixCase]:
    """The LoRA entries of peft's TEST_CASES (tests/test_custom_models.py), in its order."""
    lin01 = {"target_modules": ["lin0", "lin1"]}
    dora = {"use_dora": True}
    return [
        _peft("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
        _peft("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
        _peft("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
        _peft("Vanilla MLP 4 LoRA", "MLP", lin01),
        _peft(
            "Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}
        ),
        _peft(
            "Vanilla MLP 6 LoRA",
            "MLP",
            {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1},
        ),
        _peft("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], **dora}),
        _peft("Vanilla MLP 8 LoRA with DoRA", "MLP", {**lin01, **dora}),
        _peft(
            "Vanilla MLP 1 LoRA with KaSA",
            "MLP",
            {"target_modules": ["lin0"], "kasa_config": {}, "r": 4},
            refusal=KASA,
            exact=False,  # peft's KaSA init truncates the base by an SVD
        ),
        _peft(
            "Vanilla MLP 1 LoRA with MiCA",
            "MLP",
            {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4},
        ),
        _peft(
            "Vanilla MLP 9 LoRA with DoRA",
            "MLP",
            {"target_modules": "lin1", **dora, "lora_alpha": 32},
        ),
        _peft(
            "Vanilla MLP 10 LoRA with VeLoRA random",
            "MLP",
            {"target_modules": ["lin0"], "velora_config": {"num_groups": 2, "init_type": "random"}},
        ),
        _peft(
            "Vanilla MLP 11 LoRA with VeLoRA batch_average",
            "MLP",
            {**lin01, "velora_config": {"num_groups": 2, "init_type": "batch_average"}},
        ),
        _peft(
            "Vanilla MLP 12 LoRA with VeLoRA batch_average_once",
            "MLP",
            {
                "target_modules": ["lin0"],
                "velora_config": {"num_groups": 2, "init_type": "batch_average_once"},
            },
        ),
        _peft(
            "Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}
        ),
        _peft("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
        _peft(
            "Embedding + transformers Conv1D 3 LoRA",
            "EmbConv1D",
            {"target_modules": ["emb", "conv1d"]},
        ),
        _peft(
            "Embedding + transformers Conv1D 1 DoRA",
            "EmbConv1D",
            {"target_modules": ["conv1d"], **dora},
        ),
        _peft(
            "Embedding + transformers Conv1D 2 DoRA",
            "EmbConv1D",
            {"target_modules": ["emb"], **dora},
        ),
        _peft(
            "Embedding + transformers Conv1D 3 DoRA",
            "EmbConv1D",
            {"target_modules": ["emb", "conv1d"], **dora},
        ),
        _peft(
            "Embedding + transformers Conv1D 1 LoRA trainable_tokens",
            "EmbConv1D",
            {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
        ),
        _peft("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
        _peft("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], **dora}),
        _peft("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
        _peft("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
        _peft("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], **dora}),
        _peft("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], **dora}),
        *(
            _peft(
                f"Conv2d {g} LoRA{' with DoRA' if d else ''}",
                f"Conv2d{g}",
                {"target_modules": ["conv2d"], **(dora if d else {})},
                refusal=GROUPED_CONV,
                oracle="forward",  # peft refuses to merge grouped convs
            )
            for d in (False, True)
            for g in ("Groups", "Groups2")
        ),
        _peft("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
        _peft("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
        _peft("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], **dora}),
        _peft("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], **dora}),
        _peft(
            "Vanilla MLP 1 LoRA with lora_b bias",
            "MLP",
            {**lin01, "lora_bias": True, "lora_alpha": 32},
        ),
        _peft(
            "Conv2d 1 LoRA with lora_b bias",
            "Conv2d",
            {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
        ),
        _peft(
            "Conv3d 1 LoRA with lora_b bias",
            "Conv3d",
            {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
        ),
        # Refused today; a merge that reproduces peft (out_proj delta twice) is fine too, within
        # tolerance since peft adds the out_proj delta in two roundings.
        *(
            _peft(f"MHA {i} LoRA", "MHA", {"target_modules": t}, refusal=MHA_TWICE, exact=False)
            for i, t in ((1, ["mha"]), (2, ["mha", "lin0"]))
        ),
        _peft(
            "MLP 1 using nn.Parameter LoRA",
            "MlpUsingParameters",
            {"target_parameters": ["lin0.weight"]},
        ),
        _peft(
            "MLP 2 using nn.Parameter LoRA",
            "MLP",
            {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]},
        ),
        _peft(
            "Vanilla MLP 1 LoRA with Monteclora",
            "MLP",
            {"target_modules": ["lin0"], "monteclora_config": {"num_samples": 2}},
        ),
        _peft(
            "BD-LoRA A only",
            "MLP",
            {**lin01, "use_bdlora": {"target_modules_bd_a": ["lin0"], "match_strict": False}},
        ),
        _peft(
            "BD-LoRA B only",
            "MLP",
            {
                **lin01,
                "use_bdlora": {
                    "target_modules_bd_b": ["lin1"],
                    "nblocks": 2,
                    "match_strict": False,
                },
            },
        ),
        _peft(
            "BD-LoRA both A and B",
            "MLP",
            {
                **lin01,
                "use_bdlora": {
                    "target_modules_bd_a": ["lin0"],
                    "target_modules_bd_b": ["lin1"],
                    "nblocks": 2,
                },
            },
        ),
    ]


def extra_cases() -> list[MatrixCase]:
    """What peft's list leaves out: inits, scaling options, layer filters, decoders, squares."""
    lin01 = {"target_modules": ["lin0", "lin1"]}
    deep = {"target_modules": ["lin0", "lin1"]}
    fused = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    gpt_oss_targets = {"target_modules": ["q_proj", "v_proj"], **fused}
    return [
        # Scaling and patterns.
        MatrixCase("MLP rsLoRA", "MLP", {**lin01, "r": 4, "lora_alpha": 6, "use_rslora": True}),
        MatrixCase(
            "DeepMLP rank and alpha patterns",
            "DeepMLP",
            {
                **deep,
                "rank_pattern": {"layers.1.lin0": 2, "lin1": 6},
                "alpha_pattern": {"lin0": 5, "layers.3.lin1": 9},
            },
        ),
        # peft saves the patterns sorted: the reload (and so PEFT's merge) may use another alpha
        # than training did; loracc follows the file, like PEFT's reload.
        MatrixCase(
            "DeepMLP overlapping alpha_pattern keys",
            "DeepMLP",
            {**deep, "alpha_pattern": {"lin0": 3, "layers.1.lin0": 11}},
        ),
        MatrixCase(
            "DeepMLP layers_to_transform + layers_pattern",
            "DeepMLP",
            {**deep, "layers_to_transform": [0, 2], "layers_pattern": "layers"},
        ),
        MatrixCase(
            "DeepMLP rsLoRA + DoRA + modules_to_save",
            "DeepMLP",
            {**deep, "use_rslora": True, "use_dora": True, "modules_to_save": ["head"]},
        ),
        MatrixCase("DeepMLP bias=all", "DeepMLP", {"target_modules": ["lin0"], "bias": "all"}),
        MatrixCase(
            "DeepMLP bias=lora_only", "DeepMLP", {"target_modules": ["lin1"], "bias": "lora_only"}
        ),
        # Init variants (peft re-runs the init on load; pissa/olora change the base, through an
        # SVD / QR that loracc recomputes: within tolerance, not bit-identical).
        *(
            MatrixCase(
                f"DeepMLP init {init}", "DeepMLP", {**deep, "r": 4, "init_lora_weights": init}
            )
            for init in ("gaussian", "orthogonal")
        ),
        *(
            MatrixCase(
                f"DeepMLP init {init}{' + rsLoRA' if rs else ''}",
                "DeepMLP",
                {**deep, "r": 4, "init_lora_weights": init, "use_rslora": rs},
                exact=False,
            )
            for init, rs in (("pissa", False), ("olora", False), ("pissa", True))
        ),
        # r = 4 > min(in, out) = 2 on lin1: peft's factors have 2 rows but it scales by alpha/4.
        *(
            MatrixCase(
                f"MLP init {init}, r above lin1's rank",
                "MLP",
                {**lin01, "r": 4, "init_lora_weights": init},
                exact=False,
            )
            for init in ("pissa", "olora")
        ),
        MatrixCase(
            "DeepMLP init pissa_niter_2 with --initial-adapter",
            "DeepMLP",
            {**deep, "r": 4, "init_lora_weights": "pissa_niter_2"},
            oracle="forward",  # peft's reload re-runs a random SVD: only the trained model is right
            initial_adapter=True,
        ),
        MatrixCase(
            "DeepMLP init pissa_niter_2 without --initial-adapter",
            "DeepMLP",
            {**deep, "r": 4, "init_lora_weights": "pissa_niter_2"},
            refusal=r"--initial-adapter",
            oracle="forward",
        ),
        MatrixCase(
            "Embedding + transformers Conv1D DoRA + trainable tokens",
            "EmbConv1D",
            {
                "target_modules": ["conv1d"],
                "use_dora": True,
                "trainable_token_indices": {"emb": [3, 99]},
            },
        ),
        MatrixCase(
            "Conv1d kernel 1 LoRA",
            "Conv1dKernel1",
            {"target_modules": ["conv1d"]},
        ),
        MatrixCase(
            "Conv1d kernel 1 LoRA with DoRA",
            "Conv1dKernel1",
            {"target_modules": ["conv1d"], "use_dora": True},
        ),
        # peft's 1x1 shortcut (a matmul), and the Conv3d (1, 1, k) kernel it misreads (its merge
        # raises, so its unmerged forward is the oracle).
        *(
            MatrixCase(
                f"Conv2d 1x1 LoRA{what}", "Conv2d1x1", {"target_modules": ["conv2d"], **extra}
            )
            for what, extra in (("", {}), (" with DoRA", {"use_dora": True}))
        ),
        MatrixCase(
            "Conv3d kernel (1, 1, 3) LoRA",
            "Conv3d11k",
            {"target_modules": ["conv3d", "lin0"]},
            oracle="forward",
        ),
        # A bf16 base with fp32 factors: one rounding of W + delta, as peft's Linear merge.
        MatrixCase(
            "Llama bf16 base, q/v/o/down",
            "llama",
            {"target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
            base_dtype=torch.bfloat16,
        ),
        MatrixCase(
            "Llama bf16 base, DoRA q/v",
            "llama",
            {"target_modules": ["q_proj", "v_proj"], "use_dora": True},
            base_dtype=torch.bfloat16,
        ),
        # Square twins of every site whose layout the shape alone cannot decide. Without an
        # architecture, fan_in_fan_out=false (peft's default) says nothing: refused, naming
        # --layout; with --layout, merged.
        *(
            MatrixCase(
                f"square Linear LoRA{what} without config.json",
                "MLPSquare",
                {**lin01, **extra},
                refusal=LAYOUT,
            )
            for what, extra in (("", {}), (" with DoRA", {"use_dora": True}))
        ),
        MatrixCase(
            "square Linear LoRA with DoRA, --layout lin0=linear",
            "MLPSquare",
            {**lin01, "use_dora": True},
            layout={"lin0": "linear"},
        ),
        MatrixCase(
            "square Linear LoRA, config.json of an unknown architecture",
            "MLPSquare",
            lin01,
            config={"model_type": "custom"},
            refusal=LAYOUT,
        ),
        MatrixCase(
            "square Linear LoRA + nn.Linear weight as target_parameters",
            "MLPSquare",
            {"target_modules": ["lin1"], "target_parameters": ["lin0.weight"]},
        ),
        MatrixCase(
            "square nn.Parameter (in, out) LoRA",
            "MlpUsingParametersSquare",
            {"target_parameters": ["lin0.weight"]},
        ),
        # Without config.json the adapter's fan_in_fan_out=true decides (peft sets it for Conv1D).
        *(
            MatrixCase(
                f"square transformers Conv1D{what} without config.json",
                "EmbConv1DSquare",
                {"target_modules": ["conv1d"], **extra},
            )
            for what, extra in (("", {}), (" with DoRA", {"use_dora": True}))
        ),
        # An architecture the table does not know: merged as peft does, or refused naming --layout.
        MatrixCase(
            "square transformers Conv1D, config.json of an unknown architecture",
            "EmbConv1DSquare",
            {"target_modules": ["conv1d", "emb"]},
            config={"model_type": "custom"},
            refusal=LAYOUT,
        ),
        MatrixCase(
            "square transformers Conv1D, unknown architecture, --layout conv1d=conv1d",
            "EmbConv1DSquare",
            {"target_modules": ["conv1d", "emb"]},
            config={"model_type": "custom"},
            layout={"conv1d": "conv1d"},
        ),
        MatrixCase(
            "GPT-2 square Conv1D (n_inner == n_embd)",
            "gpt2_square",
            {"target_modules": ["c_attn", "c_proj", "c_fc"]},
        ),
        MatrixCase(
            "GPT-2 square Conv1D with DoRA",
            "gpt2_square",
            {"target_modules": ["c_proj", "c_fc"], "use_dora": True},
        ),
        MatrixCase("GPT-OSS experts (intermediate 48)", "gpt_oss", gpt_oss_targets),
        # Square fused experts of every MoE layout: the architecture decides, never the shape.
        # GPT-OSS stores [E, in, out] (is_transposed); Llama 4 stores [E, in, out] too but has no
        # is_transposed, so peft treats it as [E, out, in]; Qwen2/3-MoE, DeepSeek-V3 and Mixtral
        # are saved per expert.
        *(
            MatrixCase(f"GPT-OSS square experts {what}", "gpt_oss_square", lora)
            for what, lora in (
                (
                    "down_proj",
                    {"target_modules": [], "target_parameters": ["mlp.experts.down_proj"]},
                ),
                ("gate_up + down + q/v", gpt_oss_targets),
            )
        ),
        MatrixCase(
            "Llama 4 square experts + q_proj",
            "llama4_square",
            {
                "target_modules": ["q_proj"],
                "target_parameters": [
                    "feed_forward.experts.gate_up_proj",
                    "feed_forward.experts.down_proj",
                ],
            },
        ),
        MatrixCase("Qwen3-MoE square experts", "qwen3moe_square", {"target_modules": [], **fused}),
        MatrixCase(
            "Qwen2-MoE square experts + shared expert",
            "qwen2moe_square",
            {"target_modules": ["shared_expert.down_proj"], **fused},
        ),
        MatrixCase(
            "DeepSeek-V3 square experts + q_b_proj",
            "deepseek_v3_square",
            {"target_modules": ["q_b_proj"], **fused},
        ),
        MatrixCase(
            "Mixtral square experts + q_proj",
            "mixtral_square",
            {"target_modules": ["q_proj"], **fused},
        ),
        MatrixCase(
            "Llama q/v + embed_tokens",
            "llama",
            {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        ),
        # Tiny decoders where PEFT's own merge is wrong: the oracle is its unmerged forward.
        MatrixCase(
            "GPT-2 tied lm_head LoRA",
            "gpt2_tied",
            {"target_modules": ["c_attn", "lm_head"]},
            oracle="forward",
        ),
        MatrixCase(
            "GPT-2 tied wte + lm_head LoRA (ensure_weight_tying)",
            "gpt2_tied",
            {"target_modules": ["wte", "lm_head"], "ensure_weight_tying": True},
            oracle="forward",
        ),
        MatrixCase(
            "Llama layer_replication",
            "llama",
            {"target_modules": ["q_proj", "v_proj"], "layer_replication": [[0, 2], [1, 2]]},
            oracle="forward",
        ),
    ]


CASES: list[MatrixCase] = [*peft_cases(), *extra_cases()]

# --------------------------------------------------------------------------------------------
# Building and classifying


@dataclass
class Outcome:
    case: str
    verdict: str
    detail: str  # the refusal message, the tolerance used, or what differs
    max_rel_err: float = 0.0
    known: str | None = None  # the case's xfail reason (a known bug awaiting its fix)


@dataclass
class Results:
    """Outcomes of the session, printed by tests/conftest.py's terminal summary."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def summary_lines(self) -> list[str]:
        if not self.outcomes:
            return []
        by: dict[str, list[Outcome]] = {}
        for o in self.outcomes.values():
            by.setdefault(o.verdict, []).append(o)
        counts = ", ".join(
            f"{v} {len(by.get(v, []))}" for v in (BIT_IDENTICAL, WITHIN_TOLERANCE, REFUSED)
        )
        wrong = by.get(WRONG, [])
        known = sum(o.known is not None for o in wrong)
        lines = [
            f"PEFT LoRA matrix: {len(self.outcomes)} cases: {counts}, wrong = {len(wrong)}"
            + (f" ({known} known, marked xfail strict)" if known else "")
        ]
        for o in by.get(WITHIN_TOLERANCE, []):
            lines.append(f"  within tolerance: {o.case}: {o.detail}")
        for o in by.get(REFUSED, []):
            lines.append(f"  refused: {o.case}: {o.detail}")
        for o in wrong:
            lines.append(f"  WRONG: {o.case}: {o.detail}" + (f" [{o.known}]" if o.known else ""))
        return lines


RESULTS = Results()


def _lora_config(lora: Mapping[str, Any]) -> Any:
    """A LoraConfig from plain kwargs; nested sub-configs are given as dicts."""
    from peft import LoraConfig

    kw = dict(lora)
    kw.setdefault("init_lora_weights", False)
    kw.setdefault("r", 8)  # peft's default, spelled out: the patterns and KaSA depend on it
    subs = {
        "use_bdlora": _bdlora,
        "kasa_config": lambda **k: _sub("KasaConfig", **k),
        "velora_config": lambda **k: _sub("VeloraConfig", **k),
        "monteclora_config": lambda **k: _sub("MontecloraConfig", **k),
    }
    for key, make in subs.items():
        if isinstance(kw.get(key), dict):
            kw[key] = make(**kw[key])
    return LoraConfig(**kw)


def _save_base(model: Model, case: MatrixCase, folder: Path) -> None:
    torch.manual_seed(0)
    module = model.make()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * po.BASE_STD)
    module = module.to(case.base_dtype)
    folder.mkdir(parents=True)
    if model.hf:
        module.save_pretrained(str(folder))
        return
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if case.config is not None:
        (folder / "config.json").write_text(json.dumps(case.config))


def _load_base(model: Model, folder: Path) -> nn.Module:
    if model.hf:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto").eval()
    torch.manual_seed(0)
    state = po.load_folder_tensors(folder)
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    module = model.make().to(dtype)  # in the stored dtype, as from_pretrained(dtype="auto")
    module.load_state_dict(state, strict=True)
    return module.eval()


def _forward(module: nn.Module, model: Model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = module(input_ids=x, use_cache=False).logits if model.hf else module(x)
    return out.detach().float().clone()


def _merged_reference(model: Model, peft_model: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload(), as stored on disk (transformers writes per-expert keys)."""
    merged = peft_model.merge_and_unload()
    if model.hf:
        merged.save_pretrained(str(folder))
        return po.load_folder_tensors(folder)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@dataclass
class Built:
    base: Path
    adapter: Path
    initial: Path | None
    trained_output: torch.Tensor
    reference: dict[str, torch.Tensor] | None  # PEFT merge (oracle "merge")


def build(case: MatrixCase, root: Path) -> Built:
    """Saves the base and the PEFT adapter under ``root``; computes PEFT's reference."""
    from peft import PeftModel, get_peft_model

    model = MODELS[case.model]
    base, adapter = root / "base", root / "adapter"
    initial = root / "initial" if case.initial_adapter else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _save_base(model, case, base)
        torch.manual_seed(1)
        peft_model = get_peft_model(_load_base(model, base), _lora_config(case.lora))
        if initial is not None:
            peft_model.save_pretrained(str(initial))
        with torch.no_grad():  # "training": every trainable tensor moves
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * ADAPTER_STD)
        peft_model.eval()
        x = model.inputs()
        trained = _forward(peft_model, model, x)
        peft_model.save_pretrained(str(adapter))
        del peft_model
        reference = None
        if case.oracle == "merge":
            reloaded = PeftModel.from_pretrained(_load_base(model, base), str(adapter)).eval()
            reference = _merged_reference(model, reloaded, root / "peft_merged")
    return Built(base, adapter, initial, trained, reference)


def compare_tensors(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]
) -> tuple[str, str, float]:
    if got.keys() != want.keys():
        extra, missing = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
        return WRONG, f"tensor names differ: extra {extra[:3]}, missing {missing[:3]}", float("inf")
    worst, where = 0.0, ""
    identical = True
    for k, ref in want.items():
        g = got[k]
        if g.shape != ref.shape or g.dtype != ref.dtype:
            return WRONG, f"{k}: {g.dtype}{list(g.shape)} vs PEFT {ref.dtype}{list(ref.shape)}", 1.0
        if torch.equal(g, ref):
            continue
        identical = False
        err = float(
            (g.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)
        )
        if err > worst:
            worst, where = err, k
    if identical:
        return BIT_IDENTICAL, "torch.equal on every tensor", 0.0
    detail = f"max rel err {worst:.3g} on {where} (tolerance {RTOL:g})"
    return (WITHIN_TOLERANCE if worst <= RTOL else WRONG), detail, worst


def run_case(case: MatrixCase, root: Path) -> Outcome:
    """Builds ``case``, merges it with loracc and classifies the result (see the module doc)."""
    import loracc

    built = build(case, root)
    out = root / "loracc_out"
    model = MODELS[case.model]
    try:
        loracc.merge(
            str(built.base),
            str(built.adapter),
            str(out),
            initial_adapter=None if built.initial is None else str(built.initial),
            layout=case.layout,
            workers=1,
        )
    except loracc.LoraccError as e:
        verdict = REFUSED if e.exit_code == 2 else WRONG
        reason = str(e).replace(f"{root}/", "")
        outcome = Outcome(case.name, verdict, f"exit {e.exit_code}: {reason}")
    else:
        if built.reference is not None:
            verdict, detail, err = compare_tensors(po.load_folder_tensors(out), built.reference)
            outcome = Outcome(case.name, verdict, detail, err)
        else:
            got = _forward(_load_base(model, out), model, model.inputs())
            err = po.rel_err(got, built.trained_output)
            ok = err <= FORWARD_RTOL
            detail = (
                f"forward vs PEFT's unmerged forward: rel err {err:.3g} "
                f"(tolerance {FORWARD_RTOL:g})"
            )
            outcome = Outcome(case.name, WITHIN_TOLERANCE if ok else WRONG, detail, err)
    outcome.known = case.xfail
    RESULTS.outcomes[case.name] = outcome
    return outcome
