"""Build tests/fixtures/optimum_llama/: a tiny Llama exported by optimum-onnx, with PEFT's outputs.

optimum-onnx pins transformers 4.57, which the project's venv does not share, so this script runs
once in a venv of its own and its results (about 250 KB) are checked in::

    python3 -m venv /tmp/optimum-venv
    /tmp/optimum-venv/bin/pip install optimum-onnx==0.1.0 peft==0.21.2 torch==2.13.0 \\
        onnxruntime==1.32.0 click regex "onnx-ir>=1.1"
    PYTHONPATH=. /tmp/optimum-venv/bin/python scripts/build_optimum_fixture.py

(``PYTHONPATH=.`` makes this checkout's loracc importable there for the last step.)

What it writes:

* ``config.json``, ``generation_config.json``: a seeded Llama (hidden 32, vocab 128, 2 layers,
  GQA 4/2 heads, untied ``lm_head``), its weights rounded to fp16 values;
* ``past/model.onnx``: ``optimum.exporters.onnx.main_export(task="text-generation-with-past")``
  (inputs ``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.N.key/value``;
  outputs ``logits``, ``present.N.key/value``); ``nopast/model.onnx``: ``task="text-generation"``;
* ``adapters/lora``: LoRA r=4 on q/v/o/down_proj; ``adapters/rslora``: rsLoRA r=2 on
  k/gate_proj and ``lm_head``; random non-zero factors (``init_lora_weights=False``);
* ``expected.npz``: ``input_ids``, the float64 logits of the unmerged ``PeftModel`` forward of
  the saved folders (``base``: the plain model) and ``<case>_greedy``, the next 8 tokens PEFT's
  ``generate`` picks greedily: the oracle, never loracc;
* ``generate.json``: the tokens the real ``ORTModelForCausalLM.generate`` picks greedily on
  loracc's keep-lora export of each graph (empty slots, the two adapter files), with the
  session wrapped by ``loracc.adapter_session`` and the requests base, lora, rslora, base, once
  through ``session.run`` and once through IOBinding (``use_io_binding=True``, CPU); and on the
  merged export of each adapter. The script fails when any differs from PEFT's.
* ``versions.json``: the tool versions used.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "optimum_llama"
INPUT_IDS = [[1, 17, 42, 99, 120, 7, 3, 64, 33, 5]]
SEED = 4321
GREEDY = 8
EXPORTS = {"past": "text-generation-with-past", "nopast": "text-generation"}
REQUESTS = ["base", "lora", "rslora", "base"]


def _cases() -> dict[str, Any]:
    from peft import LoraConfig

    return {
        "lora": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            init_lora_weights=False,
        ),
        "rslora": LoraConfig(
            r=2, lora_alpha=4, use_rslora=True,
            target_modules=["k_proj", "gate_proj", "lm_head"], init_lora_weights=False,
        ),
    }  # fmt: skip


def _base(folder: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
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
    model.save_pretrained(folder)
    return model


def _peft_outputs(hf: Path, adapters: Path, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """PEFT's float64 logits and greedy tokens for the saved folders, loaded back as a user
    would."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = {"input_ids": ids.numpy()}
    for name in ["base", *_cases()]:
        model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float64).eval()
        if name != "base":
            model = PeftModel.from_pretrained(model, adapters / name).eval()
        with torch.no_grad():
            out[name] = model(ids).logits.numpy()
            tokens = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY,
                do_sample=False, pad_token_id=2, eos_token_id=None,
            )  # fmt: skip
        out[f"{name}_greedy"] = tokens[:, ids.shape[1] :].numpy()
    return out


def _export(hf: Path, out: Path, task: str) -> None:
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as tmp:
        main_export(str(hf), output=tmp, task=task, device="cpu", do_validation=False)
        out.mkdir(parents=True)
        for f in Path(tmp).iterdir():
            if f.suffix in (".onnx", ".data") or f.name == "model.onnx_data":
                shutil.copy(f, out / f.name)


def _greedy(folder: Path, use_cache: bool, io_binding: bool, adapters: dict[str, Path],
            ids: torch.Tensor) -> dict[str, list[int]]:  # fmt: skip
    """``ORTModelForCausalLM.generate`` per request, the session wrapped by loracc."""
    from optimum.onnxruntime import ORTModelForCausalLM

    import loracc

    model = ORTModelForCausalLM.from_pretrained(
        folder, use_cache=use_cache, use_io_binding=io_binding, provider="CPUExecutionProvider"
    )
    wrapped = loracc.adapter_session(model.session, adapters)
    model.session = wrapped
    tokens = {}
    for i, name in enumerate(REQUESTS if adapters else ["base"]):
        with wrapped.active(None if name == "base" else name):
            got = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY,
                do_sample=False, pad_token_id=2, eos_token_id=None,
            )  # fmt: skip
        tokens[f"{i}:{name}"] = got[0, ids.shape[1] :].tolist()
    return tokens


def _record(out: Path, ids: torch.Tensor) -> dict[str, Any]:
    """The real ORTModelForCausalLM on loracc's exports of the checked-in graphs."""
    import loracc

    record: dict[str, Any] = {"requests": REQUESTS}
    adapters = {name: out / "adapters" / name for name in _cases()}
    with tempfile.TemporaryDirectory() as tmp:
        for export in EXPORTS:
            base = out / export / "model.onnx"
            keep = Path(tmp) / export / "keep"
            keep.mkdir(parents=True)
            report = loracc.export_onnx(
                base, list(adapters.values()), keep / "model.onnx", keep_lora=True
            )
            files = {Path(f["adapter"]).name: Path(f["file"]) for f in report.adapter_files}
            folders = {"keep": keep}
            for name, adapter in adapters.items():
                folders[name] = Path(tmp) / export / f"merged_{name}"
                folders[name].mkdir()
                loracc.export_onnx(base, adapter, folders[name] / "model.onnx")
            for folder in folders.values():
                for f in ("config.json", "generation_config.json"):
                    shutil.copy(out / f, folder / f)
            use_cache = export == "past"
            record[export] = {
                "run": _greedy(keep, use_cache, False, files, ids),
                "iobinding": _greedy(keep, use_cache, True, files, ids),
                **{
                    f"merged_{name}": _greedy(folders[name], use_cache, False, {}, ids)["0:base"]
                    for name in adapters
                },
            }
    return record


def _check(record: dict[str, Any], expected: dict[str, np.ndarray]) -> list[str]:
    bad = []
    for export in EXPORTS:
        for path in ("run", "iobinding"):
            for key, tokens in record[export][path].items():
                case = key.split(":")[1]
                if tokens != expected[f"{case}_greedy"][0].tolist():
                    bad.append(f"{export} {path} {key}: {tokens}")
        for case in _cases():
            if record[export][f"merged_{case}"] != expected[f"{case}_greedy"][0].tolist():
                bad.append(f"{export} merged {case}: {record[export][f'merged_{case}']}")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    out: Path = parser.parse_args().out
    import onnxruntime
    import optimum.version
    import peft
    import transformers
    from peft import get_peft_model

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ids = torch.tensor(INPUT_IDS, dtype=torch.int64)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        base = _base(hf)
        for f in ("config.json", "generation_config.json"):
            shutil.copy(hf / f, out / f)
        for export, task in EXPORTS.items():
            _export(hf, out / export, task)
        for name, config in _cases().items():
            torch.manual_seed(SEED + len(name))
            get_peft_model(copy.deepcopy(base), config).save_pretrained(out / "adapters" / name)
            (out / "adapters" / name / "README.md").unlink(missing_ok=True)
        expected = _peft_outputs(hf, out / "adapters", ids)
    np.savez(out / "expected.npz", **expected)
    record = _record(out, ids)
    text = re.sub(r"\[\s+([^\]]*?)\s+\]", lambda m: "[" + " ".join(m[1].split()) + "]",
                  json.dumps(record, indent=1))  # fmt: skip
    (out / "generate.json").write_text(text + "\n")
    versions = {
        "optimum": optimum.version.__version__,
        "optimum_onnx": _version("optimum-onnx"),
        "onnxruntime": onnxruntime.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size // 1024} KB")
    bad = _check(record, expected)
    if bad:
        print("ORTModelForCausalLM's tokens differ from PEFT's:\n  " + "\n  ".join(bad))
        return 1
    print("ORTModelForCausalLM.generate with loracc.adapter_session: PEFT's greedy tokens")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
