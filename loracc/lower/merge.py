"""Merge lowering: adapter IR + base checkpoint -> a merged Hugging Face checkpoint folder.

Streaming: the output's tensor table (names, dtypes, shapes, shards) is planned from headers
alone, then each shard is written front to back. A tensor no edit touches is copied byte for byte
(``copy_file_range``); an edited tensor is read, changed in fp32 and rounded once to its output
dtype. Edits run on a small thread pool a few tensors ahead of the writer, so reading, computing
and writing overlap while memory stays at a handful of tensors, whatever the model's size.

Edit order on one tensor: whole replacement, trainable-token rows, LoRA deltas (each followed by
its DoRA channel scale), lora_bias. This is the order peft's unmerged forward composes them in.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loracc import kernels
from loracc.errors import ConfigError, NonFiniteError, UnsupportedError
from loracc.io.checkpoint import INDEX_NAME, SINGLE_NAME, WEIGHT_SUFFIXES, Checkpoint
from loracc.io.safetensors import SafetensorsWriter, TensorInfo, read_tensor
from loracc.ir import Adapter, Replacement, Site, TokenRows

__all__ = ["MergeOptions", "MergeStats", "check_mergeable", "merge_into", "parse_size"]

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


@dataclass(frozen=True, slots=True)
class MergeOptions:
    """How to write the merged checkpoint."""

    dtype: torch.dtype | None = None
    max_shard_size: int = 5 * 10**9
    device: str = "cpu"
    workers: int = 2
    lookahead: int = 4
    allow_nonfinite: bool = False
    progress: Callable[[int, int, str], None] | None = None


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


@dataclass(slots=True)
class _Edits:
    replacement: Replacement | None = None
    rows: list[TokenRows] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    bias_sites: list[Site] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.replacement or self.rows or self.sites or self.bias_sites)


@dataclass(frozen=True, slots=True)
class _Out:
    key: str
    source: TensorInfo
    dtype: torch.dtype
    shape: tuple[int, ...]
    edits: _Edits

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def check_mergeable(adapter: Adapter) -> None:
    """Refuse what no merged weight can express, or what a pass must first rewrite."""
    if adapter.refusals:
        raise UnsupportedError(f"{adapter.name}: cannot merge: {adapter.refusals[0]}")
    if adapter.layer_replication and not adapter.tensor_sources:
        raise UnsupportedError(
            f"{adapter.name}: layer_replication needs the expand-layer-replication pass"
        )
    for site in adapter.sites:
        if site.magnitude is not None:
            raise UnsupportedError(f"{site.module}: DoRA magnitude not folded (fold-dora pass)")
        if site.variant not in ("lora", "dora-folded"):
            raise UnsupportedError(
                f"{site.module}: init_lora_weights='{site.init}' needs the reconstruct-residual "
                "pass"
            )


def _index_edits(adapter: Adapter) -> dict[str, _Edits]:
    edits: dict[str, _Edits] = defaultdict(_Edits)
    for r in adapter.replacements:
        edits[r.target].replacement = r
    for t in adapter.token_rows:
        edits[t.target].rows.append(t)
    for s in adapter.sites:
        edits[s.target].sites.append(s)
        if s.bias_target:
            edits[s.bias_target].bias_sites.append(s)
    return edits


def _plan(adapter: Adapter, base: Checkpoint, dtype: torch.dtype | None) -> list[_Out]:
    edits = _index_edits(adapter)
    keys = [k for k in base if k not in adapter.removed_keys]
    keys += [k for k in adapter.tensor_sources if k not in base]
    missing = set(edits) - set(keys)
    if missing:
        raise UnsupportedError(f"{adapter.name}: targets '{sorted(missing)[0]}', not in the output")
    plan = []
    for key in keys:
        info = base.info(adapter.tensor_sources.get(key, key))
        e = edits.get(key) or _Edits()
        shape = tuple(e.replacement.tensor.shape) if e.replacement else info.shape
        out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        plan.append(_Out(key, info, out_dtype, shape, e))
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
    e = item.edits
    if e.replacement is not None:
        w = e.replacement.tensor.to(device=device, dtype=torch.float32, copy=True)
    else:
        w = read_tensor(item.source).to(device=device, dtype=torch.float32)
    for rows in e.rows:
        idx = torch.tensor(rows.indices, device=device)
        w.index_copy_(0, idx, rows.rows.to(device=device, dtype=torch.float32))
    for site in e.sites:
        w += kernels.site_delta(site, device=device)
        if site.channel_scale is not None:
            w = kernels.apply_channel_scale(site, w, site.channel_scale)
    for site in e.bias_sites:
        w += kernels.bias_delta(site, device=device)
    if not allow_nonfinite and not bool(torch.isfinite(w).all()):
        raise NonFiniteError(
            f"merged tensor '{item.key}' has NaN or Inf (use --allow-nonfinite to write it anyway)"
        )
    return w.to(dtype=item.dtype).cpu()


def _config(
    base: Checkpoint, adapter: Adapter, plan: list[_Out], dtype: torch.dtype | None
) -> dict[str, Any]:
    updates: dict[str, Any] = dict(adapter.config_updates)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in base.config:
                updates[key] = name
    tied = base.tied_embeddings
    for item in plan:
        r = item.edits.replacement
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
    for entry in sorted(base.folder.iterdir()):
        name = entry.name
        if (
            entry.is_dir()
            or entry.is_symlink()
            or name == "config.json"
            or name.endswith(WEIGHT_SUFFIXES)
            or name.endswith(".index.json")
        ):
            continue
        shutil.copyfile(entry, out / name)


def _ordered(
    items: list[_Out], opts: MergeOptions, pool: ThreadPoolExecutor
) -> Iterator[tuple[_Out, torch.Tensor | None]]:
    """Yield items in order with edited tensors computed by the pool a few items ahead."""
    pending: dict[int, Future[torch.Tensor]] = {}
    edited = iter(
        [i for i, item in enumerate(items) if item.edits or item.dtype != item.source.dtype]
    )
    for i, item in enumerate(items):
        while len(pending) < opts.lookahead and (j := next(edited, None)) is not None:
            pending[j] = pool.submit(_compute, items[j], opts.device, opts.allow_nonfinite)
        yield item, (pending.pop(i).result() if i in pending else None)


def merge_into(adapter: Adapter, base: Checkpoint, out: Path, opts: MergeOptions) -> MergeStats:
    """Write the merged checkpoint into the (temporary) folder ``out``."""
    check_mergeable(adapter)
    start = time.perf_counter()
    plan = _plan(adapter, base, opts.dtype)
    shards = _shards(plan, opts.max_shard_size)
    stats = MergeStats(config_updates=_config(base, adapter, plan, opts.dtype))
    _copy_side_files(base, out)
    _write_config(base, stats.config_updates, out / "config.json")
    names = (
        [SINGLE_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    metadata = base.files[0].metadata or {"format": "pt"}
    weight_map: dict[str, str] = {}
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
        try:
            for name, items in zip(names, shards, strict=True):
                writer = SafetensorsWriter(
                    out / name, [(i.key, i.dtype, i.shape) for i in items], metadata
                )
                for item, tensor in _ordered(items, opts, pool):
                    if tensor is None:
                        writer.copy_from(item.key, item.source)
                        stats.copied += 1
                    else:
                        writer.write(item.key, tensor)
                        if item.edits:
                            stats.changed.append(item.key)
                    weight_map[item.key] = name
                    done += 1
                    if opts.progress is not None:
                        opts.progress(done, len(plan), item.key)
                writer.close()
                stats.bytes_written += writer.data_bytes
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if len(shards) > 1:
        index = {"metadata": {"total_size": stats.bytes_written}, "weight_map": weight_map}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    stats.shards = names
    stats.tensors = len(plan)
    stats.seconds = time.perf_counter() - start
    return stats


def terminal_progress() -> Callable[[int, int, str], None] | None:
    """A one-line progress display on stderr, or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int, key: str) -> None:
        now = time.monotonic()
        if done != total and now - last[0] < 0.1:
            return
        last[0] = now
        width = 30
        filled = width * done // max(total, 1)
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {key[:60]:<60}"
        sys.stderr.write(line + ("\n" if done == total else ""))
        sys.stderr.flush()

    return show
