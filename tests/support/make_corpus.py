"""Build the bad-input corpus of issue 7: small broken or hostile inputs, and what loracc owes.

Every case is a tiny folder tree made here (nothing is downloaded): a base Hugging Face checkpoint
written with ``safetensors`` directly (no transformers), a PEFT-format LoRA adapter written by
hand, and one defect. A case says which ``loracc`` command line to run, the exit code it must
get, a substring of the message, and a substring naming the file, key or module the message must
mention. ``tests/e2e/test_bad_inputs.py`` runs each case; docs/ERRORS.md lists them
(``python -m tests.support.make_corpus --markdown`` prints that table).

The ONNX cases (``export --onnx``, ``pack``, ``run``) write the same base as a small ONNX graph
with the ``onnx`` package (no torch.onnx.export): named initializers in ``model.onnx.data``, and
for ``pack``/``run`` a keep-lora model whose slots and ``loracc.slots`` manifest are written by
hand. A case with ``bug`` set is a known loracc bug, run as ``xfail(strict=True)``.

Usage::

    python -m tests.support.make_corpus DIR          # build every case under DIR, print a summary
    python -m tests.support.make_corpus --markdown   # the table for docs/ERRORS.md
    python -m tests.support.make_corpus --update-doc docs/ERRORS.md

Nothing here imports loracc: the expectations are written down, not computed by loracc.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = [
    "ADAPTER_CONFIG",
    "CASES",
    "CASES_BY_NAME",
    "Case",
    "Layout",
    "build_case",
    "build_onnx_valid",
    "build_slotted_valid",
    "build_valid",
    "markdown_table",
    "onnx_base_model",
    "read_safetensors_header",
    "reference_merge",
    "snapshot",
    "tmp_entries",
    "write_adapter",
    "write_base",
    "write_onnx",
    "write_raw_safetensors",
]

HIDDEN, VOCAB, INTER, LAYERS = 16, 32, 24, 2
RANK, ALPHA = 4, 8
PREFIX = "base_model.model."
TARGETS = ("q_proj", "v_proj")

ADAPTER_CONFIG: dict[str, object] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "peft_version": "0.21.2",
    "base_model_name_or_path": "tiny-llama",
    "r": RANK,
    "lora_alpha": ALPHA,
    "target_modules": list(TARGETS),
    "lora_dropout": 0.0,
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "inference_mode": True,
}

BASE_CONFIG: dict[str, object] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


# ------------------------------------------------------------------------------------------------
# Valid inputs


def base_tensors(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny llama-shaped state dict, in storage order."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)

    out = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{proj}.weight"] = rnd(HIDDEN, HIDDEN)
        out[p + "mlp.gate_proj.weight"] = rnd(INTER, HIDDEN)
        out[p + "mlp.up_proj.weight"] = rnd(INTER, HIDDEN)
        out[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTER)
        out[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=dtype)
    out["model.norm.weight"] = torch.ones(HIDDEN, dtype=dtype)
    out["lm_head.weight"] = rnd(VOCAB, HIDDEN)
    return out


def write_base(
    folder: Path,
    tensors: dict[str, torch.Tensor] | None = None,
    *,
    shards: int = 1,
    config: dict[str, object] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a Hugging Face folder: config.json and one file or ``shards`` shards + index."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = base_tensors() if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps(config or BASE_CONFIG, indent=2))
    (folder / "generation_config.json").write_text('{"do_sample": false}\n')
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return tensors
    keys = list(tensors)
    per = math.ceil(len(keys) / shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}}
    index["weight_map"] = weight_map
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return tensors


def adapter_tensors(
    seed: int = 1, targets: tuple[str, ...] = TARGETS, rank: int = RANK
) -> dict[str, torch.Tensor]:
    """Non-zero LoRA factors for ``targets`` in every layer, peft's key layout."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(LAYERS):
        for t in targets:
            m = f"{PREFIX}model.layers.{i}.self_attn.{t}"
            out[f"{m}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=g) * 0.1
            out[f"{m}.lora_B.weight"] = torch.randn(HIDDEN, rank, generator=g) * 0.1
    return out


def write_adapter(
    folder: Path,
    tensors: dict[str, torch.Tensor] | None = None,
    config: dict[str, object] | None = None,
) -> dict[str, torch.Tensor]:
    """Write adapter_config.json + adapter_model.safetensors as peft's save_pretrained does."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors() if tensors is None else tensors
    cfg = ADAPTER_CONFIG if config is None else config
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tensors


def reference_merge(
    base: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    scale: float | dict[str, float],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The independent fp64 reference: ``W.double() + s * B.double() @ A.double()``, rounded once.

    ``scale`` is one number or a per-module mapping (module path without the peft prefix).
    """
    out = {}
    for key, w in base.items():
        module = key.removesuffix(".weight")
        a = adapter.get(f"{PREFIX}{module}.lora_A.weight")
        b = adapter.get(f"{PREFIX}{module}.lora_B.weight")
        target = dtype or w.dtype
        if a is None or b is None:
            out[key] = w.to(target)
            continue
        s = scale[module] if isinstance(scale, dict) else scale
        exact = w.double() + s * (b.double() @ a.double())
        out[key] = exact.to(target)
    return out


# ------------------------------------------------------------------------------------------------
# Raw safetensors surgery


def read_safetensors_header(path: Path) -> tuple[dict[str, object], bytes]:
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw_safetensors(path: Path, header: object, data: bytes, *, header_text: bytes = b""):
    """Write a safetensors file with exactly this header (or header bytes) and data area."""
    raw = header_text or json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(path: Path, edit: Callable[[dict[str, object]], None]) -> None:
    header, data = read_safetensors_header(path)
    edit(header)
    write_raw_safetensors(path, header, data)


def _first_tensor(header: dict[str, object]) -> str:
    return min(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )  # type: ignore[index]


def _last_tensor(header: dict[str, object]) -> str:
    return max(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
    )  # type: ignore[index]


# ------------------------------------------------------------------------------------------------
# File-tree snapshots (inputs must not change) and temporaries (none may stay)


def snapshot(root: Path, exclude: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    """{relative path: content hash, link target or 'dir'} of everything under ``root``."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = d / name
            if exclude(p):
                if name in dirnames:
                    dirnames.remove(name)
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def tmp_entries(dest: Path) -> list[Path]:
    """loracc's temporaries for ``dest`` (``.NAME.loracc-tmp-*`` / ``-old-*``) next to it."""
    if not dest.parent.is_dir():
        return []
    return sorted(p for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.loracc-"))


# ------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Layout:
    """One built case: where its inputs are, which command line to run, what to watch."""

    root: Path
    base: Path
    adapter: Path
    out: Path
    argv: list[str]
    out_preexists: bool = False
    marker: Path | None = None  # must never appear (a pickle canary)


@dataclass(frozen=True)
class Case:
    """A corpus case: how to build it and what loracc must answer."""

    name: str
    what: str
    build: Callable[[Path], Layout]
    exit_code: int
    message: str  # substring of stderr (or stdout when exit_code is 0)
    names: str = ""  # substring naming the file, key or module; must appear in the message
    one_line: bool = True  # click's own usage errors print a usage block
    pending: str = ""  # a known gap in a part this corpus does not own: xfail with this reason
    bug: str = ""  # a known bug (file:line, what happens): xfail(strict=True) until it is fixed
    needs: str = ""  # a module the behaviour lives in; xfail while it is not importable
    group: str = ""


def _std(root: Path, *, shards: int = 1, extra: tuple[str, ...] = ()) -> Layout:
    base, adapter, out = root / "base", root / "adapter", root / "out"
    write_base(base, shards=shards)
    write_adapter(adapter)
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out), *extra]
    return Layout(root, base, adapter, out, argv)


def _with(
    edit: Callable[[Layout], object], *, shards: int = 1, extra: tuple[str, ...] = ()
) -> Callable[[Path], Layout]:
    def build(root: Path) -> Layout:
        lay = _std(root, shards=shards, extra=extra)
        edit(lay)
        return lay

    return build


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) + keep])


def _set_entry(file: str, key: str | None, field_name: str, value: object):
    def edit(lay: Layout) -> None:
        path = (lay.adapter if file.startswith("adapter") else lay.base) / file

        def change(h: dict[str, object]) -> None:
            k = key or _first_tensor(h)
            h[k][field_name] = value  # type: ignore[index]

        edit_header(path, change)

    return edit


def _offsets_past_end(lay: Layout) -> None:
    def change(h: dict[str, object]) -> None:
        k = _last_tensor(h)
        b, e = h[k]["data_offsets"]  # type: ignore[index]
        h[k]["data_offsets"] = [b + 4096, e + 4096]  # type: ignore[index]

    edit_header(lay.base / "model.safetensors", change)


def _offsets_overlap(lay: Layout) -> None:
    def change(h: dict[str, object]) -> None:
        names = sorted(
            (k for k in h if k != "__metadata__"),
            key=lambda k: h[k]["data_offsets"][0],  # type: ignore[index]
        )
        a, b = names[1], names[2]  # both (16, 16) float32 or equal-size neighbours
        span = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]  # type: ignore[index]
        start = h[a]["data_offsets"][0] + 4  # type: ignore[index]
        h[b]["data_offsets"] = [start, start + span]  # type: ignore[index]

    edit_header(lay.base / "model.safetensors", change)


def _header_text(file: str, text: bytes) -> Callable[[Layout], None]:
    def edit(lay: Layout) -> None:
        path = (lay.adapter if file.startswith("adapter") else lay.base) / file
        _, data = read_safetensors_header(path)
        write_raw_safetensors(path, None, data, header_text=text)

    return edit


def _header_length(lay: Layout) -> None:
    path = lay.base / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])


def _adapter_tensors_edit(edit: Callable[[dict[str, torch.Tensor]], None]):
    def apply(lay: Layout) -> None:
        t = adapter_tensors()
        edit(t)
        save_file(t, str(lay.adapter / "adapter_model.safetensors"), metadata={"format": "pt"})

    return apply


_Q0 = f"{PREFIX}model.layers.0.self_attn.q_proj"


def _set_tensor(key: str, value: torch.Tensor):
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = value

    return _adapter_tensors_edit(edit)


def _poison(key: str, value: float):
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key][1, 2] = value

    return _adapter_tensors_edit(edit)


def _drop(key: str):
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t[key]

    return _adapter_tensors_edit(edit)


def _config(change: dict[str, object] | None = None, text: str | bytes | None = None):
    def edit(lay: Layout) -> None:
        path = lay.adapter / "adapter_config.json"
        if text is not None:
            path.write_bytes(text.encode() if isinstance(text, str) else text)
            return
        cfg = dict(ADAPTER_CONFIG)
        cfg.update(change or {})
        path.write_text(json.dumps(cfg, indent=2))

    return edit


class _Canary:
    """Pickles to ``open(marker, 'w')``: unpickling it creates the marker file, nothing else."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _pickle_canary(where: str, name: str, *, keep_safetensors: bool = False):
    def edit(lay: Layout) -> None:
        folder = lay.adapter if where == "adapter" else lay.base
        lay.marker = lay.root / "UNPICKLED"
        (folder / name).write_bytes(pickle.dumps({"state": _Canary(lay.marker)}))
        if not keep_safetensors:
            (
                folder
                / ("adapter_model.safetensors" if where == "adapter" else "model.safetensors")
            ).unlink()

    return edit


def _outside_shard(lay: Layout) -> Path:
    """A valid safetensors file outside the base folder holding the base's second shard."""
    outside = lay.root / "outside"
    outside.mkdir(exist_ok=True)
    src = lay.base / "model-00002-of-00002.safetensors"
    dst = outside / "model-00002-of-00002.safetensors"
    shutil.copyfile(src, dst)
    return dst


def _index_name(name_for: Callable[[Layout], str]):
    def edit(lay: Layout) -> None:
        _outside_shard(lay)
        index = lay.base / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        new = name_for(lay)
        data["weight_map"] = {
            k: (new if v == "model-00002-of-00002.safetensors" else v)
            for k, v in data["weight_map"].items()
        }
        index.write_text(json.dumps(data, indent=2))

    return edit


def _shard_link(target: Callable[[Layout], Path]):
    def edit(lay: Layout) -> None:
        outside = _outside_shard(lay)
        shard = lay.base / "model-00002-of-00002.safetensors"
        shard.unlink()
        shard.symlink_to(target(lay) if target else outside)

    return edit


def _index_edit(change: Callable[[dict[str, object]], None]):
    def edit(lay: Layout) -> None:
        index = lay.base / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        change(data)
        index.write_text(json.dumps(data, indent=2))

    return edit


def _duplicate_tensor(lay: Layout) -> None:
    second = lay.base / "model-00002-of-00002.safetensors"
    header, _ = read_safetensors_header(second)
    tensors = {k: torch.zeros(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    tensors["model.embed_tokens.weight"] = torch.zeros(VOCAB, HIDDEN)
    save_file(tensors, str(second), metadata={"format": "pt"})


def _single_link_out(lay: Layout) -> None:
    outside = lay.root / "outside"
    outside.mkdir()
    target = outside / "model.safetensors"
    (lay.base / "model.safetensors").rename(target)
    (lay.base / "model.safetensors").symlink_to(target)


def _adapter_link_out(lay: Layout) -> None:
    outside = lay.root / "outside"
    outside.mkdir()
    target = outside / "private.safetensors"
    (lay.adapter / "adapter_model.safetensors").rename(target)
    (lay.adapter / "adapter_model.safetensors").symlink_to(target)


def _hf_cache(root: Path) -> Layout:
    """A base laid out like the Hugging Face hub cache: snapshot links into ../../blobs."""
    repo = root / "models--tiny--llama"
    snap = repo / "snapshots" / "0123abcd"
    blobs = repo / "blobs"
    tmp = root / "staging"
    write_base(tmp, shards=2)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(tmp.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blobs / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    tmp.rmdir()
    adapter, out = root / "adapter", root / "out"
    write_adapter(adapter)
    argv = ["merge", "--base", str(snap), "--adapter", str(adapter), "-o", str(out)]
    return Layout(root, snap, adapter, out, argv)


def _hub_repo(*, ref: str | None, extra_snapshots: tuple[str, ...] = ()):
    """--base names the hub-cache repository folder (models--tiny--llama) of :func:`_hf_cache`,
    ``refs/main`` holding ``ref`` (none when None), with more snapshots linking the same blobs."""

    def build(root: Path) -> Layout:
        lay = _hf_cache(root)
        repo = lay.base.parent.parent
        for rev in extra_snapshots:
            (repo / "snapshots" / rev).mkdir()
            for f in lay.base.iterdir():
                (repo / "snapshots" / rev / f.name).symlink_to(f.readlink())
        if ref is not None:
            (repo / "refs").mkdir()
            (repo / "refs" / "main").write_text(ref)
        lay.argv[lay.argv.index("--base") + 1] = str(repo)
        return lay

    return build


def _set_arg(flag: str, value: Callable[[Layout], str]) -> Callable[[Layout], None]:
    """Give ``flag`` the value ``value(layout)`` on the case's command line."""

    def edit(lay: Layout) -> None:
        lay.argv[lay.argv.index(flag) + 1] = value(lay)

    return edit


def _config_link_out(lay: Layout) -> None:
    outside = lay.root / "outside"
    outside.mkdir()
    (outside / "secrets.json").write_text('{"model_type": "llama", "api_token": "hunter2"}')
    (lay.base / "config.json").unlink()
    (lay.base / "config.json").symlink_to(outside / "secrets.json")


def _fifo_side_file(lay: Layout) -> None:
    os.mkfifo(lay.base / "tokenizer.json")


def _hub_blobs_out(root: Path) -> Layout:
    lay = _hf_cache(root)
    lay.out = lay.base.parent.parent / "blobs"
    lay.out_preexists = True
    lay.argv = [*lay.argv[:-1], str(lay.out), "--force"]
    return lay


def _out_at(where: Callable[[Layout], Path], *, preexists: bool = True, force: bool = False):
    def build(root: Path) -> Layout:
        lay = _std(root)
        lay.out = where(lay)
        lay.out_preexists = preexists
        lay.argv = [
            "merge", "--base", str(lay.base), "--adapter", str(lay.adapter), "-o", str(lay.out),
        ] + (["--force"] if force else [])  # fmt: skip
        return lay

    return build


def _existing_out(lay: Layout) -> Path:
    lay.out.mkdir()
    (lay.out / "keep.txt").write_text("an earlier result\n")
    return lay.out


def _link_to_base(lay: Layout) -> Path:
    link = lay.root / "out-link"
    link.symlink_to(lay.base)
    return link


def _nested_params(leaves: tuple[str, str], r: int) -> Callable[[Path], Layout]:
    """``inspect`` without a base of two target_parameters on one experts module, saved as peft
    nests their wrappers (the first registered under ``.base_layer``): hidden -> 2·inter, then
    inter -> hidden, 3 experts of rank RANK."""

    def build(root: Path) -> Layout:
        lay = _std(root)
        owner = f"{PREFIX}model.layers.0.mlp.experts"
        g = torch.Generator().manual_seed(5)
        tensors = {}
        for infix, fan_in, fan_out in (("base_layer.", HIDDEN, 2 * INTER), ("", INTER, HIDDEN)):
            tensors[f"{owner}.{infix}lora_A.weight"] = torch.randn(3 * RANK, fan_in, generator=g)
            tensors[f"{owner}.{infix}lora_B.weight"] = torch.randn(fan_out, 3 * RANK, generator=g)
        targets = [f"mlp.experts.{leaf}" for leaf in leaves]
        config = {**ADAPTER_CONFIG, "r": r, "target_modules": [], "target_parameters": targets}
        write_adapter(lay.adapter, tensors, config)
        lay.argv = ["inspect", str(lay.adapter)]
        return lay

    return build


def _argv(edit: Callable[[Layout], list[str]], preexists: bool = False):
    def build(root: Path) -> Layout:
        lay = _std(root)
        lay.argv = edit(lay)
        lay.out_preexists = preexists
        return lay

    return build


def _stack(config: dict[str, object] | None = None, extra: tuple[str, ...] = ()):
    """A stack: the standard adapter, then ``adapter2`` (its own factors; ``config`` changes its
    adapter_config.json), plus ``extra`` options."""

    def build(root: Path) -> Layout:
        lay = _std(root)
        second = root / "adapter2"
        write_adapter(second, adapter_tensors(seed=2), {**ADAPTER_CONFIG, **(config or {})})
        lay.argv += ["--adapter", str(second), *extra]
        return lay

    return build


def _combine(
    extra: tuple[str, ...] = (),
    config: dict[str, object] | None = None,
    rank: int = RANK,
    dora: bool = False,
):
    """``loracc combine`` of the standard adapter and ``adapter2`` (its own factors, of ``rank``;
    ``config`` changes its adapter_config.json; ``dora``: both DoRA, on the same modules), plus
    ``extra`` options."""

    def build(root: Path) -> Layout:
        lay = _std(root)
        second = root / "adapter2"
        tensors = [adapter_tensors(), adapter_tensors(seed=2, rank=rank)]
        configs = [ADAPTER_CONFIG, {**ADAPTER_CONFIG, "r": rank, **(config or {})}]
        if dora:
            for t in tensors:
                modules = [k.removesuffix(".lora_A.weight") for k in t if "lora_A" in k]
                t.update({f"{m}.lora_magnitude_vector": torch.ones(HIDDEN) for m in modules})
            configs = [{**c, "use_dora": True} for c in configs]
        for folder, t, c in zip((lay.adapter, second), tensors, configs, strict=True):
            write_adapter(folder, t, c)
        lay.argv = ["combine", "--adapter", str(lay.adapter), "--adapter", str(second),
                    "-o", str(lay.out), *extra]  # fmt: skip
        return lay

    return build


def _combine_over_input(root: Path) -> Layout:
    """``combine -o`` the second input adapter, with ``--force``."""
    lay = _combine(("--method", "cat", "--force"))(root)
    lay.out, lay.out_preexists = root / "adapter2", True
    lay.argv[lay.argv.index("-o") + 1] = str(lay.out)
    return lay


def _fp16_overflow(root: Path) -> Layout:
    """fp16 base; a finite delta of about 1e5 that only overflows when rounded to fp16."""
    base, adapter, out = root / "base", root / "adapter", root / "out"
    write_base(base, base_tensors(torch.float16), config={**BASE_CONFIG, "torch_dtype": "float16"})
    t = adapter_tensors()
    t[f"{_Q0}.lora_A.weight"] = torch.full((RANK, HIDDEN), 100.0)
    t[f"{_Q0}.lora_B.weight"] = torch.full((HIDDEN, RANK), 100.0)
    write_adapter(adapter, t)
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out)]
    return Layout(root, base, adapter, out, argv)


def _dora_zero_norm(root: Path) -> Layout:
    """DoRA on q_proj of layer 0, whose row 0 has W + ΔW = 0: the norm DoRA divides by is 0."""
    base, adapter, out = root / "base", root / "adapter", root / "out"
    tensors = base_tensors()
    tensors["model.layers.0.self_attn.q_proj.weight"][0].zero_()
    write_base(base, tensors)
    t = adapter_tensors()
    t[f"{_Q0}.lora_B.weight"][0].zero_()
    for i in range(LAYERS):
        for name in TARGETS:
            t[f"{PREFIX}model.layers.{i}.self_attn.{name}.lora_magnitude_vector"] = torch.ones(
                HIDDEN
            )
    write_adapter(adapter, t, {**ADAPTER_CONFIG, "use_dora": True})
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out)]
    return Layout(root, base, adapter, out, argv)


def _int8_target(lay: Layout) -> None:
    tensors = base_tensors()
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.ones(HIDDEN, HIDDEN, dtype=torch.int8)
    write_base(lay.base, tensors)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# ------------------------------------------------------------------------------------------------
# ONNX inputs: the tiny base as an ONNX graph written with the onnx package (no torch.onnx.export)

ONNX_DATA = "model.onnx.data"
SLOTS_KEY = "loracc.slots"  # the keep-lora manifest (docs/ONNX.md, "the slot contract")


def _module(i: int, proj: str) -> str:
    return f"model.layers.{i}.self_attn.{proj}"


def onnx_base_model(*, slots: tuple[str, ...] = (), quantized: str = "") -> Any:
    """The tiny base as an ``onnx.ModelProto``: per layer ``h = h @ Wqᵀ + h @ Wvᵀ``.

    Each weight is an initializer named as the checkpoint's key (``model.layers.0.self_attn.
    q_proj.weight``, shape (out, in)) read through a Transpose: loracc binds it by parameter name.
    ``slots`` modules get a keep-lora branch ``y + (h @ A) @ B`` whose A and B are graph inputs with
    rank-4 defaults, and the ``loracc.slots`` manifest, written here by hand as docs/ONNX.md
    describes them. ``quantized`` names a module computed by a MatMulNBits node instead, whose
    packed weight (blobs of 16 bytes, not 8) does not fit its K/N/bits/block_size.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    f32 = TensorProto.FLOAT
    weights = base_tensors()
    nodes, inits, groups = [], [], []
    inputs = [helper.make_tensor_value_info("x", f32, [1, HIDDEN])]
    h = "x"
    for i in range(LAYERS):
        outs = []
        for proj in TARGETS:
            m = _module(i, proj)
            w, y = f"{m}.weight", f"{m}/y"
            if m == quantized:
                q, s = f"{m}.qweight", f"{m}.scales"
                inits.append(numpy_helper.from_array(np.zeros((HIDDEN, 1, 16), np.uint8), q))
                inits.append(numpy_helper.from_array(np.ones(HIDDEN, np.float32), s))
                nodes.append(helper.make_node(
                    "MatMulNBits", [h, q, s], [y], name=f"/model/layers.{i}/self_attn/{proj}/"
                    "MatMulNBits", domain="com.microsoft", K=HIDDEN, N=HIDDEN, bits=4,
                    block_size=16))  # fmt: skip
                outs.append(y)
                continue
            inits.append(numpy_helper.from_array(weights[w].numpy(), w))
            nodes.append(helper.make_node("Transpose", [w], [f"{m}/wT"], perm=[1, 0]))
            nodes.append(helper.make_node("MatMul", [h, f"{m}/wT"], [y]))
            if m in slots:
                a, b, r = f"{m}.lora_A.weight", f"{m}.lora_B.weight", f"{m}.lora_r"
                inits.append(numpy_helper.from_array(np.zeros((HIDDEN, RANK), np.float32), a))
                inits.append(numpy_helper.from_array(np.zeros((RANK, HIDDEN), np.float32), b))
                inputs.append(helper.make_tensor_value_info(a, f32, [HIDDEN, r]))
                inputs.append(helper.make_tensor_value_info(b, f32, [r, HIDDEN]))
                nodes.append(helper.make_node("MatMul", [h, a], [f"{m}/lora_a"]))
                nodes.append(helper.make_node("MatMul", [f"{m}/lora_a", b], [f"{m}/lora_b"]))
                nodes.append(helper.make_node("Add", [y, f"{m}/lora_b"], [f"{m}/out"]))
                y = f"{m}/out"
                groups.append({
                    "key": m, "op": "MatMul", "fan_in": HIDDEN, "fan_out": HIDDEN, "kernel": [],
                    "dtype": f32, "A": a, "B": b, "rank_dim": r, "scale": None, "bias": None,
                    "members": [{"module": m, "kind": "linear", "start": 0, "stop": HIDDEN}],
                    "weight": w, "weight_transposed": False, "nodes": [],
                })  # fmt: skip
            outs.append(y)
        h = f"h{i + 1}" if i + 1 < LAYERS else "y"
        nodes.append(helper.make_node("Add", outs, [h]))
    graph = helper.make_graph(
        nodes, "tiny", inputs, [helper.make_tensor_value_info("y", f32, [1, HIDDEN])], inits
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="make_corpus")
    model.ir_version = 10
    if groups:
        manifest = json.dumps({"version": 1, "groups": groups}, sort_keys=True)
        helper.set_model_props(model, {SLOTS_KEY: manifest})
    return model


def write_onnx(path: Path, model: Any, location: str | None = ONNX_DATA) -> None:
    """Save ``model`` at ``path``; with ``location``, every initializer goes to that data file.

    The data file (``path.parent / location``) is written here, tensors back to back, each entry
    recording its location, offset and length, so that cases can edit any of them.
    """
    import onnx

    assert isinstance(model, onnx.ModelProto)
    if location is not None:
        blob = bytearray()
        for init in model.graph.initializer:
            raw = init.raw_data
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", len(blob)), ("length", len(raw))):
                init.external_data.add(key=key, value=str(value))
            blob += raw
        (path.parent / location).write_bytes(bytes(blob))
    path.write_bytes(model.SerializeToString())


def _edit_onnx(path: Path, edit: Callable[[Any], None]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    edit(model)
    path.write_bytes(model.SerializeToString())


def _set_external(init_index: int | None, key: str, value: Callable[[Layout, int], str]):
    """Set the external-data ``key`` of one initializer (None: all) to ``value(lay, old)``."""

    def edit(lay: Layout) -> None:
        def change(model: Any) -> None:
            inits = model.graph.initializer
            for n, init in enumerate(inits):
                if init_index is not None and n != init_index % len(inits):
                    continue
                for entry in init.external_data:
                    if entry.key == key:
                        entry.value = value(lay, int(entry.value) if entry.value.isdigit() else 0)

        _edit_onnx(lay.base / "model.onnx", change)

    return edit


def _onnx_std(root: Path, *, targets: tuple[str, ...] = TARGETS) -> Layout:
    """A base ONNX folder (model.onnx + model.onnx.data), a PEFT adapter, a merged export."""
    base, adapter, out = root / "base", root / "adapter", root / "out.onnx"
    base.mkdir(parents=True)
    write_onnx(base / "model.onnx", onnx_base_model())
    write_adapter(
        adapter,
        adapter_tensors(targets=targets),
        {**ADAPTER_CONFIG, "target_modules": list(targets)},
    )
    argv = ["export", "--onnx", "--base", str(base / "model.onnx"), "--adapter", str(adapter)]
    argv += ["-o", str(out)]
    return Layout(root, base, adapter, out, argv)


def _onnx_with(
    edit: Callable[[Layout], object], *, targets: tuple[str, ...] = TARGETS
) -> Callable[[Path], Layout]:
    def build(root: Path) -> Layout:
        lay = _onnx_std(root, targets=targets)
        edit(lay)
        return lay

    return build


def _data_outside(lay: Layout) -> Path:
    """A valid copy of the base's external data outside its folder, at ``root/outside``."""
    outside = lay.root / "outside"
    outside.mkdir(exist_ok=True)
    dst = outside / ONNX_DATA
    shutil.copyfile(lay.base / ONNX_DATA, dst)
    return dst


def _data_location(where: Callable[[Layout], str]):
    def edit(lay: Layout) -> None:
        _data_outside(lay)
        _set_external(None, "location", lambda lay_, _: where(lay_))(lay)

    return edit


def _data_link_out(lay: Layout) -> None:
    target = _data_outside(lay)
    (lay.base / ONNX_DATA).unlink()
    (lay.base / ONNX_DATA).symlink_to(target)


def _onnx_quantized(root: Path) -> Layout:
    lay = _onnx_std(root)
    write_onnx(lay.base / "model.onnx", onnx_base_model(quantized=_module(1, "v_proj")))
    return lay


def _onnx_out(
    where: Callable[[Layout], Path],
    *,
    preexists: bool = True,
    force: bool = False,
    keep_lora: bool = False,
    location: str = ONNX_DATA,
) -> Callable[[Path], Layout]:
    def build(root: Path) -> Layout:
        # q_proj only: the v_proj weights stay external, so the output has a .data file too
        lay = _onnx_std(root, targets=("q_proj",))
        if location != ONNX_DATA:
            (lay.base / ONNX_DATA).unlink()
            write_onnx(lay.base / "model.onnx", onnx_base_model(), location)
        lay.out = where(lay)
        lay.out_preexists = preexists
        lay.argv = [*lay.argv[:-1], str(lay.out)] + (["--force"] if force else [])
        if keep_lora:
            lay.argv.insert(2, "--keep-lora")
        return lay

    return build


def _existing(name: str) -> Callable[[Layout], Path]:
    """``root/name`` holds an earlier result; the output is ``root/out.onnx``."""

    def where(lay: Layout) -> Path:
        (lay.root / name).write_bytes(b"an earlier result\n")
        return lay.root / "out.onnx"

    return where


def build_onnx_valid(root: Path) -> Layout:
    """A valid ONNX base + adapter pair (4 sites, scale 2) and the merged export command line."""
    root.mkdir(parents=True, exist_ok=True)
    return _onnx_std(root)


def build_slotted_valid(root: Path) -> Layout:
    """A valid keep-lora model (q_proj slots) + a q_proj adapter and the pack command line."""
    root.mkdir(parents=True, exist_ok=True)
    return _slotted(root, targets=("q_proj",))


def _slotted(root: Path, *, targets: tuple[str, ...] = TARGETS) -> Layout:
    """A keep-lora model with q_proj slots only (``slotted/model.onnx``) and a PEFT adapter."""
    lay = _onnx_std(root, targets=targets)
    slotted = root / "slotted"
    slotted.mkdir()
    q = tuple(_module(i, "q_proj") for i in range(LAYERS))
    write_onnx(slotted / "model.onnx", onnx_base_model(slots=q))
    lay.base, lay.out = slotted, root / "a.onnx_adapter"
    lay.argv = ["pack", "--model", str(slotted / "model.onnx"), "--adapter", str(lay.adapter)]
    lay.argv += ["-o", str(lay.out)]
    return lay


def _pack_with(
    edit: Callable[[Layout], object], *, targets: tuple[str, ...] = TARGETS
) -> Callable[[Path], Layout]:
    def build(root: Path) -> Layout:
        lay = _slotted(root, targets=targets)
        edit(lay)
        return lay

    return build


def _run_with_adapter(
    content: Callable[[Layout], bytes], *, model: bytes = b""
) -> Callable[[Path], Layout]:
    """``loracc run`` of the slotted model (or ``model``'s bytes) with an adapter of ``content``."""

    def build(root: Path) -> Layout:
        import numpy as np

        lay = _slotted(root, targets=("q_proj",))
        if model:
            (lay.base / "model.onnx").write_bytes(model)
        adapter_file = root / "bad.onnx_adapter"
        adapter_file.write_bytes(content(lay))
        inputs = root / "inputs.npz"
        np.savez(inputs, x=np.ones((1, HIDDEN), np.float32))
        lay.out = root / "outputs.npz"
        lay.argv = ["run", "--model", str(lay.base / "model.onnx"), "--adapter", str(adapter_file)]
        lay.argv += ["--inputs", str(inputs), "-o", str(lay.out)]
        return lay

    return build


def _pack_over_model_data(root: Path) -> Layout:
    lay = _slotted(root, targets=("q_proj",))
    (lay.base / ONNX_DATA).unlink()
    q = tuple(_module(i, "q_proj") for i in range(LAYERS))
    write_onnx(lay.base / "model.onnx", onnx_base_model(slots=q), "weights.onnx_adapter")
    lay.out, lay.out_preexists = lay.base / "weights.onnx_adapter", True
    lay.argv = [*lay.argv[:-1], str(lay.out), "--force"]
    return lay


def _existing_adapter_file(lay: Layout) -> None:
    lay.out.write_bytes(b"an earlier result\n")
    lay.out_preexists = True


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _adapter_file_bytes(lay: Layout) -> bytes:
    """A valid onnxruntime adapter file for the slotted model's q_proj slots (rank 2)."""
    import numpy as np
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(0)
    params = {}
    for i in range(LAYERS):
        m = _module(i, "q_proj")
        params[f"{m}.lora_A.weight"] = np.ones((HIDDEN, 2), np.float32)
        params[f"{m}.lora_B.weight"] = np.ones((2, HIDDEN), np.float32)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    path = lay.root / "valid.onnx_adapter"
    fmt.export_adapter(str(path))
    raw = path.read_bytes()
    path.unlink()
    return raw


def _header_entry_shape(file: str, key: str | None, shape: list[int]):
    """Give one tensor an empty byte range and ``shape`` (whose element count is 0)."""

    def edit(lay: Layout) -> None:
        path = (lay.adapter if file.startswith("adapter") else lay.base) / file

        def change(h: dict[str, object]) -> None:
            k = key or _first_tensor(h)
            begin = h[k]["data_offsets"][0]  # type: ignore[index]
            h[k]["shape"] = shape  # type: ignore[index]
            h[k]["data_offsets"] = [begin, begin]  # type: ignore[index]

        edit_header(path, change)

    return edit


def _duplicate_header_key(lay: Layout) -> None:
    """The base header names model.norm.weight twice (JSON allows it; the last would win)."""
    path = lay.base / "model.safetensors"
    header, data = read_safetensors_header(path)
    entry = json.dumps(header["model.norm.weight"])
    text = json.dumps(header)[:-1] + f', "model.norm.weight": {entry}}}'
    write_raw_safetensors(path, None, data, header_text=text.encode())


def _many_empty_tensors(count: int):
    """``count`` extra zero-size tensors in the base header (no data bytes)."""

    def edit(lay: Layout) -> None:
        def change(h: dict[str, object]) -> None:
            for i in range(count):
                h[f"extra.{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}

        edit_header(lay.base / "model.safetensors", change)

    return edit


def _raw_config(text: str):
    """adapter_config.json with ``text`` spliced in before the closing brace."""
    body = json.dumps(ADAPTER_CONFIG)[:-1]
    return _config(text=f"{body}, {text}}}")


_SPOOF = "zz\nloracc: merged 4 sites OK"
_BIDI = "zz\u202e\x00gpj.exe"


_INF = float("inf")
_NAN = float("nan")

CASES: tuple[Case, ...] = (
    # -- safetensors containers -----------------------------------------------------------------
    Case("base-truncated-data", "base model.safetensors cut 100 bytes short",
         _with(lambda lay: _truncate(lay.base / "model.safetensors", -100)),
         2, "the file is truncated", "model.safetensors", group="safetensors"),
    Case("base-truncated-header", "base model.safetensors cut to 5 bytes",
         _with(lambda lay: _truncate(lay.base / "model.safetensors", 5)),
         2, "truncated safetensors file", "model.safetensors", group="safetensors"),
    Case("base-empty-file", "base model.safetensors is empty",
         _with(lambda lay: _truncate(lay.base / "model.safetensors", 0)),
         2, "truncated safetensors file", "model.safetensors", group="safetensors"),
    Case("base-header-length-lies", "the 8-byte header length says 10^12",
         _with(_header_length), 2, "exceeds the file", "model.safetensors", group="safetensors"),
    Case("base-header-not-json", "the header bytes are not JSON",
         _with(_header_text("model.safetensors", b"{not json")),
         2, "header is not valid JSON", "model.safetensors", group="safetensors"),
    Case("base-header-not-utf8", "the header bytes are not UTF-8",
         _with(_header_text("model.safetensors", b'{"\xff\xfe": 1}')),
         2, "header is not valid JSON", "model.safetensors", group="safetensors"),
    Case("base-header-deep-nesting", "the header is JSON nested 100000 deep",
         _with(_header_text("model.safetensors", _deep(100000).encode())),
         2, "malformed", "model.safetensors", group="safetensors"),
    Case("base-header-not-object", "the header is a JSON list",
         _with(_header_text("model.safetensors", b"[1, 2]")),
         2, "header is not a JSON object", "model.safetensors", group="safetensors"),
    Case("base-offsets-past-end", "a tensor's data_offsets point past the end of the file",
         _with(_offsets_past_end), 2, "past the end of the file", "model.safetensors",
         group="safetensors"),
    Case("base-offsets-wrong-span", "data_offsets span fewer bytes than dtype x shape",
         _with(_set_entry("model.safetensors", "model.norm.weight", "data_offsets", [0, 4])),
         2, "dtype and shape need", "model.norm.weight", group="safetensors"),
    Case("base-offsets-overlap", "two tensors' byte ranges overlap",
         _with(_offsets_overlap), 2, "overlap", "model.safetensors", group="safetensors"),
    Case("base-offsets-not-pair", "data_offsets is not [begin, end]",
         _with(_set_entry("model.safetensors", "model.norm.weight", "data_offsets", [0])),
         2, "is not [begin, end]", "model.norm.weight", group="safetensors"),
    Case("base-dtype-lies", "header says F64 for a tensor stored as F32",
         _with(_set_entry("model.safetensors", "model.norm.weight", "dtype", "F64")),
         2, "dtype and shape need", "model.norm.weight", group="safetensors"),
    Case("base-dtype-unknown", "header dtype is 'F33'",
         _with(_set_entry("model.safetensors", None, "dtype", "F33")),
         2, "unknown dtype", "model.safetensors", group="safetensors"),
    Case("base-dtype-not-string", "header dtype is a JSON list",
         _with(_set_entry("model.safetensors", None, "dtype", ["F32"])),
         2, "malformed safetensors header", "model.safetensors", group="safetensors"),
    Case("base-shape-negative", "header shape holds -1",
         _with(_set_entry("model.safetensors", "model.norm.weight", "shape", [-1])),
         2, "non-negative ints", "model.norm.weight", group="safetensors"),
    Case("base-metadata-not-object", "__metadata__ is a number",
         _with(lambda lay: edit_header(
             lay.base / "model.safetensors", lambda h: h.__setitem__("__metadata__", 5))),
         2, "__metadata__ is not an object", "model.safetensors", group="safetensors"),
    Case("adapter-truncated", "adapter_model.safetensors cut 64 bytes short",
         _with(lambda lay: _truncate(lay.adapter / "adapter_model.safetensors", -64)),
         2, "truncated", "adapter_model.safetensors", group="safetensors"),
    Case("adapter-header-lies", "adapter header says F64 for an F32 factor",
         _with(_set_entry("adapter_model.safetensors", f"{_Q0}.lora_A.weight", "dtype", "F64")),
         2, "dtype and shape need", "q_proj.lora_A.weight", group="safetensors"),
    # -- adapter tensors -----------------------------------------------------------------------
    Case("adapter-shape-vs-base", "lora_A has 20 input features, the base q_proj has 16",
         _with(_set_tensor(f"{_Q0}.lora_A.weight", torch.randn(RANK, 20))),
         2, "factors give", "q_proj", group="adapter tensors"),
    Case("adapter-factors-dont-compose", "lora_B has 3 columns for a rank-4 lora_A",
         _with(_set_tensor(f"{_Q0}.lora_B.weight", torch.randn(HIDDEN, 3))),
         2, "do not compose", "q_proj", group="adapter tensors"),
    Case("adapter-factor-1d", "lora_A is 1-D",
         _with(_set_tensor(f"{_Q0}.lora_A.weight", torch.randn(HIDDEN))),
         2, "do not compose", "q_proj", group="adapter tensors"),
    Case("adapter-two-replacements", "lm_head saved twice (plain and modules_to_save wrapper)",
         _with(_adapter_tensors_edit(lambda t: t.update({
             f"{PREFIX}lm_head.weight": torch.zeros(VOCAB, HIDDEN),
             f"{PREFIX}lm_head.modules_to_save.default.weight": torch.ones(VOCAB, HIDDEN),
         }))),
         2, "both replace", "lm_head.weight", group="adapter tensors"),
    Case("adapter-int-dtype", "lora_A stored as int32",
         _with(_set_tensor(f"{_Q0}.lora_A.weight", torch.ones(RANK, HIDDEN, dtype=torch.int32))),
         2, "floating-point dtype", "q_proj.lora_A.weight", group="adapter tensors"),
    Case("adapter-bool-dtype", "lora_B stored as bool",
         _with(_set_tensor(f"{_Q0}.lora_B.weight", torch.ones(HIDDEN, RANK, dtype=torch.bool))),
         2, "floating-point dtype", "q_proj.lora_B.weight", group="adapter tensors"),
    Case("adapter-missing-factor", "lora_B of q_proj is absent",
         _with(_drop(f"{_Q0}.lora_B.weight")),
         2, "not both factors", "q_proj", group="adapter tensors"),
    Case("adapter-unknown-module", "factors for a module the base does not have",
         _with(_adapter_tensors_edit(lambda t: t.update({
             f"{PREFIX}model.layers.0.self_attn.zz_proj.lora_A.weight": torch.randn(RANK, HIDDEN),
             f"{PREFIX}model.layers.0.self_attn.zz_proj.lora_B.weight": torch.randn(HIDDEN, RANK),
         }))),
         2, "the base has no tensor", "zz_proj", group="adapter tensors"),
    Case("adapter-unknown-lora-tensor", "a lora_C tensor loracc does not know",
         _with(_adapter_tensors_edit(lambda t: t.update({
             f"{_Q0}.lora_C.weight": torch.randn(RANK, RANK)}))),
         2, "unknown LoRA tensor", "lora_C", group="adapter tensors"),
    Case("adapter-int8-base-target", "the adapted base weight is int8 (quantized)",
         _with(_int8_target), 2, "not floating point", "q_proj", group="adapter tensors"),
    # -- non-finite values -----------------------------------------------------------------------
    Case("adapter-nan", "NaN in one lora_B value",
         _with(_poison(f"{_Q0}.lora_B.weight", _NAN)),
         2, "has NaN or Inf", "q_proj.lora_B.weight", group="non-finite"),
    Case("adapter-inf", "+Inf in one lora_A value",
         _with(_poison(f"{_Q0}.lora_A.weight", _INF)),
         2, "has NaN or Inf", "q_proj.lora_A.weight", group="non-finite"),
    Case("adapter-nan-allowed", "NaN in lora_B with --allow-nonfinite",
         _with(_poison(f"{_Q0}.lora_B.weight", _NAN), extra=("--allow-nonfinite",)),
         0, "merged 4 sites", group="non-finite"),
    Case("merged-overflow", "finite factors of 1e20 whose product overflows fp32",
         _with(_adapter_tensors_edit(lambda t: t.update({
             f"{_Q0}.lora_A.weight": torch.full((RANK, HIDDEN), 1e20),
             f"{_Q0}.lora_B.weight": torch.full((HIDDEN, RANK), 1e20)}))),
         2, "has NaN or Inf", "model.layers.0.self_attn.q_proj.weight", group="non-finite"),
    Case("merged-overflow-fp16", "fp16 base; the merged value 1.6e5 overflows only in fp16",
         _fp16_overflow, 2, "has NaN or Inf", "model.layers.0.self_attn.q_proj.weight",
         group="non-finite"),
    Case("dora-zero-norm", "DoRA site whose W + dW has an all-zero output row",
         _dora_zero_norm, 2, "DoRA norm", "model.layers.0.self_attn.q_proj",
         needs="loracc.passes.fold_dora", group="non-finite"),
    # -- adapter_config.json -------------------------------------------------------------------
    Case("config-not-json", "adapter_config.json is not JSON",
         _with(_config(text="{'r': 8,")), 2, "not valid JSON", "adapter_config.json",
         group="adapter_config.json"),
    Case("config-not-utf8", "adapter_config.json holds invalid UTF-8",
         _with(_config(text=b'{"r": "\xff"}')), 2, "cannot read", "adapter_config.json",
         group="adapter_config.json"),
    Case("config-deep-nesting", "adapter_config.json is a list nested 100000 deep",
         _with(_config(text=_deep(100000))), 2, "nested too deeply", "adapter_config.json",
         group="adapter_config.json"),
    Case("config-not-object", "adapter_config.json is a JSON list",
         _with(_config(text="[1, 2]")), 2, "not a JSON object", "adapter_config.json",
         group="adapter_config.json"),
    Case("config-r-string", "r is the string \"8\"",
         _with(_config({"r": "8"})), 2, "'r' must be a positive integer", "adapter_config.json",
         group="adapter_config.json"),
    Case("config-r-zero", "r is 0",
         _with(_config({"r": 0})), 2, "'r' must be a positive integer", "adapter_config.json",
         group="adapter_config.json"),
    Case("config-r-negative", "r is -4",
         _with(_config({"r": -4})), 2, "'r' must be a positive integer", "adapter_config.json",
         group="adapter_config.json"),
    Case("config-r-bool", "r is true",
         _with(_config({"r": True})), 2, "'r' must be a positive integer", "adapter_config.json",
         group="adapter_config.json"),
    Case("config-alpha-string", "lora_alpha is \"16\"",
         _with(_config({"lora_alpha": "16"})), 2, "'lora_alpha' must be a finite number",
         "adapter_config.json", group="adapter_config.json"),
    Case("config-targets-wrong-type", "target_modules is 5",
         _with(_config({"target_modules": 5})), 2, "'target_modules' must be",
         "adapter_config.json", group="adapter_config.json"),
    Case("config-rank-pattern-zero", "rank_pattern gives q_proj rank 0",
         _with(_config({"rank_pattern": {"q_proj": 0}})), 2, "'rank_pattern' must be",
         "adapter_config.json", group="adapter_config.json"),
    Case("config-bad-regex", "an alpha_pattern key is not a regular expression",
         _with(_config({"alpha_pattern": {"q_proj(": 4}})), 2, "not a valid regular expression",
         "alpha_pattern", group="adapter_config.json"),
    Case("config-bad-regex-targets", "target_modules is a string that is not a regex",
         _with(_config({"target_modules": "*q_proj"})), 2, "not a valid regular expression",
         "target_modules", group="adapter_config.json"),
    Case("config-peft-type", "peft_type is IA3",
         _with(_config({"peft_type": "IA3"})), 2, "reads LoRA adapters only",
         "adapter_config.json", group="adapter_config.json"),
    Case("config-unknown-field", "an unknown field from a peft no newer than loracc knows",
         _with(_config({"my_custom_flag": True})), 0, "unknown field 'my_custom_flag'",
         group="adapter_config.json"),
    Case("config-future-field", "peft 0.99 writes a field loracc does not know, set",
         _with(_config({"peft_version": "0.99.0", "lora_frobnicate": True})),
         2, "'lora_frobnicate'", "newer than loracc", group="adapter_config.json"),
    Case("config-future-field-unset", "peft 0.99 writes an unknown field, left at false",
         _with(_config({"peft_version": "0.99.0", "lora_frobnicate": False})),
         0, "unknown field 'lora_frobnicate'", group="adapter_config.json"),
    Case("config-alora", "alora_invocation_tokens set (no merged form exists)",
         _with(_config({"alora_invocation_tokens": [1, 2]})), 2, "cannot merge",
         "alora_invocation_tokens", group="adapter_config.json"),
    Case("config-missing", "the adapter folder has no adapter_config.json",
         _with(lambda lay: (lay.adapter / "adapter_config.json").unlink()),
         2, "no adapter_config.json", "adapter", group="adapter_config.json"),
    # -- pickles ---------------------------------------------------------------------------------
    Case("adapter-pickle-only", "only adapter_model.bin (a pickle that would create a file)",
         _with(_pickle_canary("adapter", "adapter_model.bin")),
         2, "never unpickles", "adapter_model.bin", group="pickles"),
    Case("adapter-pickle-beside-safetensors", "adapter_model.bin next to the safetensors file",
         _with(_pickle_canary("adapter", "adapter_model.bin", keep_safetensors=True)),
         0, "merged 4 sites", group="pickles"),
    Case("base-pickle-only", "the base has only pytorch_model.bin (a pickle)",
         _with(_pickle_canary("base", "pytorch_model.bin")),
         2, "never unpickles", "pytorch_model.bin", group="pickles"),
    # -- paths: shard names and links ------------------------------------------------------------
    Case("index-dotdot", "an index shard name '../outside/...'",
         _with(_index_name(lambda lay: "../outside/model-00002-of-00002.safetensors"), shards=2),
         2, "points outside", "model.safetensors.index.json", group="paths"),
    Case("index-absolute", "an index shard name that is an absolute path",
         _with(_index_name(lambda lay: str(lay.root / "outside/model-00002-of-00002.safetensors")),
               shards=2),
         2, "points outside", "model.safetensors.index.json", group="paths"),
    Case("index-symlink-out", "a shard that is a link to a file outside the folder",
         _with(_shard_link(None), shards=2),  # type: ignore[arg-type]
         2, "resolves outside", "model-00002-of-00002.safetensors", group="paths"),
    Case("index-symlink-loop", "a shard that is a link to itself",
         _with(_shard_link(lambda lay: lay.base / "model-00002-of-00002.safetensors"), shards=2),
         2, "cannot be resolved", "model-00002-of-00002.safetensors", group="paths"),
    Case("index-nul-byte", "an index shard name holding a NUL byte",
         _with(_index_name(lambda lay: "model-00002-of-00002.safetensors\0x"), shards=2),
         2, "NUL byte", "model.safetensors.index.json", group="paths"),
    Case("index-missing-shard", "the index names a shard that does not exist",
         _with(lambda lay: (lay.base / "model-00002-of-00002.safetensors").unlink(), shards=2),
         2, "shard not found", "model-00002-of-00002.safetensors", group="paths"),
    Case("index-weight-map-type", "weight_map is a list",
         _with(_index_edit(lambda d: d.__setitem__("weight_map", [])), shards=2),
         2, "'weight_map' must map", "model.safetensors.index.json", group="paths"),
    Case("index-lists-absent-tensor", "the index lists a tensor no shard holds",
         _with(_index_edit(lambda d: d["weight_map"].__setitem__(
             "ghost.weight", "model-00001-of-00002.safetensors")), shards=2),
         2, "is not in its shard", "ghost.weight", group="paths"),
    Case("index-duplicate-tensor", "two shards hold the same tensor",
         _with(_duplicate_tensor, shards=2), 2, "also in", "model.embed_tokens.weight",
         group="paths"),
    Case("base-symlink-out", "model.safetensors is a link to a file outside the folder",
         _with(_single_link_out), 2, "resolves outside", "model.safetensors", group="paths"),
    Case("adapter-symlink-out", "adapter_model.safetensors links to a file outside the folder",
         _with(_adapter_link_out), 2, "resolves outside", "adapter_model.safetensors",
         group="paths"),
    Case("hf-cache-links", "a hub-cache snapshot whose files link into ../../blobs (allowed)",
         _hf_cache, 0, "merged 4 sites", group="paths"),
    Case("base-hub-repo-folder", "--base is a hub-cache repository folder (models--ORG--NAME): "
         "its refs/main snapshot is read", _hub_repo(ref="0123abcd"), 0, "merged 4 sites",
         group="paths"),
    Case("base-hub-repo-no-ref", "--base is a hub-cache repository folder with two snapshots "
         "and no refs/main", _hub_repo(ref=None, extra_snapshots=("89abcdef",)), 2,
         "without refs/main", "models--tiny--llama", group="paths"),
    Case("base-hub-ref-dangling", "--base is a hub-cache repository folder whose refs/main "
         "names a revision with no snapshot", _hub_repo(ref="feedbeef"), 2,
         "has no snapshots/ folder", "refs/main", group="paths"),
    Case("base-hub-ref-dotdot", "refs/main of a hub-cache repository folder names '..' (would "
         "be the repository folder itself)", _hub_repo(ref=".."), 2, "has no snapshots/ folder",
         "refs/main", group="paths"),
    Case("base-hub-id-not-cached", "--base is a hub id (org/name) that is not in the local "
         "Hugging Face cache (loracc does not download)",
         _with(_set_arg("--base", lambda lay: "no-such-org/no-such-model")), 2,
         "not in the local Hugging Face cache", "models--no-such-org--no-such-model",
         group="paths"),
    Case("adapter-file-path", "--adapter names the adapter's adapter_model.safetensors "
         "(its folder is read)",
         _with(_set_arg("--adapter", lambda lay: str(lay.adapter / "adapter_model.safetensors"))),
         0, "merged 4 sites", group="paths"),
    Case("adapter-other-file", "--adapter names a file that is not one of an adapter's",
         _with(_set_arg("--adapter", lambda lay: str(lay.base / "config.json"))), 2,
         "give the adapter's folder", "config.json", group="paths"),
    Case("base-config-symlink-out", "the base config.json links to a JSON file outside the folder",
         _with(_config_link_out), 2, "resolves outside", "config.json", group="paths"),
    Case("base-side-file-fifo", "a named pipe among the base's side files (would block a copy)",
         _with(_fifo_side_file), 2, "named pipe", "tokenizer.json", group="paths"),
    Case("base-missing", "the base folder does not exist",
         _with(lambda lay: shutil.rmtree(lay.base)), 2, "base checkpoint folder not found",
         "base", group="paths"),
    Case("adapter-missing", "the adapter folder does not exist",
         _with(lambda lay: shutil.rmtree(lay.adapter)), 2, "adapter folder not found",
         "adapter", group="paths"),
    Case("base-config-not-json", "the base config.json is not JSON",
         _with(lambda lay: (lay.base / "config.json").write_text("{")), 2, "not valid JSON",
         "config.json", group="paths"),
    # -- the output path -------------------------------------------------------------------------
    Case("output-is-base", "-o names the base folder",
         _out_at(lambda lay: lay.base), 2, "overlaps the input", "base", group="output"),
    Case("output-is-adapter", "-o names the adapter folder, with --force",
         _out_at(lambda lay: lay.adapter, force=True), 2, "overlaps the input", "adapter",
         group="output"),
    Case("output-inside-input", "-o is a new folder inside the base folder",
         _out_at(lambda lay: lay.base / "merged", preexists=False), 2, "overlaps the input",
         "base", group="output"),
    Case("output-contains-input", "-o is the folder holding both inputs, with --force",
         _out_at(lambda lay: lay.root, force=True), 2, "overlaps the input", "base",
         group="output"),
    Case("output-links-to-input", "-o is a link to the base folder, with --force",
         _out_at(_link_to_base, force=True), 2, "overlaps the input", "base", group="output"),
    Case("output-exists", "-o already exists",
         _out_at(_existing_out), 2, "already exists (use --force", "out", group="output"),
    Case("output-exists-force", "-o already exists, with --force: replaced",
         _out_at(_existing_out, preexists=False, force=True), 0, "merged 4 sites",
         group="output"),
    Case("output-parent-missing", "-o's parent folder does not exist",
         _out_at(lambda lay: lay.root / "nowhere" / "out", preexists=False), 2,
         "parent folder does not exist", "nowhere", group="output"),
    Case("output-parent-is-file", "-o's parent is a file",
         _out_at(lambda lay: (lay.root / "afile").write_text("x") and lay.root / "afile" / "out",
                 preexists=False), 2, "parent is not a folder", "afile", group="output"),
    Case("output-is-hub-blobs", "-o is the hub-cache blobs folder the base links into, --force",
         _hub_blobs_out, 2, "overlaps the files of the input", "blobs", group="output"),
    # -- ONNX files: external data and the protobuf -------------------------------------------
    Case("onnx-data-dotdot", "an external-data location '../outside/model.onnx.data'",
         _onnx_with(_data_location(lambda lay: f"../outside/{ONNX_DATA}")),
         2, "points outside", "../outside/model.onnx.data", needs="onnx_ir", group="onnx"),
    Case("onnx-data-absolute", "an external-data location that is an absolute path",
         _onnx_with(_data_location(lambda lay: str(lay.root / "outside" / ONNX_DATA))),
         2, "points outside", "outside/model.onnx.data", needs="onnx_ir", group="onnx"),
    Case("onnx-data-symlink-out", "model.onnx.data is a link to a file outside the folder",
         _onnx_with(_data_link_out), 2, "resolves outside", "model.onnx.data", needs="onnx_ir",
         group="onnx"),
    Case("onnx-data-missing", "the external-data file does not exist",
         _onnx_with(lambda lay: (lay.base / ONNX_DATA).unlink()), 2, "not found",
         "model.onnx.data", needs="onnx_ir", group="onnx"),
    Case("onnx-data-truncated", "model.onnx.data cut 100 bytes short",
         _onnx_with(lambda lay: _truncate(lay.base / ONNX_DATA, -100)), 2, "do not hold",
         "model.layers.1.self_attn.v_proj.weight", needs="onnx_ir", group="onnx"),
    Case("onnx-data-offset-past-end", "an initializer's offset lies past the end of the data",
         _onnx_with(_set_external(-1, "offset", lambda lay, old: str(old + 4096))),
         2, "do not hold", "model.layers.1.self_attn.v_proj.weight", needs="onnx_ir",
         group="onnx"),
    Case("onnx-data-length-lies", "an initializer's length is twice its dtype x shape",
         _onnx_with(_set_external(0, "length", lambda lay, old: str(2 * old))),
         2, "do not hold", "model.layers.0.self_attn.q_proj.weight", needs="onnx_ir",
         group="onnx"),
    Case("onnx-data-offset-negative", "an initializer's offset is -5",
         _onnx_with(_set_external(0, "offset", lambda lay, old: "-5")),
         2, "not a readable ONNX model", "model.onnx", needs="onnx_ir", group="onnx"),
    Case("onnx-data-nul-byte", "an external-data location holding a NUL byte",
         _onnx_with(_set_external(0, "location", lambda lay, old: "model.onnx.data\0x")),
         2, "holds a NUL byte", "model.layers.0.self_attn.q_proj.weight", needs="onnx_ir",
         group="onnx"),
    Case("onnx-data-fifo", "the external-data file is a named pipe (reading it would block)",
         _onnx_with(lambda lay: ((lay.base / ONNX_DATA).unlink(), os.mkfifo(lay.base / ONNX_DATA))),
         2, "is not a regular file", "model.onnx.data", needs="onnx_ir", group="onnx"),
    Case("onnx-not-protobuf", "model.onnx holds text, not a protobuf",
         _onnx_with(lambda lay: (lay.base / "model.onnx").write_text("not an onnx model\n")),
         2, "not a readable ONNX model", "model.onnx", needs="onnx_ir", group="onnx"),
    Case("onnx-truncated", "model.onnx cut in half",
         _onnx_with(lambda lay: _truncate(
             lay.base / "model.onnx", (lay.base / "model.onnx").stat().st_size // 2)),
         2, "not a readable ONNX model", "model.onnx", needs="onnx_ir", group="onnx"),
    Case("onnx-empty", "model.onnx is empty (an empty protobuf parses)",
         _onnx_with(lambda lay: _truncate(lay.base / "model.onnx", 0)),
         2, "not a readable ONNX model", "model.onnx", needs="onnx_ir", group="onnx"),
    Case("onnx-missing", "the base .onnx file does not exist",
         _onnx_with(lambda lay: (lay.base / "model.onnx").unlink()), 2, "ONNX model not found",
         "model.onnx", needs="onnx_ir", group="onnx"),
    Case("onnx-base-is-hf-folder", "export --onnx --base names a Hugging Face folder (merge "
         "takes those; the message says how to get an ONNX model)",
         _onnx_with(lambda lay: (write_base(lay.root / "hf"), _set_arg(
             "--base", lambda lay: str(lay.root / "hf"))(lay))), 2, "`loracc merge` takes",
         "hf", needs="onnx_ir", group="onnx"),
    Case("run-model-is-hf-folder", "run --model names a Hugging Face folder (golden takes "
         "those; run executes ONNX models)",
         _argv(lambda lay: ["run", "--model", str(lay.base), "--inputs", str(lay.root / "in.npz")]),
         2, "a Hugging Face folder with no .onnx file", "base", group="onnx"),
    # -- ONNX binding, pack and run -------------------------------------------------------------
    Case("onnx-site-unbound", "the adapter targets k_proj, which the graph does not have",
         _onnx_with(lambda lay: None, targets=("q_proj", "k_proj")),
         2, "cannot bind to the ONNX graph", "model.layers.0.self_attn.k_proj", needs="onnx_ir",
         group="onnx"),
    Case("onnx-site-quantized", "v_proj of layer 1 is a MatMulNBits whose packed weight does "
         "not fit its K/N/bits/block_size",
         _onnx_quantized, 2, "MatMulNBits", "model.layers.1.self_attn.v_proj", needs="onnx_ir",
         group="onnx"),
    Case("onnx-site-shape", "lora_A has 20 input features, the bound initializer has 16",
         _onnx_with(_set_tensor(f"{_Q0}.lora_A.weight", torch.randn(RANK, 20))),
         2, "adapter's factors give", "model.layers.0.self_attn.q_proj", needs="onnx_ir",
         group="onnx"),
    Case("pack-module-without-slot", "pack an adapter on q_proj and v_proj; only q_proj has slots",
         _slotted, 2, "no adapter slot", "model.layers.0.self_attn.v_proj", needs="onnxruntime",
         group="onnx"),
    Case("pack-no-manifest", "pack for a model with neither the loracc.slots manifest nor slots",
         _pack_with(lambda lay: lay.argv.__setitem__(2, str(lay.root / "base" / "model.onnx"))),
         2, "no 'loracc.slots' metadata", "model.onnx", needs="onnxruntime", group="onnx"),
    Case("pack-mixed-on-keep-lora", "pack --mixed-batch for a keep-lora model (no mixed slots)",
         _pack_with(lambda lay: lay.argv.insert(1, "--mixed-batch")),
         2, "no 'loracc.mixed' metadata", "model.onnx", needs="loracc.lower.onnx.mixed",
         group="onnx"),
    Case("pack-adapter-is-file", "pack --adapter names a corrupt .onnx_adapter file, not a folder",
         _pack_with(lambda lay: lay.argv.__setitem__(4, _write(
             lay.root / "bad.onnx_adapter", b"TORT" + b"\xff" * 60))),
         2, "give the adapter's folder", "bad.onnx_adapter", needs="onnxruntime", group="onnx"),
    Case("run-adapter-garbage", "run with an .onnx_adapter of 64 garbage bytes",
         _run_with_adapter(lambda lay: b"\x10\x00\x00\x00TORT" + b"\xff" * 56),
         2, "not a readable .onnx_adapter file", "bad.onnx_adapter", needs="onnxruntime",
         group="onnx"),
    Case("run-adapter-truncated", "run with a valid .onnx_adapter cut in half",
         _run_with_adapter(lambda lay: (raw := _adapter_file_bytes(lay))[: len(raw) // 2]),
         2, "not a readable .onnx_adapter file", "bad.onnx_adapter", needs="onnxruntime",
         group="onnx"),
    Case("run-model-not-protobuf", "run a model.onnx that holds text, not a protobuf",
         _run_with_adapter(_adapter_file_bytes, model=b"not an onnx model\n"),
         2, "cannot create a session", "model.onnx", needs="onnxruntime", group="onnx"),
    # -- ONNX outputs -------------------------------------------------------------------------
    Case("export-output-is-base", "export -o names the base model.onnx, with --force",
         _onnx_out(lambda lay: lay.base / "model.onnx", force=True), 2, "overlaps the input",
         "model.onnx", needs="onnx_ir", group="onnx output"),
    Case("export-output-data-is-base-data",
         "-o base/weights.onnx, whose weights.onnx.data is the base's external data, --force",
         _onnx_out(lambda lay: lay.base / "weights.onnx", preexists=False, force=True,
                   location="weights.onnx.data"),
         2, "overlaps the input", "weights.onnx.data", needs="onnx_ir", group="onnx output"),
    Case("export-output-is-data-file", "export -o names the base's model.onnx.data, with --force",
         _onnx_out(lambda lay: lay.base / ONNX_DATA, force=True), 2, "must end in .onnx",
         "model.onnx.data", needs="onnx_ir", group="onnx output"),
    Case("export-output-exists", "export -o names an existing file",
         _onnx_out(_existing("out.onnx")), 2, "already exists (use --force", "out.onnx",
         needs="onnx_ir", group="onnx output"),
    Case("export-data-output-exists", "out.onnx.data exists, out.onnx does not",
         _onnx_out(_existing("out.onnx.data"), preexists=False), 2, "already exists",
         "out.onnx.data", needs="onnx_ir", group="onnx output"),
    Case("export-adapter-output-exists", "--keep-lora; out.onnx_adapter exists, out.onnx does not",
         _onnx_out(_existing("out.onnx_adapter"), preexists=False, keep_lora=True),
         2, "already exists", "out.onnx_adapter", needs="onnxruntime", group="onnx output"),
    Case("pack-output-is-model-data",
         "pack -o names the model's external-data file (weights.onnx_adapter), with --force",
         _pack_over_model_data, 2, "overlaps the input", "weights.onnx_adapter",
         needs="onnxruntime", group="onnx output"),
    Case("pack-output-exists", "pack -o names an existing .onnx_adapter",
         _pack_with(_existing_adapter_file, targets=("q_proj",)),
         2, "already exists (use --force", "a.onnx_adapter", needs="onnxruntime",
         group="onnx output"),
    # -- values and names past what the format or loracc can hold (issue 11) --------------------
    Case("adapter-rank-zero", "q_proj's lora_A is (0, 16) and lora_B (16, 0): rank 0",
         _with(_adapter_tensors_edit(lambda t: t.update({
             f"{_Q0}.lora_A.weight": torch.zeros(0, HIDDEN),
             f"{_Q0}.lora_B.weight": torch.zeros(HIDDEN, 0)}))),
         2, "have rank 0", "model.layers.0.self_attn.q_proj", group="bounds"),
    Case("adapter-shape-2-63", "an adapter tensor of shape [2**63, 0] (empty, past int64)",
         _with(_header_entry_shape("adapter_model.safetensors", f"{_Q0}.lora_A.weight",
                                   [2**63, 0])),
         2, "2**63 or more", "q_proj.lora_A.weight", group="bounds"),
    Case("base-shape-2-70", "a base tensor of shape [2**70, 0] (safetensors cannot write it)",
         _with(_header_entry_shape("model.safetensors", "model.norm.weight", [2**70, 0])),
         2, "2**63 or more", "model.norm.weight", group="bounds"),
    Case("base-shape-65-dims", "a base tensor with 65 dimensions of size 1",
         _with(_header_entry_shape("model.safetensors", "model.norm.weight", [1] * 64 + [0])),
         2, "more than 64 dimensions", "model.norm.weight", group="bounds"),
    Case("base-too-many-tensors", "101,000 zero-size tensors added to the base's 22 KB",
         _with(_many_empty_tensors(101_000)), 2, "tensors in", "model.safetensors",
         group="bounds"),
    Case("base-header-duplicate-key", "the base header names model.norm.weight twice",
         _with(_duplicate_header_key), 2, "duplicate key 'model.norm.weight'",
         "model.safetensors", group="bounds"),
    Case("adapter-metadata-not-strings", "the adapter's __metadata__ maps 'format' to a list",
         _with(lambda lay: edit_header(lay.adapter / "adapter_model.safetensors",
                                       lambda h: h.__setitem__("__metadata__", {"format": [[]]}))),
         2, "must map strings to strings", "adapter_model.safetensors", group="bounds"),
    Case("config-alpha-400-digits", "lora_alpha is an integer of 400 digits",
         _with(_config({"lora_alpha": 10**400})), 2, "'lora_alpha' must be a finite number",
         "adapter_config.json", group="bounds"),
    Case("config-alpha-nan", "lora_alpha is NaN (Python's json reads it)",
         _with(_config({"lora_alpha": _NAN})), 2, "'lora_alpha' must be a finite number",
         "adapter_config.json", group="bounds"),
    Case("config-alpha-infinity", "lora_alpha is Infinity",
         _with(_config({"lora_alpha": _INF})), 2, "'lora_alpha' must be a finite number",
         "adapter_config.json", group="bounds"),
    Case("config-alpha-pattern-nan", "an alpha_pattern value is NaN",
         _with(_config({"alpha_pattern": {"q_proj": _NAN}})), 2,
         "'alpha_pattern' must be an object of finite numbers", "adapter_config.json",
         group="bounds"),
    Case("config-peft-version-5000-digits", "peft_version is '0.' and 5000 digits",
         _with(_config({"peft_version": "0." + "9" * 5000})), 2, "is not a version",
         "adapter_config.json", group="bounds"),
    Case("config-duplicate-key", "adapter_config.json sets lora_alpha twice",
         _with(_raw_config('"lora_alpha": 64')), 2, "duplicate key 'lora_alpha'",
         "adapter_config.json", group="bounds"),
    Case("base-config-duplicate-key", "the base config.json sets model_type twice",
         _with(lambda lay: (lay.base / "config.json").write_text(
             '{"model_type": "llama", "model_type": "gpt2"}')),
         2, "duplicate key 'model_type'", "config.json", group="bounds"),
    Case("config-replication-large", "layer_replication builds 18 layers from the base's 2",
         _with(_config({"layer_replication": [[0, 2]] * 9})), 2, "--allow-large-replication",
         "layer_replication", group="bounds"),
    Case("config-replication-large-allowed", "the same with --allow-large-replication",
         _with(_config({"layer_replication": [[0, 2]] * 9}),
               extra=("--allow-large-replication",)),
         0, "merged 4 sites", group="bounds"),
    Case("name-newline", "an adapter key holding a newline and a fake 'merged 4 sites OK' line",
         _with(_adapter_tensors_edit(lambda t: t.update({
             f"{PREFIX}model.layers.0.self_attn.{_SPOOF}.lora_A.weight": torch.randn(RANK, HIDDEN),
             f"{PREFIX}model.layers.0.self_attn.{_SPOOF}.lora_B.weight": torch.randn(HIDDEN, RANK),
         }))),
         2, "unknown LoRA tensor", "zz\\x0aloracc: merged", group="bounds"),
    Case("name-nul-bidi", "an adapter key holding NUL and U+202E (right-to-left override)",
         _with(_adapter_tensors_edit(lambda t: t.update({
             f"{PREFIX}model.layers.0.self_attn.{_BIDI}.lora_A.weight": torch.randn(RANK, HIDDEN),
             f"{PREFIX}model.layers.0.self_attn.{_BIDI}.lora_B.weight": torch.randn(HIDDEN, RANK),
         }))),
         2, "the base has no tensor", "zz\\u202e\\x00gpj.exe", group="bounds"),
    Case("params-order-unknown",
         "`inspect` without a base: two target_parameters on one module other than "
         "gate_up_proj/down_proj (peft's nesting order is the module's, which is not saved)",
         _nested_params(("w_in", "w_out"), RANK), 2, "do not say which is which",
         "model.layers.0.mlp.experts", group="bounds"),
    Case("params-rank-split",
         "`inspect` without a base: r = 5 does not divide a target_parameters factor's 12 rows",
         _nested_params(("gate_up_proj", "down_proj"), 5), 2, "do not split into r=5",
         "model.layers.0.mlp.experts.gate_up_proj", group="bounds"),
    Case("usage-device-unknown", "--device tpu",
         _with(lambda lay: None, extra=("--device", "tpu")), 2, "is not a device name",
         "--device", group="usage"),
    Case("usage-device-meta", "--device meta (a torch device loracc does not compute on)",
         _with(lambda lay: None, extra=("--device", "meta")), 2, "cpu or cuda only",
         "--device", group="usage"),
    # -- stacks (merge --adapter A --adapter B) ---------------------------------------------------
    Case("stack-weights-count", "two adapters, `--weights 1.0` (one weight)",
         _stack(extra=("--weights", "1.0")), 2, "1 weight(s) for 2 adapter(s)", "--weights",
         group="stack"),
    Case("stack-weights-not-numbers", "`--weights 1,x`",
         _stack(extra=("--weights", "1,x")), 2, "cannot read '1,x'", "--weights", group="stack"),
    Case("stack-weights-nonfinite", "`--weights 1,inf`",
         _stack(extra=("--weights", "1,inf")), 2, "inf is not a finite number", "--weights",
         group="stack"),
    Case("stack-second-bad-config", "the second adapter's adapter_config.json has r = 0",
         _stack({"r": 0}), 2, "'r' must be a positive integer", "adapter2", group="stack"),
    Case("stack-same-adapter-twice", "`--adapter A --adapter A`",
         _argv(lambda lay: [*lay.argv, "--adapter", str(lay.adapter)]), 2, "is given twice",
         "adapter", group="stack"),
    Case("stack-layer-replication", "the second adapter has layer_replication",
         _stack({"layer_replication": [[0, 2], [1, 2]]}), 2, "layer_replication in a stack",
         "adapter2", group="stack"),
    Case("stack-residual-second", "the second adapter has init_lora_weights='olora'",
         _stack({"init_lora_weights": "olora"}), 2, "(a residual base) and is adapter 2",
         "adapter2", group="stack"),
    # -- combine (loracc combine --adapter A --adapter B --method M) -----------------------------
    Case("combine-weights-count", "`--weights 1.0` for two adapters",
         _combine(("--method", "cat", "--weights", "1.0")), 2, "1 weight(s) for 2 adapter(s)",
         "--weights", group="combine"),
    Case("combine-weights-not-numbers", "`--weights 1,x`",
         _combine(("--method", "cat", "--weights", "1,x")), 2, "cannot read '1,x'", "--weights",
         group="combine"),
    Case("combine-weights-nonfinite", "`--weights 1,nan`",
         _combine(("--method", "cat", "--weights", "1,nan")), 2, "nan is not a finite number",
         "--weights", group="combine"),
    Case("combine-unknown-method", "`--method mean`",
         _combine(("--method", "mean",)), 2, "'mean' is not one of", "--method",
         group="combine"),
    Case("combine-dense-svd-method", "`--method ties_svd` (its pruning needs the dense delta)",
         _combine(("--method", "ties_svd", "--density", "0.5")), 2, "dense SVD", "ties_svd",
         group="combine"),
    Case("combine-density-out-of-range", "`--method ties --density 1.5`",
         _combine(("--method", "ties", "--density", "1.5")), 2, "must be in (0, 1]",
         "--density", group="combine"),
    Case("combine-density-missing", "`--method dare_linear` without --density",
         _combine(("--method", "dare_linear",)), 2, "needs --density", "dare_linear",
         group="combine"),
    Case("combine-rank-ignored", "`--method linear --rank 2` (only svd truncates)",
         _combine(("--method", "linear", "--rank", "2")), 2, "needs --method svd", "--rank",
         group="combine"),
    Case("combine-two-dora-one-module", "two DoRA adapters both on q_proj, `--method cat`",
         _combine(("--method", "cat",), dora=True), 2, "DoRA on a module", "q_proj",
         group="combine"),
    Case("combine-linear-mismatched-ranks", "ranks 4 and 8 on one module, `--method linear`",
         _combine(("--method", "linear",), rank=8), 2, "needs one rank", "q_proj",
         group="combine"),
    Case("combine-same-adapter-twice", "`--adapter A --adapter A`",
         _argv(lambda lay: ["combine", "--adapter", str(lay.adapter), "--adapter",
                            str(lay.adapter), "--method", "cat", "-o", str(lay.out)]),
         2, "is given twice", "adapter", group="combine"),
    Case("combine-output-over-input", "`-o` the second input adapter, with --force",
         _combine_over_input, 2, "output overlaps", "adapter2", group="combine"),
    # -- usage -----------------------------------------------------------------------------------
    Case("usage-missing-base", "--base is not given",
         _argv(lambda lay: ["merge", "--adapter", str(lay.adapter), "-o", str(lay.out)]),
         2, "Missing option '--base'", one_line=False, group="usage"),
    Case("usage-bad-dtype", "--dtype float8",
         _with(lambda lay: None, extra=("--dtype", "float8")), 2, "is not one of", "--dtype",
         group="usage"),
    Case("usage-bad-shard-size", "--max-shard-size lots",
         _with(lambda lay: None, extra=("--max-shard-size", "lots")), 2, "cannot read",
         "--max-shard-size", group="usage"),
)  # fmt: skip


CASES_BY_NAME: dict[str, Case] = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names repeat"


def build_valid(root: Path, *, shards: int = 1) -> Layout:
    """A valid base + adapter pair (4 LoRA sites, scale 2) and the plain merge command line."""
    root.mkdir(parents=True, exist_ok=True)
    return _std(root, shards=shards)


def build_case(case: Case, root: Path) -> Layout:
    """Build ``case`` in the empty folder ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    return case.build(root)


TABLE_START, TABLE_END = "<!-- corpus-table:start -->", "<!-- corpus-table:end -->"


def markdown_table() -> str:
    """The corpus as a Markdown table for docs/ERRORS.md."""
    rows = [
        "| case | input | exit | message contains | and names |",
        "|---|---|---|---|---|",
    ]
    for c in CASES:
        msg = c.message.replace("|", "\\|")
        names = f"`{c.names}`" if c.names else ""
        note = f" **Known gap:** {c.pending}." if c.pending else ""
        note += f" **Known bug:** {c.bug}." if c.bug else ""
        rows.append(f"| `{c.name}` | {c.what}.{note} | {c.exit_code} | `{msg}` | {names} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", help="build every case under DIR (default: a temp folder)")
    p.add_argument("--markdown", action="store_true", help="print the table for docs/ERRORS.md")
    p.add_argument("--update-doc", metavar="MD", help="rewrite the table between the markers")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown_table())
        return 0
    if args.update_doc:
        doc = Path(args.update_doc)
        head, rest = doc.read_text().split(TABLE_START, 1)
        _, tail = rest.split(TABLE_END, 1)
        doc.write_text(f"{head}{TABLE_START}\n{markdown_table()}\n{TABLE_END}{tail}")
        return 0
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="loracc-corpus-"))
    for case in CASES:
        lay = build_case(case, root / case.name)
        print(f"{case.name:<36} exit {case.exit_code}  {' '.join(lay.argv[:1])} ...")
    print(f"{len(CASES)} cases under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
