"""``scripts/bench_onnx.py --mixed-batch``: one batch whose rows use different adapters.

The stack of ``--layers`` ``nn.Linear(D, D)`` of bench_onnx is exported with a dynamic batch;
peft makes ``max(--adapters, --sweep)`` r=``--rank`` adapters on every layer (different seeds).
A batch of ``--batch`` rows, row i using adapter ``i mod --adapters``, ``--tokens`` tokens, is
timed three ways on the CPU execution provider:

(a) the ``--mixed-batch`` graph of the ``--adapters`` adapters, one run with ``lora_ids``;
(b) the same rows grouped by adapter: one run per adapter of the one-adapter keep-lora graph
    (``--empty-slots``) with that adapter's file active (RunOptions made once, outside the
    timing), its rows sliced out and written back (what onnxruntime tools do today);
(c) the first adapter merged, one run of the whole batch (the lower bound).

Goals: (a)/(c) <= 1.15 and (a)/(b) <= 0.5. Then the cost of N: the mixed-batch graph of N
adapters (``--sweep``), the same batch (row i uses adapter i mod N): time, and the memory of the
stacked slots. Outputs are checked first: every row of (a) against peft's ``adapter_names``
forward and against (b). Timing as bench_onnx: rounds in a fresh random order, medians, paired
ratios, minima.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench_onnx import _rounds, lora_config, make_session, mark, shrink_b, stack

GOALS = {"a_c": 1.15, "a_b": 0.5}


def _export_base(work: Path, d: int, layers: int, x: Any) -> Path:
    import torch

    torch.manual_seed(0)
    base = stack(d, layers)
    path = work / "base.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            base, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
            output_names=["y"], do_constant_folding=True,
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )  # fmt: skip
    return path


def build(
    work: Path, d: int, layers: int, tokens: int, rank: int, batch: int, n: int, sweep: list[int]
) -> dict[str, Any]:
    """The base, the adapters, and the graphs: mixed (n adapters), keep-lora, merged, and the
    mixed graphs of the sweep."""
    import torch
    from peft import get_peft_model

    import loracc

    x = torch.randn(batch, tokens, d, generator=torch.Generator().manual_seed(1))
    base_path = _export_base(work, d, layers, x)
    torch.manual_seed(0)
    peft_model = get_peft_model(stack(d, layers), lora_config(layers, rank))
    adapters = []
    for i in range(max([n, *sweep])):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
        shrink_b(peft_model)
        folder = work / f"adapter{i:02d}"
        peft_model.save_pretrained(str(folder))
        adapters.append(folder)
    graphs: dict[str, Any] = {"base": base_path, "adapters": adapters, "x": x.numpy()}
    graphs["layers"] = layers
    graphs["merged"] = work / "merged.onnx"
    loracc.export_onnx(base_path, adapters[0], graphs["merged"])
    graphs["keep"] = work / "keep.onnx"
    report = loracc.export_onnx(base_path, adapters[:n], graphs["keep"], keep_lora=True)
    graphs["files"] = [Path(f["file"]) for f in report.adapter_files]
    graphs["mixed"] = {}
    for count in sorted({n, *sweep}):
        out = work / f"mixed{count}.onnx"
        loracc.export_onnx(base_path, adapters[:count], out, keep_lora=True, mixed_batch=True)
        graphs["mixed"][count] = out
    return graphs


def stacked_mib(path: Path) -> float:
    """MiB of a mixed-batch graph's stacked slots (its initializers named ``*.stacked``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.name.endswith(".stacked"):
            total += int(np.prod(t.dims)) * 4
    return total / 2**20


def ids_for(batch: int, n: int) -> np.ndarray:
    return np.arange(batch, dtype=np.int64) % n


def grouped_run(sess: Any, options: list[Any], x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(b): one run per adapter over its rows, written back in place."""
    out = np.empty_like(x)
    for k, ro in enumerate(options):
        rows = np.flatnonzero(ids == k)
        if rows.size:
            out[rows] = sess.run(None, {"x": x[rows]}, ro)[0]
    return out


def check(g: dict[str, Any], n: int) -> dict[str, float]:
    """(a) row by row vs peft's adapter_names forward and vs (b); exit when they disagree."""
    import torch
    from peft import PeftModel

    from loracc.io.ort import run_options

    x, ids = g["x"], ids_for(len(g["x"]), n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        base = stack(x.shape[2], g["layers"])
        model = PeftModel.from_pretrained(base, str(g["adapters"][0]), adapter_name="a0")
        for k in range(1, n):
            model.load_adapter(str(g["adapters"][k]), adapter_name=f"a{k}")
        with torch.no_grad():
            ref = model(torch.from_numpy(x), adapter_names=[f"a{k}" for k in ids]).numpy()
    mixed = make_session(g["mixed"][n], 1).run(None, {"x": x, "lora_ids": ids})[0]
    options = [run_options(f) for f in g["files"]]
    grouped = grouped_run(make_session(g["keep"], 1), options, x, ids)
    base = make_session(g["base"], 1).run(None, {"x": x})[0]
    scale = float(np.abs(ref).max())
    errs = {
        "mixed_vs_peft": float(np.abs(mixed - ref).max()) / scale,
        "mixed_vs_grouped": float(np.abs(mixed - grouped).max()) / scale,
        "adapter_effect": float(np.abs(ref - base).max()) / scale,
    }
    if not (errs["mixed_vs_peft"] < 1e-4 and errs["mixed_vs_grouped"] < 1e-4):
        sys.exit(f"bench_onnx --mixed-batch: outputs disagree, not timing: {errs}")
    if errs["adapter_effect"] < 1e-3:
        sys.exit(f"bench_onnx --mixed-batch: the adapters change nothing: {errs}")
    return errs


def time_all(
    g: dict[str, Any], n: int, sweep: list[int], threads: int, rounds: int, warmup: int
) -> dict[str, Any]:
    from loracc.io.ort import run_options

    x = g["x"]
    ids = ids_for(len(x), n)
    options = [run_options(f) for f in g["files"]]
    keep = make_session(g["keep"], threads)
    merged = make_session(g["merged"], threads)
    mixed = {c: make_session(p, threads) for c, p in g["mixed"].items()}
    calls = {
        "mixed": lambda: mixed[n].run(None, {"x": x, "lora_ids": ids}),
        "grouped": lambda: grouped_run(keep, options, x, ids),
        "merged": lambda: merged.run(None, {"x": x}),
    }
    for c in sweep:
        c_ids = ids_for(len(x), c)
        calls[f"mixed_N{c}"] = lambda c=c, c_ids=c_ids: mixed[c].run(
            None, {"x": x, "lora_ids": c_ids}
        )
    _, med, best, paired = _rounds(calls, threads, rounds, warmup)
    return {
        "threads": threads,
        "rounds": rounds,
        "ms": {k: v * 1e3 for k, v in med.items()},
        "min_ms": {k: v * 1e3 for k, v in best.items()},
        "a_c": med["mixed"] / med["merged"],
        "a_c_paired": paired("mixed", "merged"),
        "a_c_min": best["mixed"] / best["merged"],
        "a_b": med["mixed"] / med["grouped"],
        "a_b_paired": paired("mixed", "grouped"),
        "a_b_min": best["mixed"] / best["grouped"],
        "sweep": {
            c: {"ms": med[f"mixed_N{c}"] * 1e3, "stacked_mib": stacked_mib(g["mixed"][c])}
            for c in sweep
        },
    }


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.dim, args.layers, args.tokens, args.rounds, args.warmup = 128, 2, 16, 5, 1
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    sweep = [int(c) for c in args.sweep.split(",") if c.strip()]
    n = args.adapters

    import onnxruntime as ort
    import torch

    torch.set_num_threads(max(threads))
    with tempfile.TemporaryDirectory(prefix="bench_mixed_") as tmp:
        g = build(Path(tmp), args.dim, args.layers, args.tokens, args.rank, args.batch, n, sweep)
        errs = check(g, n)
        results = [time_all(g, n, sweep, t, args.rounds, args.warmup) for t in threads]

    load = os.getloadavg()
    print(
        f"model: {args.layers} x Linear({args.dim}, {args.dim}), batch {args.batch} x "
        f"{args.tokens} tokens, fp32, r={args.rank} on every layer; row i uses adapter i mod {n}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"onnxruntime {ort.__version__} CPUExecutionProvider, load average now "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        "correctness (max abs err / max |y|): mixed-batch vs peft adapter_names "
        f"{errs['mixed_vs_peft']:.1e}, vs grouped keep-lora runs {errs['mixed_vs_grouped']:.1e} "
        f"(the adapters change y by {errs['adapter_effect']:.1e})"
    )
    print()
    print("| threads | (a) mixed ms | (b) grouped ms | (c) merged ms | (a)/(c) | (a)/(b) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ms = r["ms"]
        print(
            f"| {r['threads']} | {ms['mixed']:.2f} | {ms['grouped']:.2f} | {ms['merged']:.2f} | "
            f"{r['a_c']:.4f} (paired {r['a_c_paired']:.4f}, min {r['a_c_min']:.4f}) | "
            f"{r['a_b']:.4f} (paired {r['a_b_paired']:.4f}, min {r['a_b_min']:.4f}) |"
        )
    print()
    print("| threads | N adapters | stacked slots MiB | mixed ms | vs merged |")
    print("|---|---|---|---|---|")
    for r in results:
        for c, s in r["sweep"].items():
            print(
                f"| {r['threads']} | {c} | {s['stacked_mib']:.1f} | {s['ms']:.2f} | "
                f"{s['ms'] / r['ms']['merged']:.4f} |"
            )
    print()
    for r in results:
        print(
            f"threads={r['threads']}: ratio (a)/(c) mixed/merged = {r['a_c']:.4f} "
            f"[goal <= {GOALS['a_c']}: {mark(r['a_c'] <= GOALS['a_c'])}]; "
            f"ratio (a)/(b) mixed/grouped = {r['a_b']:.4f} "
            f"[goal <= {GOALS['a_b']}: {mark(r['a_b'] <= GOALS['a_b'])}]"
        )
    if args.json:
        data = {"args": vars(args) | {"json": str(args.json)}, "errors": errs}
        data |= {"results": results, "loadavg": load}
        args.json.write_text(json.dumps(data, indent=2))
    return 0
