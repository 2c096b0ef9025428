"""Reading an adapter from its header only (``inspect`` without a base, issue 16 item 3).

The NaN/Inf test on a tensor's bits is checked against ``torch.isfinite`` for every floating
dtype safetensors names, and the header-only reader against the reader with values where a site
needs values (BD-LoRA's block diagonal, KaSA's product): the same sites, and torch only there.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loracc.io.peft import HeaderTensor, read_peft_adapter
from loracc.io.safetensors import SafetensorsFile, all_finite
from tests.support import make_corpus as mc

_SPECIAL = [0.0, -0.0, 1.5, -2.0, 1e-40, math.nan, math.inf, -math.inf]
_FLOATS = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


@pytest.mark.parametrize("dtype", _FLOATS, ids=str)
def test_all_finite_on_bits_agrees_with_torch(dtype: torch.dtype, tmp_path: Path) -> None:
    """Each special value alone, and the dtype's extremes: the bit test says what torch says."""
    values = [*_SPECIAL, torch.finfo(dtype).max, torch.finfo(dtype).min, torch.finfo(dtype).tiny]
    tensors = {f"v{i}": torch.tensor([1.0, v]).to(dtype) for i, v in enumerate(values)}
    tensors["int"] = torch.tensor([-1, 2**31 - 1], dtype=torch.int32)
    tensors["empty"] = torch.empty(0, 3, dtype=dtype)
    save_file(tensors, str(tmp_path / "t.safetensors"))
    infos = SafetensorsFile(tmp_path / "t.safetensors").tensors
    got = {k: all_finite(infos[k]) for k in tensors}
    want = {k: bool(torch.isfinite(t.float()).all()) for k, t in tensors.items()}
    assert got == want
    assert not all(got.values())  # not vacuous: NaN is among them (Inf too, where it exists)


_BDLORA = {"nblocks": 2, "target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["v_proj"]}


def _variant_adapter(folder: Path, variant: str) -> Path:
    """A BD-LoRA adapter (q_proj's lora_A, v_proj's lora_B stored as blocks) or a KaSA one."""
    tensors = mc.adapter_tensors()
    config = dict(mc.ADAPTER_CONFIG)
    if variant == "bdlora":
        config["use_bdlora"] = _BDLORA
        for key in list(tensors):
            if ("q_proj" in key and "lora_A" in key) or ("v_proj" in key and "lora_B" in key):
                tensors[key] = tensors[key][:, : tensors[key].shape[1] // 2].contiguous()
    else:
        config["kasa_config"] = {}
        for key in [k for k in tensors if k.endswith("lora_A.weight")]:
            tensors[key.replace("lora_A.weight", "lora_diag")] = torch.rand(mc.RANK) + 0.5
    mc.write_adapter(folder, tensors, config)
    return folder


def _sites(folder: Path, header_only: bool) -> list[tuple[object, ...]]:
    adapter = read_peft_adapter(folder, header_only=header_only)
    return [
        (s.module, s.kind, s.logical_shape(), s.rank, s.scale, s.variant, s.num_params)
        for s in adapter.sites
    ]


@pytest.mark.parametrize("variant", ["bdlora", "kasa"])
def test_sites_that_need_values_read_them(variant: str, tmp_path: Path) -> None:
    folder = _variant_adapter(tmp_path / variant, variant)
    assert _sites(folder, header_only=True) == _sites(folder, header_only=False)
    adapter = read_peft_adapter(folder, header_only=True)
    changed = [s for s in adapter.sites if not isinstance(s.lora_B, HeaderTensor)]
    if variant == "kasa":  # B·diag(lora_diag): computed, equal to the values path's
        assert len(changed) == len(adapter.sites)
        with_values = read_peft_adapter(folder)
        for a, b in zip(adapter.sites, with_values.sites, strict=True):
            assert torch.equal(a.lora_B, b.lora_B)
    else:  # v_proj's lora_B and q_proj's lora_A expanded to their full square
        assert {s.module.rsplit(".", 1)[1] for s in changed} == {"v_proj"}
        assert all(s.logical_shape() == (mc.HIDDEN, mc.HIDDEN) for s in adapter.sites)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plain")
    mc.write_adapter(folder)
    return folder


def test_plain_header_read_imports_no_torch(plain: Path) -> None:
    """In a fresh interpreter: a plain adapter read from its header leaves torch unloaded."""
    code = (
        "import sys\n"
        "from loracc.io.peft import read_peft_adapter\n"
        f"a = read_peft_adapter({str(plain)!r}, header_only=True)\n"
        "print(len(a.sites), 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [str(mc.LAYERS * len(mc.TARGETS)), "False"], done.stderr


def test_header_only_refuses_a_base(plain: Path) -> None:
    with pytest.raises(ValueError, match="header_only"):
        read_peft_adapter(plain, object(), header_only=True)  # type: ignore[arg-type]
