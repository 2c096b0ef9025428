#!/usr/bin/env python
"""onnxruntime overhead of loracc's keep-LoRA graphs, on the CPU execution provider.

A stack of ``--layers`` chained ``nn.Linear(D, D)`` (no bias) is exported with
``torch.onnx.export`` (TorchScript), an r=16 LoRA adapter is made with peft on every layer, and
loracc writes three graphs from it: the adapter merged, keep-LoRA with the adapter in the defaults
(not timed) and keep-LoRA with ``--empty-slots`` plus the ``.onnx_adapter`` file. In one process it
then measures

(a) base graph vs keep-LoRA ``--empty-slots`` graph, no adapter active (goal: <= 1% overhead),
(b) merged graph vs keep-LoRA graph with the adapter active via ``RunOptions`` (goal: <= 3%),
(c) activating an adapter (``LoraAdapter.Load`` + ``RunOptions.add_active_adapter``, through
    ``loracc.io.ort.run_options``) vs creating a new ``InferenceSession`` of the merged graph
    (goal: >= 1000x cheaper).

With ``--int4`` the base is also quantized by onnxruntime's ``MatMulNBitsQuantizer`` (int4, block
32, asymmetric, accuracy_level 4 as onnxruntime-genai's CPU int4 builds) and two more ratios are
measured against that int4 base: (d) keep-LoRA ``--empty-slots`` on it with the adapter active
(goal: <= 1.10x) and (e) the adapter merged and requantized into it (goal: about 1.00x).

Outputs are checked first: keep-LoRA with the adapter active against the merged graph and against
peft's forward, keep-LoRA without an adapter against the base graph.

Timing: for each thread count (``--threads``, intra-op threads fixed, inter-op 1), every round runs
each graph once, in a fresh random order, after ``--warmup`` rounds. Reported: medians per graph,
the ratio of medians (the figure compared with the goal), the median of the per-round ratios
(paired, so slow phases of a busy machine hit both sides) and the ratio of the fastest runs (the
least disturbed by other jobs). Times are wall time, or with ``--clock cpu`` (``--threads 1``)
the calling thread's CPU time per run, which leaves out the time a busy machine keeps the
process waiting. ``--quick`` shrinks everything for the smoke test.

Usage: python scripts/bench_onnx.py [--threads 1,2] [--rounds 100] [--clock wall|cpu] [--quick]
[--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

GOALS = {"a": 1.01, "b": 1.03, "c": 1000.0, "d": 1.10, "e": 1.02}


def build(
    work: Path, d: int, layers: int, tokens: int, rank: int, *, half: bool = False
) -> dict[str, Any]:
    """Export the base (fp16 with ``half``), make the adapter with peft, write merged and
    keep-LoRA graphs. ``scripts/check_cuda.py`` builds its fp16 model here too."""
    import torch
    from peft import get_peft_model

    import loracc

    torch.manual_seed(0)
    base = stack(d, layers)
    x = torch.randn(1, tokens, d)
    base_path = work / "base.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            base.half() if half else base, (x.half() if half else x,), str(base_path),
            dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
            do_constant_folding=True,
        )  # fmt: skip
    base.float()
    peft_model = get_peft_model(base, lora_config(layers, rank))
    shrink_b(peft_model)
    adapter = work / "adapter"
    peft_model.save_pretrained(str(adapter))
    with torch.no_grad():
        y_peft = peft_model(x).numpy()

    merged = work / "merged.onnx"
    loracc.export_onnx(base_path, adapter, merged)
    keep = work / "keep.onnx"
    report = loracc.export_onnx(base_path, adapter, keep, keep_lora=True, empty_slots=True)
    adapter_file = Path(report.adapter_files[0]["file"])  # keep.onnx_adapter
    return {
        "base": base_path,
        "merged": merged,
        "keep": keep,
        "adapter_file": adapter_file,
        "adapter": adapter,
        "x": x.half().numpy() if half else x.numpy(),
        "y_peft": y_peft,
        "adapter_mib": adapter_file.stat().st_size / 2**20,
        "model_mib": base_path.stat().st_size / 2**20,
    }


def stack(d: int, layers: int) -> Any:
    """``layers`` chained ``nn.Linear(d, d)`` without bias, in eval mode."""
    import torch

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear(d, d, bias=False) for _ in range(layers)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    return Stack().eval()


def lora_config(layers: int, rank: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=[f"layers.{i}" for i in range(layers)],
        init_lora_weights=False,  # random B: the adapter really changes the output
    )


def shrink_b(peft_model: Any, factor: float = 0.05) -> None:
    """init_lora_weights=False draws B like A; shrink it to a realistic update size."""
    import torch

    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(factor)


def build_int4(work: Path, m: dict[str, Any]) -> dict[str, Any]:
    """Quantize the base to int4 MatMulNBits; write keep-LoRA (empty slots) and merged graphs."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    import loracc

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False, accuracy_level=4)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(m["base"])), algo_config=config)
    quantizer.process()
    base = work / "int4.onnx"
    quantizer.model.save_model_to_file(str(base))
    merged, keep = work / "int4_merged.onnx", work / "int4_keep.onnx"
    loracc.export_onnx(base, m["adapter"], merged)
    report = loracc.export_onnx(base, m["adapter"], keep, keep_lora=True, empty_slots=True)
    return {
        "base": base,
        "merged": merged,
        "keep": keep,
        "adapter_file": Path(report.adapter_files[0]["file"]),
        "x": m["x"],
    }


def check_int4(q: dict[str, Any]) -> dict[str, float]:
    """int4 keep-LoRA without adapter == int4 base (else exit); the distances of keep-LoRA with
    the adapter, the requantized merge and the int4 base from each other (reported)."""
    import onnxruntime as ort

    from loracc.io.ort import run_options

    feeds = {"x": q["x"]}
    s_base, s_merged, s_keep = (make_session(q[k], 1) for k in ("base", "merged", "keep"))
    y_base = s_base.run(None, feeds)[0]
    y_empty = s_keep.run(None, feeds, ort.RunOptions())[0]
    y_active = s_keep.run(None, feeds, run_options(q["adapter_file"]))[0]
    y_merged = s_merged.run(None, feeds)[0]
    scale = float(np.abs(y_active).max())
    errs = {
        "int4_keep_empty_vs_int4_base": float(np.abs(y_empty - y_base).max()) / scale,
        "int4_merged_vs_int4_keep_active": float(np.abs(y_merged - y_active).max()) / scale,
        "int4_merged_vs_int4_base": float(np.abs(y_merged - y_base).max()) / scale,
        "int4_adapter_effect": float(np.abs(y_active - y_base).max()) / scale,
    }
    if not np.allclose(y_empty, y_base, rtol=1e-5, atol=1e-5 * scale):
        sys.exit(f"bench_onnx: int4 outputs disagree, not timing: {errs}")
    return errs


def make_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # slots are inputs with initializers: one warning each otherwise
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check(m: dict[str, Any]) -> dict[str, float]:
    """keep-LoRA + adapter == merged == peft; keep-LoRA without adapter == base."""
    import onnxruntime as ort

    from loracc.io.ort import run_options

    feeds = {"x": m["x"]}
    s_base, s_merged, s_keep = (make_session(m[k], 1) for k in ("base", "merged", "keep"))
    y_base = s_base.run(None, feeds)[0]
    y_merged = s_merged.run(None, feeds)[0]
    y_empty = s_keep.run(None, feeds, ort.RunOptions())[0]
    y_active = s_keep.run(None, feeds, run_options(m["adapter_file"]))[0]
    scale = float(np.abs(y_merged).max())
    errs = {
        "keep_active_vs_merged": float(np.abs(y_active - y_merged).max()) / scale,
        "keep_active_vs_peft": float(np.abs(y_active - m["y_peft"]).max()) / scale,
        "merged_vs_peft": float(np.abs(y_merged - m["y_peft"]).max()) / scale,
        "keep_empty_vs_base": float(np.abs(y_empty - y_base).max()) / scale,
        "adapter_effect": float(np.abs(y_merged - y_base).max()) / scale,
    }
    ok = (
        np.allclose(y_active, y_merged, rtol=1e-4, atol=1e-4 * scale)
        and np.allclose(y_active, m["y_peft"], rtol=1e-4, atol=1e-4 * scale)
        and np.allclose(y_empty, y_base, rtol=1e-5, atol=1e-5 * scale)
        and errs["adapter_effect"] > 1e-3  # the adapter must change something
    )
    if not ok:
        sys.exit(f"bench_onnx: outputs disagree, not timing: {errs}")
    return errs


def _runs(variants: dict[str, tuple[Any, Any]], feeds: dict[str, Any]) -> dict[str, Any]:
    """``(session, RunOptions)`` pairs as calls of one run each on ``feeds``."""
    return {k: partial(sess.run, None, feeds, ro) for k, (sess, ro) in variants.items()}


def _rounds(
    variants: dict[str, Callable[[], Any]],
    threads: int,
    rounds: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float], Any]:
    """Call every variant once per round in a fresh random order: times (by ``clock``),
    medians, minima and the paired-ratio function."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(threads)
    for i in range(warmup + rounds):
        order = list(variants)
        rng.shuffle(order)
        for k in order:
            t0 = clock()
            variants[k]()
            dt = clock() - t0
            if i >= warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}

    def paired(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

    return times, med, best, paired


def time_int4(
    q: dict[str, Any], threads: int, rounds: int, warmup: int, clock: Callable[[], float]
) -> dict[str, Any]:
    """(d) int4 keep-LoRA with the adapter active and (e) int4 merged, each vs the int4 base."""
    import onnxruntime as ort

    from loracc.io.ort import run_options

    sessions = {k: make_session(q[k], threads) for k in ("base", "merged", "keep")}
    variants = {
        "int4_base": (sessions["base"], ort.RunOptions()),
        "int4_keep_active": (sessions["keep"], run_options(q["adapter_file"])),
        "int4_merged": (sessions["merged"], ort.RunOptions()),
    }
    _, med, best, paired = _rounds(_runs(variants, {"x": q["x"]}), threads, rounds, warmup, clock)
    return {
        "threads": threads,
        "ms": {k: v * 1e3 for k, v in med.items()},
        "d": med["int4_keep_active"] / med["int4_base"],
        "d_paired": paired("int4_keep_active", "int4_base"),
        "d_min": best["int4_keep_active"] / best["int4_base"],
        "e": med["int4_merged"] / med["int4_base"],
        "e_paired": paired("int4_merged", "int4_base"),
        "e_min": best["int4_merged"] / best["int4_base"],
    }


def time_runs(
    m: dict[str, Any], threads: int, rounds: int, warmup: int, clock: Callable[[], float]
) -> dict[str, Any]:
    import onnxruntime as ort

    from loracc.io.ort import run_options

    feeds = {"x": m["x"]}
    plain = ort.RunOptions()
    active = run_options(m["adapter_file"])
    sessions = {k: make_session(m[k], threads) for k in ("base", "merged", "keep")}
    variants = {
        "base": (sessions["base"], plain),
        "keep_empty": (sessions["keep"], plain),
        "merged": (sessions["merged"], plain),
        "keep_active": (sessions["keep"], active),
    }
    _, med, best, paired = _rounds(_runs(variants, feeds), threads, rounds, warmup, clock)

    # (c) activation vs a new session
    n_act = max(20, rounds * 5)
    for _ in range(5):
        run_options(m["adapter_file"])
    act = []
    for _ in range(n_act):
        t0 = time.perf_counter()
        ro = run_options(m["adapter_file"])
        act.append(time.perf_counter() - t0)
        del ro
    n_sess = 3 if rounds < 50 else 7
    sess_t = []
    for _ in range(n_sess):
        t0 = time.perf_counter()
        s = make_session(m["merged"], threads)
        sess_t.append(time.perf_counter() - t0)
        del s
    return {
        "threads": threads,
        "rounds": rounds,
        "ms": {k: v * 1e3 for k, v in med.items()},
        "min_ms": {k: v * 1e3 for k, v in best.items()},
        "a_min": best["keep_empty"] / best["base"],
        "b_min": best["keep_active"] / best["merged"],
        "a": med["keep_empty"] / med["base"],
        "a_paired": paired("keep_empty", "base"),
        "b": med["keep_active"] / med["merged"],
        "b_paired": paired("keep_active", "merged"),
        "activate_ms": statistics.median(act) * 1e3,
        "session_ms": statistics.median(sess_t) * 1e3,
        "c": statistics.median(sess_t) / statistics.median(act),
    }


def mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny model, few runs (smoke test)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--int4", action="store_true", help="also time keep-LoRA/merged on int4")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the calling thread's CPU time per run (--threads 1 only: onnxruntime then "
        "runs on that thread), which time spent waiting for a shared machine's cores leaves out",
    )
    ap.add_argument(
        "--mixed-batch",
        action="store_true",
        help="instead: a batch of --batch rows over --adapters adapters (scripts/bench_mixed.py)",
    )
    ap.add_argument("--batch", type=int, default=8, help="--mixed-batch: rows per batch")
    ap.add_argument("--adapters", type=int, default=4, help="--mixed-batch: adapters in the batch")
    ap.add_argument(
        "--sweep", default="1,4,16,64", help="--mixed-batch: adapter counts N for the cost of N"
    )
    args = ap.parse_args(argv)
    if args.mixed_batch:
        from scripts.bench_mixed import main as mixed_main

        return mixed_main(args)
    if args.quick:
        args.dim, args.layers, args.tokens, args.rounds, args.warmup = 128, 2, 16, 10, 2
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.clock == "cpu" and threads != [1]:
        sys.exit("bench_onnx: --clock cpu needs --threads 1 (other threads' CPU time is not seen)")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    import onnxruntime as ort
    import torch

    torch.set_num_threads(max(threads))
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
        m = build(Path(tmp), args.dim, args.layers, args.tokens, args.rank)
        errs = check(m)
        results = [time_runs(m, t, args.rounds, args.warmup, clock) for t in threads]
        int4: list[dict[str, Any]] = []
        if args.int4:
            q = build_int4(Path(tmp), m)
            errs |= check_int4(q)
            int4 = [time_int4(q, t, args.rounds, args.warmup, clock) for t in threads]

    load = os.getloadavg()
    print(
        f"model: {args.layers} x Linear({args.dim}, {args.dim}), {args.tokens} tokens, fp32, "
        f"r={args.rank} on every layer ({m['model_mib']:.0f} MiB model, "
        f"{m['adapter_mib']:.2f} MiB adapter file)"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"onnxruntime {ort.__version__} CPUExecutionProvider, load average now "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {args.clock} clock"
    )
    print(
        "correctness (max abs err / max |y|): keep+adapter vs merged "
        f"{errs['keep_active_vs_merged']:.1e}, vs peft {errs['keep_active_vs_peft']:.1e}; "
        f"keep empty vs base {errs['keep_empty_vs_base']:.1e} (adapter changes y by "
        f"{errs['adapter_effect']:.1e})"
    )
    print()
    print(
        "| threads | base ms | keep empty ms | (a) keep empty / base | merged ms | "
        "keep + adapter ms | (b) keep + adapter / merged | activate ms | new session ms | "
        "(c) session / activate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ms = r["ms"]
        print(
            f"| {r['threads']} | {ms['base']:.2f} | {ms['keep_empty']:.2f} | "
            f"{r['a']:.4f} (paired {r['a_paired']:.4f}, min {r['a_min']:.4f}) | "
            f"{ms['merged']:.2f} | {ms['keep_active']:.2f} | "
            f"{r['b']:.4f} (paired {r['b_paired']:.4f}, min {r['b_min']:.4f}) | "
            f"{r['activate_ms']:.3f} | {r['session_ms']:.1f} | {r['c']:.0f}x |"
        )
    print()
    for r in results:
        print(
            f"threads={r['threads']}: ratio (a) keep-empty/base = {r['a']:.4f} "
            f"[goal <= {GOALS['a']}: {mark(r['a'] <= GOALS['a'])}]; "
            f"ratio (b) keep-active/merged = {r['b']:.4f} "
            f"[goal <= {GOALS['b']}: {mark(r['b'] <= GOALS['b'])}]; "
            f"ratio (c) session/activate = {r['c']:.0f}x "
            f"[goal >= {GOALS['c']:.0f}x: {mark(r['c'] >= GOALS['c'])}]"
        )
    if int4:
        print()
        print(
            "int4 (MatMulNBits, block 32, accuracy_level 4): keep+adapter vs requantized merge "
            f"{errs['int4_merged_vs_int4_keep_active']:.1e} (merged vs int4 base "
            f"{errs['int4_merged_vs_int4_base']:.1e}), keep empty vs int4 base "
            f"{errs['int4_keep_empty_vs_int4_base']:.1e} (adapter changes y by "
            f"{errs['int4_adapter_effect']:.1e})"
        )
        print(
            "| threads | int4 base ms | int4 keep + adapter ms | (d) keep + adapter / int4 base | "
            "int4 merged ms | (e) merged / int4 base |"
        )
        print("|---|---|---|---|---|---|")
        for r in int4:
            ms = r["ms"]
            print(
                f"| {r['threads']} | {ms['int4_base']:.2f} | {ms['int4_keep_active']:.2f} | "
                f"{r['d']:.4f} (paired {r['d_paired']:.4f}, min {r['d_min']:.4f}) | "
                f"{ms['int4_merged']:.2f} | "
                f"{r['e']:.4f} (paired {r['e_paired']:.4f}, min {r['e_min']:.4f}) |"
            )
        for r in int4:
            print(
                f"threads={r['threads']}: ratio (d) int4 keep-active/int4 base = {r['d']:.4f} "
                f"[goal <= {GOALS['d']}: {mark(r['d'] <= GOALS['d'])}]; "
                f"ratio (e) int4 merged/int4 base = {r['e']:.4f} "
                f"[goal <= {GOALS['e']}: {mark(r['e'] <= GOALS['e'])}]"
            )
    if args.json:
        data = {"args": vars(args) | {"json": str(args.json)}, "errors": errs}
        data |= {"results": results, "int4": int4, "loadavg": load}
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
