"""Build tests/fixtures/olive_*/: tiny slotted models written by Olive's own ExtractAdapters pass.

Olive (``olive-ai``) pins packages loracc's venv does not share, so it is not a test dependency:
this script runs once with Olive importable and the results (kilobytes) are checked in. Olive is
installed beside the venv, not into it::

    pip download --no-deps olive-ai==0.13.0 -d /tmp/olive_dl
    pip install --no-deps --target /tmp/olive_pkgs /tmp/olive_dl/olive_ai-0.13.0-py3-none-any.whl
    # plus, also --no-deps into /tmp/olive_pkgs: requests urllib3 certifi opentelemetry-sdk
    # opentelemetry-api opentelemetry-semantic-conventions torchmetrics lightning_utilities
    # optuna colorlog
    PYTHONPATH=/tmp/olive_pkgs python scripts/build_olive_fixture.py tests/fixtures

``olive_adapters`` holds the PEFT adapters (``all``: q/k/v/o r=4; ``qv``: r=2; ``fused``: on the
same function with a fused ``qkv_proj``, r=3) and ``reference.npz``: the input ``x``, the base
output and each adapter's unmerged PEFT output. The model is ``tests/e2e/test_adapter_files.py``'s
``Tiny``: two layers of ``model.layers.N.self_attn.{q,k,v,o}_proj``. Each model folder holds
what a user of Olive has: ``model.onnx`` (the ``all`` PEFT model exported the way Olive exports
one, the scale folded into B by ``olive.common.hf.peft.make_export_compatible_peft``, then
ExtractAdapters with its defaults: graph inputs with rank-0 defaults, symbolic ``lora_r``) and
``adapter_weights.onnx_adapter`` (Olive's file for that adapter).

* ``olive_dynamo``: ``torch.onnx.export(dynamo=True)``; Olive names the slots after the
  ``folded_from`` metadata (``model.layers.0.self_attn.q_proj.lora_A.default.weight``).
* ``olive_torchscript``: ``torch.onnx.export(dynamo=False)``; Olive names the slots after the
  node paths (``model.layers.0.self_attn.q_proj.lora_A.weight``).

Olive 0.13 lists every slot twice among the graph inputs (onnxruntime accepts that).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from tests.support.tiny_attention import H, Tiny, fused_copy, peft_adapter

ADAPTERS = {  # name: (targets, r, alpha, seed, fused base)
    "all": (["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8, 1, False),
    "qv": (["q_proj", "v_proj"], 2, 6, 2, False),
    "fused": (["qkv_proj", "o_proj"], 3, 6, 3, True),
}


def build_adapters(out: Path) -> dict[str, object]:
    """The PEFT adapters and ``reference.npz`` (``x``, the base output, each adapter's)."""
    torch.manual_seed(0)
    base = Tiny().eval()
    fused = fused_copy(base)
    x = torch.randn(1, 5, H)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ref = {"x": x.numpy()}
    models = {}
    with torch.no_grad():
        ref["base"] = base(x).numpy()
        for name, (targets, r, alpha, seed, is_fused) in ADAPTERS.items():
            peft_model = peft_adapter(fused if is_fused else base, out / name, targets,
                                  r=r, alpha=alpha, seed=seed)  # fmt: skip
            (out / name / "README.md").unlink()  # peft's model card template
            ref[name] = peft_model(x).numpy()
            models[name] = peft_model
    np.savez(out / "reference.npz", **ref)
    return {"x": x, **models}


def build_model(out: Path, peft_model: object, x: torch.Tensor, dynamo: bool) -> None:
    """``model.onnx`` + Olive's ``adapter_weights.onnx_adapter`` for ``peft_model``."""
    from olive.common.hf.peft import make_export_compatible_peft
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict
    from olive.passes.onnx.extract_adapters import ExtractAdapters

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "peft.onnx"
        model = make_export_compatible_peft(copy.deepcopy(peft_model))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                program = torch.onnx.export(
                    model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                    dynamic_shapes=({1: torch.export.Dim("seq")},),
                )  # fmt: skip
                program.save(str(exported))
            else:
                torch.onnx.export(
                    model, (x,), str(exported), dynamo=False, input_names=["x"],
                    output_names=["y"], dynamic_axes={"x": {1: "seq"}}, opset_version=17,
                )  # fmt: skip
        extract = create_pass_from_dict(ExtractAdapters, {}, disable_search=True)
        result = extract.run(ONNXModelHandler(model_path=str(exported)), str(Path(tmp) / "olive"))
        onnx_path = Path(result.model_path)
        folder = onnx_path if onnx_path.is_dir() else onnx_path.parent
        for f in folder.iterdir():
            if f.suffix in (".onnx", ".onnx_adapter", ".data"):
                shutil.copy(f, out / ("model.onnx" if f.suffix == ".onnx" else f.name))
    print(f"{out}: {sorted(p.name for p in out.iterdir())}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="the fixtures folder (tests/fixtures)")
    args = p.parse_args(argv)
    made = build_adapters(args.root / "olive_adapters")
    x = made["x"]
    assert isinstance(x, torch.Tensor)
    build_model(args.root / "olive_dynamo", made["all"], x, dynamo=True)
    build_model(args.root / "olive_torchscript", made["all"], x, dynamo=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
