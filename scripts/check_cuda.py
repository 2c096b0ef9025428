#!/usr/bin/env python
"""loracc's merged and keep-LoRA fp16 graphs on the CUDA execution provider, against the CPU.

Self-contained, for one call on a machine with a GPU: it builds its own tiny model (``--layers``
chained ``nn.Linear(D, D)`` in fp16, exported with ``torch.onnx.export``), an r=16 peft adapter
on every layer, and with loracc the merged graph and the keep-LoRA graph (``--empty-slots``, plus
the ``.onnx_adapter`` file). Then, on CUDA and on the CPU:

* merged graph, no adapter;
* keep-LoRA graph with the adapter active through ``RunOptions`` (``loracc.io.ort.run_options``);
* keep-LoRA graph without an adapter (must equal the base graph).

It prints the max abs / max rel error of CUDA against the CPU for each graph, of keep-LoRA+adapter
against merged on each provider, and the median run time of each (after warm-up), plus the cost of
activating the adapter.

Two more checks:

* **int4**: the fp16 base quantized to ``MatMulNBits`` (``scripts.bench_onnx.build_int4``: int4,
  block 32, asymmetric, accuracy_level 4), keep-LoRA exported on it; its keep-LoRA graph with the
  adapter active and without it on CUDA vs the CPU (tolerance ``--int4-atol``/``--int4-rtol``:
  the two providers' int4 kernels differ), and keep-LoRA without adapter vs the int4 base on each.
* **IOBinding**: the fp16 and the int4 keep-LoRA graphs run with ``run_with_iobinding``, input and
  output bound on the device. ``run_with_iobinding`` ignores ``RunOptions``' active adapters, so
  the adapter's tensors are bound to the LoRA slot inputs as device OrtValues
  (``loracc.io.ort.adapter_ortvalues``); the result must equal the plain run with the adapter
  active through ``RunOptions`` on the same provider (``--atol``/``--rtol``).
* **adapter_session** (the per-request wrapper for callers such as optimum's
  ``ORTModelForCausalLM``, which run the session themselves): each keep-LoRA graph wrapped by
  ``loracc.adapter_session``, one IOBinding reused for the requests adapter, none, adapter (the
  wrapper binds the adapter's tensors on the device, then the slot defaults back), and
  ``session.run`` without RunOptions for the same requests; each must equal the plain run of
  that request on the same provider.

Exit status: 0 when every comparison is within its tolerance, 1 when one is not, 2 when the CUDA
execution provider is not usable here (the message says why; nothing is built).

``--provider cpu`` runs the same flow with the CPU in place of CUDA (a self-check of the script on
a machine without a GPU).

Usage: python scripts/check_cuda.py [--dim 1024] [--layers 4] [--tokens 128] [--runs 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from scripts.bench_onnx import build, build_int4

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def cuda_problem() -> str | None:
    """None when a session really runs on the CUDA EP, else why not."""
    import onnxruntime as ort

    from loracc.io import ort as lort

    if lort.cuda_usable():
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        have = ", ".join(ort.get_available_providers())
        return f"this onnxruntime {ort.__version__} build has no CUDAExecutionProvider ({have})"
    return lort._cuda_reason(ort)


def session(path: Path, provider: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=[PROVIDERS[provider]])
    if sess.get_providers()[0] != PROVIDERS[provider]:
        raise SystemExit(f"check_cuda: {path.name} did not start on {PROVIDERS[provider]}")
    return sess


def timed(sess: Any, feeds: dict[str, np.ndarray], ro: Any, runs: int) -> tuple[np.ndarray, float]:
    for _ in range(max(3, runs // 10)):
        y = sess.run(None, feeds, ro)[0]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        y = sess.run(None, feeds, ro)[0]
        times.append(time.perf_counter() - t0)
    return np.asarray(y, dtype=np.float32), statistics.median(times) * 1e3


def timed_iobinding(
    sess: Any, provider: str, x: np.ndarray, adapter_file: Path, runs: int
) -> tuple[np.ndarray, float]:
    """``run_with_iobinding`` with ``x``, the adapter's tensors and the output on ``provider``'s
    device: (output, median ms)."""
    import onnxruntime as ort

    from loracc.io.ort import adapter_ortvalues

    device = "cuda" if provider == "cuda" else "cpu"
    binding = sess.io_binding()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    for name, value in adapter_ortvalues(adapter_file, device).items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_output(sess.get_outputs()[0].name, device)
    plain = ort.RunOptions()
    times = []
    for i in range(max(3, runs // 10) + runs):
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding, plain)
        if i >= max(3, runs // 10):
            times.append(time.perf_counter() - t0)
    y = binding.copy_outputs_to_cpu()[0]
    return np.asarray(y, dtype=np.float32), statistics.median(times) * 1e3


def errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Max abs error, and max rel error (|b| floored at 1% of max |b|, so zeros do not blow up)."""
    diff = np.abs(a - b)
    floor = 1e-2 * float(np.abs(b).max()) or 1.0
    return float(diff.max()), float((diff / np.maximum(np.abs(b), floor)).max())


def check_int4_and_iobinding(
    work: Path,
    m: dict[str, Any],
    dev: str,
    args: argparse.Namespace,
    tol: float,
    out: dict[tuple[str, str], np.ndarray],
    keep_ms: float,
) -> list[str]:
    """The int4 keep-LoRA graph on ``dev`` vs the CPU, and both keep-LoRA graphs through
    IOBinding vs their plain runs; prints a table, returns the failures."""
    import onnxruntime as ort

    from loracc.io.ort import run_options

    bad = []
    q = build_int4(work, m)
    feeds = {"x": m["x"]}
    active, plain = run_options(q["adapter_file"]), ort.RunOptions()
    int4: dict[tuple[str, str], np.ndarray] = {}
    ms: dict[tuple[str, str], float] = {}
    for p in dict.fromkeys((dev, "cpu")):
        for name, graph, ro in (
            ("int4 base", "base", plain),
            ("int4 keep+adapter", "keep", active),
            ("int4 keep, no adapter", "keep", plain),
        ):
            int4[name, p], ms[name, p] = timed(session(q[graph], p), feeds, ro, args.runs)
    scale = float(np.abs(int4["int4 keep+adapter", "cpu"]).max())
    int4_tol = args.int4_atol + args.int4_rtol * scale
    print()
    print(f"int4 (MatMulNBits, block 32), tolerance max abs err <= {int4_tol:.3e}:")
    print(f"| graph | max abs err {dev} vs cpu | max rel err | {dev} ms | cpu ms |")
    print("|---|---|---|---|---|")
    for name in ("int4 base", "int4 keep+adapter", "int4 keep, no adapter"):
        a, r = errors(int4[name, dev], int4[name, "cpu"])
        print(f"| {name} | {a:.3e} | {r:.3e} | {ms[name, dev]:.3f} | {ms[name, 'cpu']:.3f} |")
        if not a <= int4_tol:
            bad.append(f"{name}: {dev} vs cpu max abs err {a:.3e} > {int4_tol:.3e}")
    for p in dict.fromkeys((dev, "cpu")):
        a, _ = errors(int4["int4 keep, no adapter", p], int4["int4 base", p])
        print(f"{p}: int4 keep without adapter vs int4 base max abs err {a:.3e}")
        if not a <= tol:
            bad.append(
                f"{p}: int4 keep without adapter vs int4 base max abs err {a:.3e} > {tol:.3e}"
            )
    effect, _ = errors(int4["int4 keep+adapter", "cpu"], int4["int4 base", "cpu"])
    if effect <= int4_tol:
        bad.append(f"the adapter changes the int4 output by only {effect:.3e}: not a test")

    print()
    print(f"IOBinding (x, adapter tensors and output on {dev}), vs the plain run with RunOptions:")
    print("| graph | max abs err | max rel err | iobinding ms | plain ms |")
    print("|---|---|---|---|---|")
    for name, path, adapter_file, reference, plain_ms in (
        ("keep+adapter", m["keep"], m["adapter_file"], out["keep+adapter", dev], keep_ms),
        (
            "int4 keep+adapter",
            q["keep"],
            q["adapter_file"],
            int4["int4 keep+adapter", dev],
            ms["int4 keep+adapter", dev],
        ),
    ):
        y, t = timed_iobinding(session(path, dev), dev, m["x"], adapter_file, args.runs)
        a, r = errors(y, reference)
        print(f"| {name} | {a:.3e} | {r:.3e} | {t:.3f} | {plain_ms:.3f} |")
        if not a <= tol:
            bad.append(
                f"{dev}: {name} through IOBinding vs plain run max abs err {a:.3e} > {tol:.3e}"
            )
    bad += check_adapter_session(
        dev,
        m["x"],
        tol,
        {
            "keep": (m["keep"], m["adapter_file"], out["keep+adapter", dev],
                     out["keep, no adapter", dev]),
            "int4 keep": (q["keep"], q["adapter_file"], int4["int4 keep+adapter", dev],
                          int4["int4 keep, no adapter", dev]),
        },
    )  # fmt: skip
    return bad


def check_adapter_session(
    dev: str,
    x: np.ndarray,
    tol: float,
    graphs: dict[str, tuple[Path, Path, np.ndarray, np.ndarray]],
) -> list[str]:
    """``loracc.adapter_session`` per request (adapter, none, adapter) through one reused
    IOBinding on ``dev`` and through ``run`` without RunOptions, vs the plain runs of each
    request (``graphs``: name -> (model, adapter file, with adapter, without))."""
    import onnxruntime as ort

    import loracc

    device = "cuda" if dev == "cuda" else "cpu"
    bad = []
    print()
    print(f"adapter_session on {dev}: requests adapter, none, adapter; vs the plain runs:")
    print("| graph | call | request | max abs err |")
    print("|---|---|---|---|")
    for name, (path, adapter_file, with_adapter, without) in graphs.items():
        wrapped = loracc.adapter_session(session(path, dev), {"a": adapter_file})
        binding = wrapped.io_binding()
        binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        output = wrapped.get_outputs()[0].name
        for request, reference in (("a", with_adapter), (None, without), ("a", with_adapter)):
            with wrapped.active(request):
                binding.bind_output(output, device)
                wrapped.run_with_iobinding(binding)
                got = {"iobinding": binding.copy_outputs_to_cpu()[0]}
                got["run"] = wrapped.run(None, {"x": x})[0]
            for call, y in got.items():
                a, _ = errors(np.asarray(y, dtype=np.float32), reference)
                print(f"| {name} | {call} | {request or 'none'} | {a:.3e} |")
                if not a <= tol:
                    bad.append(
                        f"{dev}: adapter_session {name} {call} request {request} "
                        f"max abs err {a:.3e} > {tol:.3e}"
                    )
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--atol", type=float, default=2e-2, help="max abs error allowed (fp16)")
    ap.add_argument("--rtol", type=float, default=2e-2, help="times max |y|, added to --atol")
    ap.add_argument("--int4-atol", type=float, default=2e-2, help="int4, cuda vs cpu")
    ap.add_argument("--int4-rtol", type=float, default=5e-2, help="int4, times max |y|")
    args = ap.parse_args(argv)

    if args.provider == "cuda":
        why = cuda_problem()
        if why is not None:
            print(f"check_cuda: the CUDA execution provider is not usable here: {why}")
            print("check_cuda: nothing was run; run this script on a machine with a GPU")
            return 2

    import onnxruntime as ort

    from loracc.io.ort import run_options

    dev = args.provider
    print(
        f"onnxruntime {ort.__version__}; model {args.layers} x Linear({args.dim}, {args.dim}) "
        f"fp16, {args.tokens} tokens, r={args.rank}; {PROVIDERS[dev]} vs CPUExecutionProvider"
    )
    rows: list[tuple[str, float, float, float, float]] = []
    bad = []
    with tempfile.TemporaryDirectory(prefix="check_cuda_") as tmp:
        m = build(Path(tmp), args.dim, args.layers, args.tokens, args.rank, half=True)
        feeds = {"x": m["x"]}
        t0 = time.perf_counter()
        active = run_options(m["adapter_file"])
        activate_ms = (time.perf_counter() - t0) * 1e3
        plain = ort.RunOptions()
        out: dict[tuple[str, str], np.ndarray] = {}
        for name, graph, ro in (
            ("base", "base", plain),
            ("merged", "merged", plain),
            ("keep+adapter", "keep", active),
            ("keep, no adapter", "keep", plain),
        ):
            ys, ms = {}, {}
            for p in dict.fromkeys((dev, "cpu")):
                ys[p], ms[p] = timed(session(m[graph], p), feeds, ro, args.runs)
                out[name, p] = ys[p]
            abs_err, rel_err = errors(ys[dev], ys["cpu"])
            rows.append((name, abs_err, rel_err, ms[dev], ms["cpu"]))
        scale = float(np.abs(out["merged", "cpu"]).max())
        tol = args.atol + args.rtol * scale
        print()
        print(f"| graph | max abs err {dev} vs cpu | max rel err | {dev} ms | cpu ms |")
        print("|---|---|---|---|---|")
        for name, a, r, t_dev, t_cpu in rows:
            print(f"| {name} | {a:.3e} | {r:.3e} | {t_dev:.3f} | {t_cpu:.3f} |")
            if not a <= tol:
                bad.append(f"{name}: {dev} vs cpu max abs err {a:.3e} > {tol:.3e}")
        print()
        for p in dict.fromkeys((dev, "cpu")):
            a, r = errors(out["keep+adapter", p], out["merged", p])
            print(f"{p}: keep+adapter vs merged max abs err {a:.3e}, max rel err {r:.3e}")
            if not a <= tol:
                bad.append(f"{p}: keep+adapter vs merged max abs err {a:.3e} > {tol:.3e}")
            a, _ = errors(out["keep, no adapter", p], out["base", p])
            print(f"{p}: keep without adapter vs base max abs err {a:.3e}")
            if not a <= tol:
                bad.append(f"{p}: keep without adapter vs base max abs err {a:.3e} > {tol:.3e}")
        effect, _ = errors(out["merged", "cpu"], out["base", "cpu"])
        if effect <= tol:
            bad.append(f"the adapter changes the output by only {effect:.3e}: not a test")
        print(f"activating the adapter (Load + add_active_adapter): {activate_ms:.3f} ms")
        keep_ms = next(row[3] for row in rows if row[0] == "keep+adapter")
        bad += check_int4_and_iobinding(Path(tmp), m, dev, args, tol, out, keep_ms)
    if bad:
        print("check_cuda: FAILED\n  " + "\n  ".join(bad))
        return 1
    print("check_cuda: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
