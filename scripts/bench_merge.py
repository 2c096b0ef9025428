#!/usr/bin/env python
"""Benchmark ``loracc merge`` against the copy limit and PEFT, on synthetic Llama checkpoints.

For each size it makes (once, cached in ``--workdir``) a synthetic Llama-shaped bf16 checkpoint
sharded like a Hub one, plus a realistic fp32 adapter (r=16, every linear layer of every block),
then measures, each in its own subprocess:

1. ``cp -r base/``: the disk limit;
2. PEFT: transformers ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload``
   + ``save_pretrained``;
3. ``loracc merge``.

Wall time is the subprocess's, start to exit (interpreter start and imports included). Peak
memory is the largest ``RssAnon`` of ``/proc/PID/status`` sampled every ``--sample-ms``: anonymous
pages only, so page cache and mmap'ed file pages are not counted. Before any timing is reported
the loracc output is compared tensor by tensor, bytes exactly, with PEFT's.

CPU time (user + sys of the subprocess) and, for loracc, ``merge_into``'s own seconds are shown
too. ``--paths ...,ref --ref DIR`` adds another loracc tree (e.g. the code before a change).

Usage::

    python scripts/bench_merge.py --quick                 # ~0.1B smoke run, a minute
    python scripts/bench_merge.py --sizes 0.5B,2B --repeat 3 --markdown table.md
    python scripts/bench_merge.py --sizes 2B --profile 40  # startup + per-step CPU of the merge
    python scripts/bench_merge.py --sizes 7B --cache warm,cold --check-tensors 48 --keep-inputs

At 7B only the base, the adapter and one output are on disk at a time (~28 GB): each output is
digested (sha256 per checked tensor) right after its run and removed; loracc's digests are then
compared with PEFT's. PEFT is skipped, with the reason, when its estimated peak (the model in
bf16 plus ~1 GiB, +10%) exceeds ``MemAvailable``.

docs/BENCHMARKS.md ("Merge") has the recorded tables and the exact commands.

Cache state: ``--cache warm`` (default) reads the base once before each timed run so every path
starts from a warm page cache; ``--cache cold`` drops the page cache before each run (root only;
elsewhere the cold runs are skipped with a note); ``--cache warm,cold`` does both.
Before each run the dirty pages of the previous one are flushed (``sync``, not timed); the
``+sync`` columns time a ``sync`` right after the path, i.e. until the bytes are on the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from loracc.io.safetensors import SafetensorsFile, SafetensorsWriter  # noqa: E402

# name -> (vocab, hidden, intermediate, layers, heads, kv_heads)
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (512, 128, 320, 2, 4, 2),  # tests: a few row blocks per tensor with a small _BLOCK
    "0.1B": (16000, 768, 2048, 12, 12, 4),
    "0.5B": (32000, 1536, 4096, 16, 12, 4),
    "1B": (32000, 2048, 5632, 16, 16, 8),
    "1.1B": (32000, 2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's dimensions, 2.2 GB
    "2B": (48000, 2048, 8192, 28, 16, 8),
    "7B": (32000, 4096, 11008, 32, 32, 32),  # Llama-2-7B's dimensions, 13.5 GB
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
}

PEFT_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
import torch
import transformers
from transformers import AutoModelForCausalLM
from peft import PeftModel
transformers.logging.set_verbosity_error()
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter)
model = model.merge_and_unload()
model.save_pretrained(out)
"""


# --------------------------------------------------------------------------------------------
# Synthetic inputs


def llama_tensors(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama checkpoint with untied embeddings, in the Hub's order."""
    vocab, hidden, inter, layers, heads, kv = SIZES[size]
    head_dim = hidden // heads
    table: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        table += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
        ]
    table += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return table


def param_count(size: str) -> int:
    return sum(math.prod(s) for _, s in llama_tensors(size))


def make_base(
    size: str, folder: Path, shard_bytes: int, dtype: torch.dtype = torch.bfloat16
) -> None:
    """A checkpoint (bf16 by default) sharded with transformers' rule, one tensor at a time."""
    from transformers import LlamaConfig

    vocab, hidden, inter, layers, heads, kv = SIZES[size]
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype=str(dtype).removeprefix("torch."),
    ).save_pretrained(tmp)
    table = llama_tensors(size)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in table:
        nbytes = dtype.itemsize * math.prod(shape)
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(tmp / fname, [(n, dtype, s) for n, s in items], {"format": "pt"})
        for name, shape in items:
            if len(shape) == 1:
                t = 1 + 0.1 * torch.randn(shape, generator=gen)
            else:
                t = torch.randn(shape, generator=gen).mul_(0.02)
            writer.write(name, t.to(dtype))
            weight_map[name] = fname
        writer.close()
        total += writer.data_bytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(folder)


def make_adapter(size: str, folder: Path, base: Path, alpha: float = ALPHA) -> None:
    """A PEFT LoRA adapter on every linear layer: r=16, alpha=32, fp32 A and B, B non-zero."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": RANK,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = torch.Generator().manual_seed(1)
    table = []
    for name, shape in llama_tensors(size):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_f, in_f = shape
        prefix = f"base_model.model.{module}"
        table.append((f"{prefix}.lora_A.weight", (RANK, in_f), in_f**-0.5))
        table.append((f"{prefix}.lora_B.weight", (out_f, RANK), 0.01))
    writer = SafetensorsWriter(
        tmp / "adapter_model.safetensors",
        [(n, torch.float32, s) for n, s, _ in table],
        {"format": "pt"},
    )
    for name, shape, std in table:
        writer.write(name, torch.randn(shape, generator=gen).mul_(std))
    writer.close()
    tmp.rename(folder)


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Run:
    path: str
    size: str
    wall_s: float
    peak_anon_mib: float
    peak_file_mib: float
    sync_s: float
    rc: int
    cache: str = "warm"
    cpu_s: float = 0.0
    inner_s: float | None = None
    note: str = ""


def _status_kib(pid: int) -> tuple[int, int]:
    anon = filed = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith(b"RssFile:"):
                    filed = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return anon, filed


def measure(
    cmd: list[str], sample_s: float, timeout: float, env: dict[str, str], cwd: Path
) -> tuple[float, int, int, float, int, str, str]:
    """Run ``cmd``: (wall s, peak RssAnon KiB, peak RssFile KiB, user+sys CPU s, rc, stdout,
    stderr tail). The CPU time is the child's own (``RUSAGE_CHILDREN`` before and after)."""
    peak = [0, 0]
    done = threading.Event()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)

    def sample() -> None:
        while not done.is_set():
            anon, filed = _status_kib(proc.pid)
            peak[0] = max(peak[0], anon)
            peak[1] = max(peak[1], filed)
            done.wait(sample_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    t.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = (err or b"").decode(errors="replace").strip().splitlines()[-5:]
    text = (out or b"").decode(errors="replace")
    return wall, peak[0], peak[1], cpu, proc.returncode, text, "\n".join(tail)


def can_drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def prepare_cache(mode: str, base: Path) -> None:
    os.sync()
    if mode == "cold":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        for f in sorted(base.iterdir()):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def run_path(
    path: str,
    size: str,
    base: Path,
    adapter: Path,
    out: Path,
    args: argparse.Namespace,
    cache: str = "warm",
) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    env, cwd = ENV, REPO
    if path == "copy":
        cmd = ["cp", "-r", str(base), str(out)]
    elif path == "peft":
        cmd = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)]
    else:  # loracc, or "ref": another loracc checkout (--ref), e.g. the one before a change
        cmd = [sys.executable, "-m", "loracc", "merge", "--base", str(base)]
        cmd += ["--adapter", str(adapter), "-o", str(out), "--json", "--device", args.device]
        if path == "ref":
            cwd = args.ref.resolve()
            env = {**ENV, "PYTHONPATH": str(cwd)}
    prepare_cache(cache, base)
    wall, anon, filed, cpu, rc, stdout, err = measure(
        cmd, args.sample_ms / 1000, args.timeout, env, cwd
    )
    t0 = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t0
    inner = None
    if path in ("loracc", "ref") and rc == 0:
        report = json.loads(stdout)  # "seconds" is the whole command's; its write step is ours
        inner = float(report.get("steps", {}).get("write", report["seconds"]))
    note = err if rc else ""
    run = Run(path, size, wall, anon / 1024, filed / 1024, sync_s, rc, cache, cpu, inner, note)
    merge_s = f"  (merge_into {inner:.2f} s)" if inner is not None else ""
    print(
        f"  {size:>5} {cache} {path:<6} wall {wall:7.2f} s (+sync {sync_s:5.2f} s)  "
        f"cpu {cpu:6.2f} s  peak anon {anon / 1024:6.0f} MiB  file {filed / 1024:5.0f} MiB  "
        f"rc {rc}{merge_s}",
        flush=True,
    )
    if rc:
        print(err, file=sys.stderr)
    return run


def _tensors(folder: Path) -> dict[str, SafetensorsFile]:
    files = [SafetensorsFile(p) for p in sorted(folder.glob("*.safetensors"))]
    return {k: f for f in files for k in f.tensors}


def checked_keys(base: Path, count: int) -> list[str]:
    """The tensors whose bytes are compared: all (``count`` 0), or ``count`` of them, drawn
    with a fixed seed from the edited and the unedited ones alike, plus the first and last."""
    keys = sorted(_tensors(base))
    if count <= 0 or count >= len(keys):
        return keys
    picked = set(random.Random(0).sample(keys, count - 2)) | {keys[0], keys[-1]}
    return sorted(picked)


def digests(folder: Path, keys: list[str]) -> dict[str, str]:
    """dtype, shape and sha256 of the bytes of each of ``keys`` in ``folder`` ("missing" when
    absent), so outputs can be compared after they are deleted."""
    files = _tensors(folder)
    out = {}
    for key in keys:
        if key not in files:
            out[key] = "missing"
            continue
        t = files[key].read(key)
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        out[key] = f"{t.dtype} {list(t.shape)} {hashlib.sha256(data).hexdigest()}"
    return out


def compare(got: dict[str, str], want: dict[str, str], every: bool) -> tuple[bool, str]:
    """loracc's digests (``got``) against PEFT's (``want``): equal means byte for byte."""
    bad = [k for k in want if got.get(k) != want[k]]
    what = "tensors" if every else "sampled tensors"
    if bad:
        return False, f"{len(bad)} of {len(want)} {what} differ, e.g. {bad[:3]}"
    return True, f"{len(want)} {what} identical"


def peft_fits(size: str) -> str:
    """Why PEFT cannot run here ("" when it can): its peak is the bf16 model plus ~1 GiB (at
    1.1B: 2.36 GiB for a 2.2 GB model), with 10% to spare: the machine is shared."""
    need = int(1.1 * 2 * param_count(size)) + 2**30
    avail = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    if need > avail:
        return (
            f"PEFT skipped at {size}: it needs ~{need / 2**30:.1f} GiB of memory "
            f"(the bf16 model + ~1 GiB), MemAvailable is {avail / 2**30:.1f} GiB"
        )
    return ""


# --------------------------------------------------------------------------------------------
# Reporting


def best(runs: list[Run], size: str, path: str) -> Run | None:
    mine = [r for r in runs if r.size == size and r.path == path and r.rc == 0]
    return min(mine, key=lambda r: r.wall_s) if mine else None


def table(runs: list[Run], sizes: list[str], verified: dict[str, str]) -> str:
    lines = [
        "| model | params | path | wall s | +sync s | CPU s | merge s | peak anon RSS MiB "
        "| runs (wall s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for path in ("copy", "peft", "ref", "loracc"):
            r = best(runs, size, path)
            if r is None:
                continue
            walls = [x.wall_s for x in runs if x.size == size and x.path == path and x.rc == 0]
            peaks = [x.peak_anon_mib for x in runs if x.size == size and x.path == path]
            lines.append(
                f"| {size} | {param_count(size) / 1e9:.2f}B | {path} | {r.wall_s:.2f} | "
                f"{r.wall_s + r.sync_s:.2f} | {r.cpu_s:.2f} | "
                f"{'-' if r.inner_s is None else f'{r.inner_s:.2f}'} | {max(peaks):.0f} | "
                f"{', '.join(f'{w:.2f}' for w in walls)} |"
            )
    lines += [
        "",
        "| model | loracc/copy (best walls) | loracc/copy (each repeat) | PEFT/loracc (best walls) "
        "| loracc/PEFT (peak anon RSS) |",
        "|---|---|---|---|---|",
    ]
    for size in sizes:
        c, p, l_ = best(runs, size, "copy"), best(runs, size, "peft"), best(runs, size, "loracc")
        if c is None or l_ is None:
            continue
        lmax = max(x.peak_anon_mib for x in runs if x.size == size and x.path == "loracc")
        walls = {
            k: [x.wall_s for x in runs if x.size == size and x.path == k and x.rc == 0]
            for k in ("copy", "loracc")
        }
        pairs = [f"{b / a:.2f}x" for a, b in zip(walls["copy"], walls["loracc"], strict=False)]
        cells = [f"{l_.wall_s / c.wall_s:.2f}x", ", ".join(pairs)]
        if p is not None:
            pmax = max(x.peak_anon_mib for x in runs if x.size == size and x.path == "peft")
            cells += [f"{p.wall_s / l_.wall_s:.2f}x", f"{100 * lmax / pmax:.1f}%"]
        else:
            cells += ["-", "-"]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    if len(sizes) >= 2:
        lo = [x.peak_anon_mib for x in runs if x.size == sizes[0] and x.path == "loracc"]
        hi = [x.peak_anon_mib for x in runs if x.size == sizes[-1] and x.path == "loracc"]
        if lo and hi:
            growth = 100 * (max(hi) / max(lo) - 1)
            lines += [
                "",
                f"loracc peak anon RSS {sizes[0]} -> {sizes[-1]}: "
                f"{max(lo):.0f} -> {max(hi):.0f} MiB ({growth:+.1f}%)",
            ]
    lines += ["", "Output check (loracc vs PEFT, byte for byte):"]
    lines += [f"- {size}: {verified.get(size, 'not checked')}" for size in sizes]
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for name in ("transformers", "peft"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    return (
        f"{platform.node()}: {os.cpu_count()} x {cpu}, {mem:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {', '.join(versions)}; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )


# --------------------------------------------------------------------------------------------
# Profile: where a loracc merge's time goes


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=ENV, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - t


_STEPS = ("pread", "mm", "mul", "widen", "add", "round", "check", "pwrite")


def _profile_pass(items: list, scratch: object, out_fd: int) -> tuple[dict[str, float], float]:
    """``_stream``'s steps for each item, one thread: (CPU seconds per step, wall seconds)."""
    from loracc.io.safetensors import pread_exact, pwrite_all
    from loracc.lower import merge as M

    cpu = dict.fromkeys(_STEPS, 0.0)
    wall = time.perf_counter()
    pos = 0
    for item in items:
        src, site = item.source, item.edits.sites[0]
        rows, cols = item.shape
        A, B = site.lora_A.float().contiguous(), site.lora_B.float().contiguous()
        fd = os.open(src.path, os.O_RDONLY)
        for r0, r1 in M._row_blocks(rows, cols):
            v = M._Views(scratch, r1 - r0, cols, src.dtype, item.dtype, "cpu")
            marks = [time.thread_time()]
            pread_exact(fd, v.raw_bytes, src.offset + r0 * cols * src.dtype.itemsize)
            marks.append(time.thread_time())
            torch.mm(B[r0:r1], A, out=v.d)
            marks.append(time.thread_time())
            v.d.mul_(site.scale)
            marks.append(time.thread_time())
            v.w.copy_(v.raw)
            marks.append(time.thread_time())
            v.w.add_(v.d)
            marks.append(time.thread_time())
            v.out.copy_(v.w)
            marks.append(time.thread_time())
            M._check_finite(v.out, item.key)
            marks.append(time.thread_time())
            pwrite_all(out_fd, v.out_bytes, pos)
            pos += len(v.out_bytes)
            marks.append(time.thread_time())
            for k, a, b in zip(_STEPS, marks, marks[1:], strict=False):
                cpu[k] += b - a
        os.close(fd)
    return cpu, time.perf_counter() - wall


def profile(size: str, base: Path, adapter: Path, work: Path, tensors: int) -> str:
    """Startup costs, then the CPU time of each step of the streamed merge, per element.

    The steps are those of ``loracc.lower.merge._stream`` for one bf16 LoRA target, run here one
    at a time on one thread (``time.thread_time`` around each) over the first ``tensors`` edited
    tensors: the same calls on the same buffers, so the split is the merge's.
    """
    from loracc.io.checkpoint import Checkpoint
    from loracc.io.peft import read_peft_adapter
    from loracc.lower import merge as M

    lines = [f"Profile, {size} (warm page cache):", ""]
    py = [sys.executable, "-c"]
    startup = {
        "python -c pass": _timed([*py, "pass"]),
        "python -c 'import torch'": _timed([*py, "import torch"]),
        "python -c 'import loracc.cli'": _timed([*py, "import loracc.cli"]),
        "python -c 'import loracc.api.hf'": _timed([*py, "import loracc.api.hf"]),
        "loracc --help": _timed([sys.executable, "-m", "loracc", "--help"]),
    }
    lines += ["| startup | wall s |", "|---|---|"]
    lines += [f"| `{k}` | {v:.2f} |" for k, v in startup.items()]
    t = time.perf_counter()
    ckpt = Checkpoint(base)
    ad = read_peft_adapter(adapter, ckpt)
    load_s = time.perf_counter() - t
    lines += [f"| read headers + adapter (in process) | {load_s:.2f} |", ""]

    plan = M._plan(ad, ckpt, None)
    items = [i for i in plan if i.edits and M._streamable(i)][:tensors]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out_path = work / "profile.bin"
    out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    scratch = M._Scratch()
    try:
        # Pass 1 only recycles memory. On this VM, page cache made of pages the hypervisor has
        # taken back costs ~2.5 s/GB to write, recycled pages ~0.4 s/GB: the merge and the copy
        # write into pages the previous run freed moments before, so pass 2 is measured.
        for _ in range(2):
            os.ftruncate(out_fd, 0)
            cpu, wall = _profile_pass(items, scratch, out_fd)
    finally:
        os.close(out_fd)
        out_path.unlink()
        torch.set_num_threads(threads)
    n = sum(i.source.numel for i in items)
    total = sum(cpu.values())
    lines += [
        f"Streamed steps, one thread, {len(items)} LoRA targets ({n / 1e6:.0f}M elements, "
        f"bf16): {total / n * 1e9:.2f} ns of CPU per element ({wall / n * 1e9:.2f} ns wall)",
        "",
        "| step | ns/element | share |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v / n * 1e9:.2f} | {100 * v / total:.0f}% |" for k, v in cpu.items()]
    edited = sum(i.source.numel for i in plan if i.edits)
    lines += [
        "",
        f"The whole {size} model has {edited / 1e9:.2f}B edited elements: "
        f"{edited * total / n:.1f} s of CPU for these steps.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    text = text.upper().removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5B,2B", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--quick", action="store_true", help="--sizes 0.1B (smoke test)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/loracc-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic inputs and outputs")
    ap.add_argument(
        "--keep-inputs",
        action="store_true",
        help="keep the synthetic base and adapter for the next run (outputs are removed)",
    )
    ap.add_argument(
        "--check-tensors",
        type=int,
        default=0,
        metavar="N",
        help="compare N sampled tensors with PEFT's, byte for byte (default 0: all of them)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per path (best is shown)")
    ap.add_argument("--paths", default="copy,peft,loracc", help="of copy,peft,ref,loracc")
    ap.add_argument("--ref", type=Path, help="path 'ref': a loracc checkout to compare with")
    ap.add_argument("--cache", default="warm", help="warm, cold or warm,cold")
    ap.add_argument("--device", default="cpu", help="loracc merge --device")
    ap.add_argument("--shard-size", default="1GB", help="shard size of the synthetic base")
    ap.add_argument("--sample-ms", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument(
        "--profile",
        type=int,
        metavar="N",
        default=0,
        help="only profile loracc: startup, then each streamed step over N tensors",
    )
    ap.add_argument("--markdown", type=Path, help="also write the tables here")
    ap.add_argument("--json", type=Path, help="also write every run here")
    args = ap.parse_args()
    sizes = ["0.1B"] if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    paths = [p.strip() for p in args.paths.split(",")]
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    if not caches or set(caches) - {"warm", "cold"}:
        ap.error(f"--cache {args.cache!r}: give warm, cold or warm,cold")
    notes: list[str] = []
    if "cold" in caches and not can_drop_caches():
        notes.append("cold runs skipped: /proc/sys/vm/drop_caches is not writable (not root)")
        caches = [c for c in caches if c != "cold"]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; known: {', '.join(SIZES)}")
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = max(3 * 2 * param_count(s) for s in sizes)  # base + one output + slack
    if free < need:
        print(f"warning: {work} has {free / 1e9:.1f} GB free, the run needs ~{need / 1e9:.1f} GB")
    print(machine())
    print(f"cache: {','.join(caches)}; workdir {work}; repeat {args.repeat}", flush=True)
    print("\n".join(notes), flush=True)

    runs: list[Run] = []
    verified: dict[str, str] = {}
    ok = True
    try:
        for size in sizes:
            base, adapter = work / f"base-{size}", work / f"adapter-{size}"
            t0 = time.perf_counter()
            if not base.exists():
                make_base(size, base, parse_size(args.shard_size))
            if not adapter.exists():
                make_adapter(size, adapter, base)
            if args.profile:
                prepare_cache("warm", base)
                report = profile(size, base, adapter, work, args.profile)
                print(report)
                if args.markdown:
                    with open(args.markdown, "a") as f:
                        f.write(report + "\n\n")
                continue
            shards = len(list(base.glob("*.safetensors")))
            print(
                f"{size}: {param_count(size) / 1e9:.2f}B params, {shards} shard(s), "
                f"inputs ready in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            outs = {p: work / f"out-{size}-{p}" for p in paths}
            size_paths = list(paths)
            if "peft" in paths and (why := peft_fits(size)):
                notes.append(why)
                print(why, flush=True)
                size_paths.remove("peft")
            keys = checked_keys(base, args.check_tensors)
            found: dict[str, dict[str, str]] = {}
            for cache in caches:
                for _ in range(args.repeat):
                    for p in size_paths:
                        runs.append(run_path(p, size, base, adapter, outs[p], args, cache))
                        # only the base and one output on disk: digest what is compared, drop it
                        if p in ("peft", "loracc") and p not in found and runs[-1].rc == 0:
                            found[p] = digests(outs[p], keys)
                        if not args.keep:
                            shutil.rmtree(outs[p], ignore_errors=True)
            if {"peft", "loracc"} <= found.keys():
                same, text = compare(found["loracc"], found["peft"], args.check_tensors <= 0)
                verified[size] = ("OK: " if same else "MISMATCH: ") + text
                print(f"  {size} check: {verified[size]}", flush=True)
                ok &= same
    finally:
        if not args.keep:
            for size in sizes:
                for name in [] if args.keep_inputs else [f"base-{size}", f"adapter-{size}"]:
                    shutil.rmtree(work / name, ignore_errors=True)
                for p in paths:
                    shutil.rmtree(work / f"out-{size}-{p}", ignore_errors=True)
    if args.profile:
        return 0
    report = "\n\n".join(
        f"### {cache} page cache\n\n"
        + table([r for r in runs if r.cache == cache], sizes, verified)
        for cache in caches
    )
    if notes:
        report += "\n\n" + "\n".join(f"Note: {n}" for n in notes)
    if not ok:
        report += "\n\nloracc's output differs from PEFT's: the timings above do not count."
    print()
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    failed = any(r.rc for r in runs)
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
