"""Merge lowering: adapter IR + base checkpoint -> a merged Hugging Face checkpoint folder.

Streaming: the output's tensor table (names, dtypes, shapes, shards) is planned from headers
alone, so every tensor's byte range in the output is known before any data moves. A pool of
workers then fills those ranges, a few tensors ahead of an in-order commit:

* a tensor no edit touches is copied byte for byte in the kernel (``copy_file_range``);
* an edited tensor whose edits act on whole rows (LoRA on a Linear weight, DoRA's folded channel
  scale, a dtype cast) is streamed in row blocks through buffers allocated once per worker: read,
  widened to fp32, ``(B[rows] @ A) * s`` added, rounded once to the output dtype, checked, and
  written at its final offset. Memory is a few blocks per worker whatever the model's size;
* any other edit (replacement, token rows, lora_bias, conv, embedding, experts) is computed on
  the whole tensor, as before.

The row blocks give the same bits as the whole-tensor formula (``tests/test_merge_stream.py``), and
so the same bits as PEFT's merge. Reading, computing and writing overlap across the workers; the
GIL is released in every torch op and system call. ``docs/BENCHMARKS.md`` has the measurements.

Edit order on one tensor: :func:`loracc.kernels.apply_edits` (whole replacement, trainable-token
rows, LoRA deltas each followed by its DoRA channel scale, lora_bias), the order peft's unmerged
forward composes them in; a row block applies the delta step to its rows. A stack of adapters
(:mod:`loracc.lower.stack`) applies each adapter's edits in turn, still in fp32 with one rounding,
in the same single pass over the base.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loracc import kernels
from loracc.errors import ConfigError, InputError, NonFiniteError
from loracc.io.checkpoint import INDEX_NAME, SINGLE_NAME, WEIGHT_SUFFIXES, Checkpoint, inside
from loracc.io.safetensors import (
    SafetensorsWriter,
    TensorInfo,
    pread_exact,
    pwrite_all,
    read_tensor,
)
from loracc.ir import Adapter, Site, SiteKind, TargetEdits
from loracc.legality import Target, require
from loracc.lower.stack import Chain, output_chains

__all__ = [
    "MergeOptions",
    "MergeStats",
    "ProgressCallback",
    "check_merge",
    "check_mergeable",
    "merge_into",
    "parse_size",
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes in "5GB" (10^9), "500MiB" (2^20) or a plain integer, as transformers reads them."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else "X"
    if unit in ("K", "M", "G", "T"):
        unit += "B"
    if m is None or unit not in _UNITS:
        raise ConfigError(f"--max-shard-size: cannot read '{text}' (e.g. 5GB, 500MiB)")
    return int(float(m.group(1)) * _UNITS[unit])


# (tensors done, tensors in all, key just done, bytes done, bytes in all); a first call with 0
# done says the step starts.
ProgressCallback = Callable[[int, int, str, int, int], None]


@dataclass(frozen=True, slots=True)
class MergeOptions:
    """How to write the merged checkpoint."""

    dtype: torch.dtype | None = None
    max_shard_size: int = 5 * 10**9
    device: str = "cpu"
    workers: int = 2
    lookahead: int = 8
    allow_nonfinite: bool = False
    progress: ProgressCallback | None = None


@dataclass(slots=True)
class MergeStats:
    """What the merge wrote."""

    shards: list[str] = field(default_factory=list)
    tensors: int = 0
    changed: list[str] = field(default_factory=list)
    copied: int = 0
    bytes_written: int = 0
    config_updates: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _Out:
    key: str
    source: TensorInfo
    dtype: torch.dtype
    shape: tuple[int, ...]
    chain: Chain

    @property
    def stages(self) -> tuple[TargetEdits, ...]:
        return self.chain.stages

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def check_mergeable(adapter: Adapter) -> None:
    """Refuse what no merged weight can express, or what a pass must first rewrite."""
    require(adapter, Target.MERGE)


def _plan(adapters: Sequence[Adapter], base: Checkpoint, dtype: torch.dtype | None) -> list[_Out]:
    plan = []
    for key, chain in output_chains(adapters, base.keys()).items():
        info = base.info(chain.source)
        out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        plan.append(_Out(key, info, out_dtype, chain.shape(info.shape), chain))
    return plan


def _shards(plan: list[_Out], max_size: int) -> list[list[_Out]]:
    """transformers' rule: start a new shard when the next tensor would overflow this one."""
    shards: list[list[_Out]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > max_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _compute(item: _Out, device: str, allow_nonfinite: bool) -> torch.Tensor:
    w = item.chain.apply(lambda: read_tensor(item.source), device=device)
    out = w.to(dtype=item.dtype).cpu()
    if not allow_nonfinite:
        _check_finite(out, item.key)
    return out


def _check_finite(t: torch.Tensor, key: str) -> None:
    """Refuse NaN or Inf in a merged tensor *as written*: after rounding to its output dtype,
    so a finite fp32 value that overflows fp16 is caught too."""
    if kernels.all_finite(t):
        return
    raise NonFiniteError(
        f"merged tensor '{key}' has NaN or Inf (use --allow-nonfinite to write it anyway)"
    )


def _config(
    base: Checkpoint, adapters: Sequence[Adapter], plan: list[_Out], dtype: torch.dtype | None
) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    for adapter in adapters:
        updates.update(adapter.config_updates)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in base.config:
                updates[key] = name
    tied = base.tied_embeddings
    for item in plan:
        r = next((e.replacement for e in reversed(item.stages) if e.replacement), None)
        resized = r is not None and r.origin == "embedding"
        if resized and item.shape[0] != item.source.shape[0] and (tied is None or item.key in tied):
            updates["vocab_size"] = item.shape[0]
    return updates


def _write_config(base: Checkpoint, updates: dict[str, Any], path: Path) -> None:
    config = json.loads(json.dumps(base.config))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    for key, value in updates.items():
        if text is not None and key in text and key not in config:
            text[key] = value
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_side_files(base: Checkpoint, out: Path) -> None:
    """Copy the base's non-weight files (tokenizer, generation config, ...), following links
    that stay inside the folder or the hub cache's blobs; config.json is written separately."""
    for entry in sorted(base.folder.iterdir()):
        name = entry.name
        skip = name == "config.json" or name.endswith((*WEIGHT_SUFFIXES, ".index.json"))
        if skip or entry.is_dir():
            continue
        source = inside(base.folder, name, str(base.folder))
        if not source.is_file():
            raise InputError(f"{source}: not a regular file (a named pipe?); cannot copy it")
        shutil.copyfile(source, out / name)


# Row blocks: a block's steps stay in cache, and since the buffers are reused nothing is allocated
# (page-faulted) per tensor; that alone made the merge ~2x faster than whole-tensor temporaries.
_BLOCK = 1 << 19  # elements per block (2 MiB of fp32); 128K..1M measured the same
_BLOCK_ACCEL = 1 << 23  # on a GPU: fewer, larger launches and host<->device copies
# MKL's sgemm takes another kernel, with another summation order, for a handful of rows (1-11
# rows, but not 4 or 8, on AVX2); from 12 rows on, a row block of ``B @ A`` is bit-identical to
# the same rows of the full product at any offset and thread count (checked 12..1023 rows). No
# block is smaller than this margin; a smaller remainder joins the last block.
_MIN_ROWS = 64


class _Scratch:
    """One worker's reusable buffers, grown on demand and never freed before the merge ends."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, slot: str, numel: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._bufs[slot] = buf
        return buf[:nbytes].view(dtype)


def _needs_compute(item: _Out) -> bool:
    return bool(item.stages) or item.dtype != item.source.dtype


def _streamable(item: _Out) -> bool:
    """Whether every edit of ``item`` acts on whole rows (see ``_stream``)."""
    src = item.source
    if any(e.whole_tensor for e in item.stages):
        return False
    if not (src.dtype.is_floating_point and item.dtype.is_floating_point):
        return False
    if item.shape != src.shape or src.numel == 0:
        return False
    for site in _sites(item):
        if site.kind not in (SiteKind.LINEAR, SiteKind.PARAMETER) or site.experts:
            return False
        A, B = site.lora_A, site.lora_B
        if len(item.shape) != 2 or A.dim() != 2 or B.dim() != 2:
            return False
        if B.shape[0] != item.shape[0] or A.shape[1] != item.shape[1] or A.shape[0] != B.shape[1]:
            return False
        cs = site.channel_scale
        if cs is not None and cs.numel() != item.shape[0]:
            return False
    return True


def _sites(item: _Out) -> list[Site]:
    """The sites of every stage, in the order their deltas apply."""
    return [site for e in item.stages for site in e.sites]


def _row_blocks(rows: int, cols: int, block: int | None = None) -> list[tuple[int, int]]:
    per = max(_MIN_ROWS, (block or _BLOCK) // max(cols, 1))
    if rows < 2 * per:
        return [(0, rows)]
    starts = list(range(0, rows - per + 1, per))  # the remainder joins the last block
    return [(r0, r1) for r0, r1 in zip(starts, [*starts[1:], rows], strict=True)]


class _Views:
    """The typed views of a worker's buffers for blocks of ``m`` rows (made once per shape)."""

    __slots__ = ("d", "out", "out_bytes", "raw", "raw_bytes", "w")

    def __init__(
        self, scratch: _Scratch, m: int, cols: int, src: torch.dtype, dst: torch.dtype, dev: str
    ) -> None:
        n = m * cols
        on_cpu = torch.device(dev).type == "cpu"
        self.w = scratch.take("w", n, torch.float32, dev).view(m, cols)
        self.d = scratch.take("d", n, torch.float32, dev).view(m, cols)
        direct_in = on_cpu and src == torch.float32
        direct_out = on_cpu and dst == torch.float32
        self.raw = self.w if direct_in else scratch.take("in", n, src).view(m, cols)
        self.out = self.w if direct_out else scratch.take("out", n, dst).view(m, cols)
        self.raw_bytes = self.raw.reshape(-1).view(torch.uint8).numpy().data
        self.out_bytes = self.out.reshape(-1).view(torch.uint8).numpy().data


def _stream(item: _Out, writer: SafetensorsWriter, scratch: _Scratch, opts: MergeOptions) -> None:
    """Compute ``item`` block by block into its slot of ``writer``; same bits as ``_compute``."""
    src, device = item.source, opts.device
    sites = _sites(item)
    if sites:
        rows, cols = item.shape[0], math.prod(item.shape[1:])
    else:  # a plain cast: any shape, read as one long row-vector
        rows, cols = src.numel, 1
    factors = []
    for site in sites:
        A = site.lora_A.to(device=device, dtype=torch.float32).contiguous()
        B = site.lora_B.to(device=device, dtype=torch.float32).contiguous()
        cs = site.channel_scale
        if cs is not None:
            cs = cs.to(device=device, dtype=torch.float32)
            cs = cs.reshape(kernels.channel_shape(2, kernels.channel_axis(site)))
        factors.append((A, B, float(site.scale), cs))
    on_cpu = torch.device(device).type == "cpu"
    blocks = _row_blocks(rows, cols, None if on_cpu else _BLOCK_ACCEL)
    views: dict[int, _Views] = {}
    for m in sorted({r1 - r0 for r0, r1 in blocks}, reverse=True):  # largest first: no regrowth
        views[m] = _Views(scratch, m, cols, src.dtype, item.dtype, device)
    in_size, out_size = src.dtype.itemsize, item.dtype.itemsize
    begin, _ = writer.slot(item.key)
    out_fd = writer.fileno()
    fd = os.open(src.path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, src.offset, src.nbytes, os.POSIX_FADV_SEQUENTIAL)
        for r0, r1 in blocks:
            v = views[r1 - r0]
            w = v.w
            pread_exact(fd, v.raw_bytes, src.offset + r0 * cols * in_size, src.path)
            widened = v.raw is w
            for A, B, scale, cs in factors:
                torch.mm(B[r0:r1], A, out=v.d)
                if scale != 1.0:  # x * 1.0 == x: skip the pass, not the rounding
                    v.d.mul_(scale)
                if not widened:  # (a mixed-dtype add(raw, d, out=w) is slower than the two)
                    w.copy_(v.raw)
                    widened = True
                w.add_(v.d)
                if cs is not None:
                    w.mul_(cs[r0:r1])
            if not widened:
                w.copy_(v.raw)
            if v.out is not w:
                v.out.copy_(w)
            if not opts.allow_nonfinite:
                _check_finite(v.out, item.key)
            pwrite_all(out_fd, v.out_bytes, begin + r0 * cols * out_size)
    finally:
        os.close(fd)


def _fill(
    item: _Out, writer: SafetensorsWriter, opts: MergeOptions, scratches: queue.SimpleQueue
) -> None:
    """Write ``item`` into its slot of ``writer`` (a worker's task)."""
    if not _needs_compute(item):
        writer.copy_into(item.key, item.source)
    elif _streamable(item):
        scratch = scratches.get()
        try:
            _stream(item, writer, scratch, opts)
        finally:
            scratches.put(scratch)
    else:
        writer.write_at(item.key, _compute(item, opts.device, opts.allow_nonfinite))


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_shard(
    path: Path,
    items: list[_Out],
    metadata: dict[str, str],
    opts: MergeOptions,
    pool: ThreadPoolExecutor,
    scratches: queue.SimpleQueue[_Scratch],
    committed: Callable[[_Out, str], None],
) -> int:
    """Fill one shard: workers fill tensors up to ``lookahead`` ahead, committed in order."""
    writer = SafetensorsWriter(path, [(i.key, i.dtype, i.shape) for i in items], metadata)
    pending: deque[Future[None]] = deque()
    ahead = iter(items)
    try:
        for item in items:
            while len(pending) < max(1, opts.lookahead) and (nxt := next(ahead, None)) is not None:
                pending.append(pool.submit(_fill, nxt, writer, opts, scratches))
            pending.popleft().result()  # the first error in table order is the one raised
            writer.commit(item.key)
            committed(item, path.name)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # no worker may write after the close
        writer.abort()
        raise
    writer.close()
    return writer.data_bytes


def merge_into(
    adapters: Adapter | Sequence[Adapter], base: Checkpoint, out: Path, opts: MergeOptions
) -> MergeStats:
    """Write the merged checkpoint into the (temporary) folder ``out``: ``adapters`` (compiled,
    a stack compiled by :func:`loracc.lower.stack.compile_stack`) merged in order."""
    start = time.perf_counter()
    plan, shards, stats = _planned(adapters, base, opts)
    _copy_side_files(base, out)
    _write_config(base, stats.config_updates, out / "config.json")
    names = stats.shards
    metadata = base.files[0].metadata or {"format": "pt"}
    weight_map: dict[str, str] = {}
    tally = _Tally(plan, stats, opts.progress)
    workers = max(1, opts.workers)
    scratches: queue.SimpleQueue[_Scratch] = queue.SimpleQueue()
    for _ in range(workers):
        scratches.put(_Scratch())

    def committed(item: _Out, name: str) -> None:
        weight_map[item.key] = name
        tally(item)

    # The workers are the parallelism; torch's own threads would only fight them for the cores.
    # Only where every computed tensor is streamed: a row block's matmul gives the same bits at
    # any thread count, but a whole-tensor conv (say) may not, and PEFT runs torch's default.
    threads = torch.get_num_threads()
    single = all(_streamable(i) for i in plan if _needs_compute(i))
    if single and workers > 1 and torch.device(opts.device).type == "cpu":
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loracc-merge") as pool:
            for name, items in zip(names, shards, strict=True):
                stats.bytes_written += _write_shard(
                    out / name, items, metadata, opts, pool, scratches, committed
                )
    finally:
        torch.set_num_threads(threads)
    if len(shards) > 1:
        index = {"metadata": {"total_size": stats.bytes_written}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    stats.seconds = time.perf_counter() - start
    return stats


def check_merge(
    adapters: Adapter | Sequence[Adapter], base: Checkpoint, opts: MergeOptions
) -> MergeStats:
    """Everything :func:`merge_into` checks, without writing: the plan and its shards, the
    config updates, and every edited tensor computed and checked as written (NaN/Inf after the
    cast), then dropped. ``bytes_written`` is what the shards' tensors would take."""
    start = time.perf_counter()
    plan, _, stats = _planned(adapters, base, opts)
    tally = _Tally(plan, stats, opts.progress)
    for item in plan:
        if _needs_compute(item):
            _compute(item, opts.device, opts.allow_nonfinite)  # checked, then dropped
        tally(item)
    stats.bytes_written = tally.total_bytes
    stats.seconds = time.perf_counter() - start
    return stats


def _planned(
    adapters: Adapter | Sequence[Adapter], base: Checkpoint, opts: MergeOptions
) -> tuple[list[_Out], list[list[_Out]], MergeStats]:
    """The plan of a stack (or one adapter), its shards, and the stats that follow from them
    (names, tensors, config)."""
    stack = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    for adapter in stack:
        check_mergeable(adapter)
    plan = _plan(stack, base, opts.dtype)
    shards = _shards(plan, opts.max_shard_size)
    stats = MergeStats(
        shards=_shard_names(len(shards)),
        tensors=len(plan),
        config_updates=_config(base, stack, plan, opts.dtype),
    )
    return plan, shards, stats


class _Tally:
    """Counts each tensor as it is done (copied unchanged or changed) and reports progress:
    a first call with 0 done, then one per tensor, with bytes."""

    def __init__(
        self, plan: list[_Out], stats: MergeStats, progress: ProgressCallback | None
    ) -> None:
        self.total, self.stats, self.progress = len(plan), stats, progress
        self.done = self.done_bytes = 0
        self.total_bytes = sum(item.nbytes for item in plan)
        if progress is not None:
            progress(0, self.total, "", 0, self.total_bytes)

    def __call__(self, item: _Out) -> None:
        if not _needs_compute(item):
            self.stats.copied += 1
        elif item.stages:
            self.stats.changed.append(item.key)
        self.done += 1
        self.done_bytes += item.nbytes
        if self.progress is not None:
            self.progress(self.done, self.total, item.key, self.done_bytes, self.total_bytes)
