"""Build tests/fixtures/genai_llama/: an onnxruntime-genai model-builder graph + PEFT adapters.

What it writes (about 600 KB; run it again to rebuild everything from the seed):

* ``hf/``: a seeded tiny Llama (hidden 64, vocab 256, 2 layers, untied ``lm_head``) saved by
  transformers in fp16 (every weight is fp16-representable, so the fp32 graph holds the same
  values), with a 256-entry byte-level tokenizer (the builder needs one);
* ``genai/``: what ``python -m onnxruntime_genai.models.builder -i hf -o genai -p fp32 -e cpu``
  writes (model.onnx + model.onnx.data, genai_config.json, tokenizer files). Its weights are
  ``<module>.MatMul.weight`` stored (in, out), read by MatMul without a Transpose, with
  ``attn.qkv_proj`` fused;
* ``genai_fp16/``: the same with ``-p fp16`` (fp16 activations and weights, q/k/v split,
  MultiHeadAttention); ``genai_int4/``: ``-p int4`` (``MatMulNBits`` int4, block 32,
  accuracy_level 4, ``lm_head`` too, fp32 activations, fused ``qkv_proj``);
* ``adapters/<case>/``: PEFT ``save_pretrained`` folders with random, non-zero factors:
  ``lora_lm_head`` (q/v/down_proj + ``lm_head``), ``save_lm_head`` (o_proj LoRA +
  ``modules_to_save=["lm_head"]``, retrained), ``dora_lm_head`` (DoRA on o_proj/down_proj/
  ``lm_head``, magnitudes moved off the weight norms), ``lora_attn`` (q/v/down_proj, no
  ``lm_head``: the adapter the quantized builds can take, their ``lm_head`` being int4);
* ``expected.npz``: ``input_ids`` and the logits PEFT computes for them in float64 (the
  unmerged ``PeftModel`` forward of the saved folders, eval mode; ``base`` for the plain
  model) and ``<case>_greedy``, the next 8 tokens PEFT's ``generate`` picks greedily: the
  oracle, never loracc;
* ``expected_int4.npz``: PEFT's float64 logits (``base``, ``lora_attn``) on the float model
  whose Linear weights are ``genai_int4``'s MatMulNBits weights dequantized (numpy, from the
  op's definition): the int4 base plus PEFT's LoRA branch, through the whole network.

onnxruntime-genai installs beside the project's onnxruntime and transformers without changing
them (it needs ``onnxruntime>=1.31``), but the project does not depend on it: run
``pip install onnxruntime-genai`` in the venv first. Offline: the model and tokenizer are made
here and the builder reads the local folder (``-i``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "genai_llama"
INPUT_IDS = [[1, 17, 42, 99, 200, 7, 3, 128, 64, 255]]
SEED = 1234
GREEDY = 8  # tokens PEFT generates greedily after INPUT_IDS
PRECISIONS = {"genai": "fp32", "genai_fp16": "fp16", "genai_int4": "int4"}  # folder: -p


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=alphabet[1], eos_token=alphabet[2]
    )
    fast.save_pretrained(folder)


def _base(folder: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.half().save_pretrained(folder)
    _tokenizer(folder)
    return model.float()


def _perturb(model: torch.nn.Module, needle: str, scale: float) -> None:
    """Move parameters whose name has ``needle`` off their initial values (seeded)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if needle in name:
                p.add_(torch.randn_like(p) * scale)


def _adapters(
    base: torch.nn.Module, hf: Path, out: Path, ids: torch.Tensor
) -> dict[str, np.ndarray]:
    import copy

    from peft import LoraConfig, get_peft_model

    cases = {
        "lora_lm_head": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
            init_lora_weights=False,
        ),
        "save_lm_head": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["o_proj"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
        "dora_lm_head": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["o_proj", "down_proj", "lm_head"],
            use_dora=True,
            init_lora_weights=False,
        ),
        "lora_attn": LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
        ),
    }
    for name, config in cases.items():
        torch.manual_seed(SEED + len(name))
        model = get_peft_model(copy.deepcopy(base), config).eval()
        _perturb(model, "modules_to_save", 0.05)
        _perturb(model, "lora_magnitude_vector", 0.1)
        model.save_pretrained(out / name)
        for readme in (out / name).glob("README.md"):
            readme.unlink()
    return _logits(hf, out, list(cases), ids)


def _logits(
    hf: Path,
    adapters: Path,
    cases: list[str],
    ids: torch.Tensor,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """PEFT's logits for the saved folders, loaded back as a user would, in float64: PEFT's own
    fp32 forward is 1.2e-5 (relative) off the fp64 one on the lm_head LoRA case, while an fp32
    onnxruntime run of a correct export is 5e-7 off."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    logits = {}
    for name in ["base", *cases]:
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64).eval()
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        if name != "base":
            model = PeftModel.from_pretrained(model, adapters / name).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits.numpy()
            tokens = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY,
                do_sample=False, pad_token_id=2, eos_token_id=None,
            )  # fmt: skip
        logits[f"{name}_greedy"] = tokens[:, ids.shape[1] :].numpy()
    return logits


def _build(hf: Path, out: Path, base: torch.nn.Module) -> None:
    """The builder on an fp32 copy of ``hf`` (the checked-in copy is fp16 to stay small), once
    per precision."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "hf32"
        base.save_pretrained(fp32)
        for f in hf.glob("tokenizer*"):
            shutil.copy(f, fp32 / f.name)
        for folder, precision in PRECISIONS.items():
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
            cmd += ["-i", str(fp32), "-o", str(out / folder), "-p", precision, "-e", "cpu"]
            cmd += ["-c", str(Path(tmp) / "cache")]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dequantized_weights(model_path: Path) -> dict[str, torch.Tensor]:
    """The HF state-dict entries (``<module>.weight``, (out, in)) of every MatMulNBits node of a
    builder graph, dequantized as the op defines: (q - zero_point) * scale per block; the fused
    ``attn.qkv_proj`` rows split into q/k/v (q: hidden rows, k and v: the rest halved)."""
    import onnx
    from onnx import numpy_helper

    from tests.support.nbits import dequantize

    model = onnx.load(str(model_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out: dict[str, torch.Tensor] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        w = dequantize(node, inits)
        n, k = w.shape
        # "/model/layers.0/attn/qkv_proj/MatMul_Q4" -> "model.layers.0.attn.qkv_proj"
        module = ".".join(p for p in node.name.split("/")[1:-1] if p)
        if module.endswith(".attn.qkv_proj"):
            kv = (n - k) // 2
            parent = module.removesuffix(".attn.qkv_proj") + ".self_attn"
            for proj, rows in zip(
                ("q_proj", "k_proj", "v_proj"), np.split(w, [k, k + kv]), strict=True
            ):
                out[f"{parent}.{proj}.weight"] = torch.from_numpy(rows)
            continue
        out[module.replace(".attn.", ".self_attn.") + ".weight"] = torch.from_numpy(w)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    out: Path = parser.parse_args().out
    try:
        import onnxruntime_genai
    except ImportError:
        sys.exit("onnxruntime-genai is not installed: pip install onnxruntime-genai")
    import peft
    import transformers

    if out.exists():
        shutil.rmtree(out)
    hf = out / "hf"
    base = _base(hf)
    _build(hf, out, base)
    ids = torch.tensor(INPUT_IDS, dtype=torch.int64)
    logits = _adapters(base, hf, out / "adapters", ids)
    np.savez(out / "expected.npz", input_ids=ids.numpy(), **logits)
    weights = dequantized_weights(out / "genai_int4" / "model.onnx")
    int4 = _logits(hf, out / "adapters", ["lora_attn"], ids, weights)
    np.savez(out / "expected_int4.npz", input_ids=ids.numpy(), **int4)
    versions = {
        "onnxruntime_genai": onnxruntime_genai.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size // 1024} KB, cases {sorted(logits)}")


if __name__ == "__main__":
    main()
