"""The streamed merge (row blocks, positional writes) gives the same bytes as the whole-tensor path.

The PEFT-oracle tests merge tiny models whose tensors fit in one block, so here ``_BLOCK`` is made
small enough that every LoRA target is split into several row blocks (the remainder joined to the
last one), and the output is compared byte for byte with a merge that computes every tensor whole
(``_streamable`` forced off), which the oracle tests tie to PEFT. The last tests tie the streamed
path to PEFT directly: LoRA, target_parameters, rsLoRA + lora_bias, DoRA, embeddings and a bf16
base, each edited tensor in 3-5 row blocks, bit-identical to ``merge_and_unload()`` (a block
that reads, scales or writes block 0's rows fails them).
"""

from __future__ import annotations

import ctypes
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

import loracc
from loracc.errors import NonFiniteError
from loracc.io.safetensors import SafetensorsFile, SafetensorsWriter
from loracc.lower import merge as M
from scripts import bench_merge


@pytest.fixture(scope="module")
def bench():
    return bench_merge


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(SafetensorsFile(path).read_all())
    return out


def _merge(base: Path, adapter: Path, out: Path, monkeypatch, *, stream: bool, **kw) -> None:
    with monkeypatch.context() as m:
        m.setattr(M, "_BLOCK", 64 * 128)  # 64-row blocks: gate/up (320 x 128) -> 4 blocks
        if not stream:
            m.setattr(M, "_streamable", lambda item: False)
        loracc.merge(str(base), str(adapter), str(out), **kw)


@pytest.mark.parametrize(
    ("dtype", "alpha", "out_dtype"),
    [
        (torch.bfloat16, 24, None),  # scale 1.5
        (torch.float16, 16, None),  # scale 1: the multiply is skipped
        (torch.float32, 7, None),
        (torch.bfloat16, 24, "float16"),  # a cast on every tensor, edited or not
    ],
)
def test_stream_equals_whole_tensor(tmp_path, monkeypatch, bench, dtype, alpha, out_dtype):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    bench.make_base("tiny", base, 200_000, dtype)  # several shards
    bench.make_adapter("tiny", adapter, base, alpha=alpha)
    assert len(list(base.glob("*.safetensors"))) > 1
    _merge(base, adapter, tmp_path / "s", monkeypatch, stream=True, dtype=out_dtype)
    _merge(base, adapter, tmp_path / "w", monkeypatch, stream=False, dtype=out_dtype)
    got, want = _tensors(tmp_path / "s"), _tensors(tmp_path / "w")
    assert got.keys() == want.keys()
    for key, ref in want.items():
        assert got[key].dtype == ref.dtype and got[key].shape == ref.shape, key
        assert torch.equal(got[key].view(torch.uint8), ref.view(torch.uint8)), key
    changed = [k for k in want if "mlp.up_proj" in k]
    orig = _tensors(base)
    assert changed and not torch.equal(got[changed[0]].float(), orig[changed[0]].float())


def test_row_blocks_never_small():
    for rows in range(1, 700):
        for cols in (1, 7, 128, 4096, 100_000):
            blocks = M._row_blocks(rows, cols)
            assert blocks[0][0] == 0 and blocks[-1][1] == rows
            assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
            if len(blocks) > 1:
                assert min(r1 - r0 for r0, r1 in blocks) >= M._MIN_ROWS


def _poison(base: Path, key: str, row: int, value: float) -> None:
    """Rewrite the shard holding ``key`` with one element of row ``row`` set to ``value``."""
    for path in sorted(base.glob("*.safetensors")):
        f = SafetensorsFile(path)
        if key not in f.tensors:
            continue
        order = f.keys()  # file order
        tensors = {k: f.read(k).clone() for k in order}
        tensors[key][row, 3] = value
        tmp = path.with_suffix(".tmp")
        writer = SafetensorsWriter(tmp, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
        for k, t in tensors.items():
            writer.write(k, t)
        writer.close()
        tmp.replace(path)
        return
    raise AssertionError(key)


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_nonfinite_in_a_late_block(tmp_path, monkeypatch, bench, value):
    """A NaN or Inf in the last row block of a tensor is refused, and written when allowed."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    bench.make_base("tiny", base, 10**9)
    bench.make_adapter("tiny", adapter, base)
    _poison(base, "model.layers.1.mlp.gate_proj.weight", 300, value)  # rows 192..320: block 4
    with pytest.raises(NonFiniteError, match=r"layers\.1\.mlp\.gate_proj.*NaN or Inf"):
        _merge(base, adapter, tmp_path / "s", monkeypatch, stream=True)
    _merge(base, adapter, tmp_path / "ok", monkeypatch, stream=True, allow_nonfinite=True)


def test_overflow_when_rounded(tmp_path, monkeypatch, bench):
    """Finite in fp32 but past fp16's range once rounded: the tensor as written is checked."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    bench.make_base("tiny", base, 10**9, torch.float16)
    bench.make_adapter("tiny", adapter, base, alpha=1e9)  # |delta| ~ 1e5 > 65504
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        _merge(base, adapter, tmp_path / "s", monkeypatch, stream=True)


# --------------------------------------------------------------------------------------------
# Against PEFT: tensors of several row blocks, merged by the streamed path, equal PEFT's merge.


def _stream_peft_cases():
    pytest.importorskip("peft")
    from tests.support import peft_matrix_cases as pm

    param = {"target_modules": ["up", "down"], "target_parameters": ["head.weight"]}
    linear = {"target_modules": ["up", "down", "head"]}
    case = pm.MatrixCase
    return pm, {
        "lora": case("stream lora", "Wide", {**param, "lora_alpha": 24}),
        "rslora+bias": case(
            "stream rslora", "Wide", {**linear, "use_rslora": True, "lora_bias": True}
        ),
        "dora": case("stream dora", "Wide", {"target_modules": ["up", "down"], "use_dora": True}),
        "embedding": case("stream emb", "Wide", {"target_modules": ["emb", "down"]}),
        # Linear only: peft rounds a target_parameters delta to bf16 before adding it (twice).
        "bf16 base": case("stream bf16", "Wide", linear, base_dtype=torch.bfloat16),
    }


@pytest.mark.parametrize("variant", ["lora", "rslora+bias", "dora", "embedding", "bf16 base"])
@pytest.mark.parametrize("out_dtype", [None, "bfloat16"])
def test_streamed_blocks_equal_peft_merge(tmp_path, monkeypatch, variant, out_dtype):
    """Every edited 2-D tensor spans 3-5 row blocks of 64 rows (and a cast streams every tensor);
    the output equals PEFT's merge_and_unload() bit for bit, rounded once to --dtype."""
    pm, cases = _stream_peft_cases()
    case = cases[variant]
    built = pm.build(case, tmp_path)
    assert built.reference is not None
    streamed: dict[str, int] = {}
    stream = M._stream

    def spy(item, *args, **kw):
        streamed[item.key] = len(M._row_blocks(*_rows_cols(item)))
        return stream(item, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(M, "_BLOCK", 1)  # blocks of _MIN_ROWS (64) rows
        m.setattr(M, "_stream", spy)
        loracc.merge(str(built.base), str(built.adapter), str(tmp_path / "out"), dtype=out_dtype)
    want = built.reference
    if out_dtype is not None:
        want = {k: v.to(getattr(torch, out_dtype)) for k, v in want.items()}
    got = _tensors(tmp_path / "out")
    verdict, detail, _ = pm.compare_tensors(got, want)
    assert verdict == pm.BIT_IDENTICAL, detail
    base = _tensors(built.base)
    edited = {k for k, v in built.reference.items() if not torch.equal(v, base[k])}
    lora_2d = {f"{m}.weight" for m in ("up", "down", "head")} & edited
    whole = {k for k in edited if k == "emb.weight" or k.endswith(".bias")}  # computed whole
    assert lora_2d and lora_2d <= set(streamed)  # each through the streamed path ...
    assert all(streamed[k] >= 3 for k in lora_2d)  # ... in 3 blocks or more
    if out_dtype is not None and getattr(torch, out_dtype) != case.base_dtype:
        # a cast streams every tensor the whole-tensor path does not compute
        assert set(want) - whole <= set(streamed)


def _rows_cols(item) -> tuple[int, int]:
    """What ``_stream`` splits ``item`` into: (rows, columns)."""
    if any(e.sites for e in item.stages):  # a stack's edits, adapter by adapter
        return item.shape[0], math.prod(item.shape[1:])
    return item.source.numel, 1


def _can_fallocate(path: Path) -> bool:
    """Whether fallocate(2) allocates blocks here (probed on a file of its own)."""
    if not sys.platform.startswith("linux"):
        return False
    with open(path, "wb") as f:
        ok = ctypes.CDLL(None).fallocate(f.fileno(), 0, ctypes.c_int64(0), ctypes.c_int64(1 << 20))
    return ok == 0 and path.stat().st_blocks * 512 >= 1 << 20


def test_writer_preallocates_the_file(tmp_path):
    """The writer allocates the whole file before any tensor is written (buffered writes into
    allocated blocks cost the kernel less: docs/BENCHMARKS.md, 7B), and the bytes are unchanged."""
    if not _can_fallocate(tmp_path / "probe"):
        pytest.skip("no fallocate(2) on this filesystem")
    tensors = {"a": torch.randn(512, 300), "b": torch.arange(7, dtype=torch.int32)}
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
    data_start, _ = writer.slot("a")
    size = data_start + writer.data_bytes
    assert path.stat().st_blocks * 512 >= size  # allocated before anything was written
    for k, t in tensors.items():
        writer.write(k, t)
    writer.close()
    assert path.stat().st_size == size
    back = SafetensorsFile(path)
    for k, t in tensors.items():
        assert torch.equal(back.read(k), t)
