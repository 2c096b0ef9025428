#!/usr/bin/env python
"""Benchmark rank truncation: loracc's factored route vs a dense SVD of the delta.

    python scripts/bench_truncate.py                       # 4096 x 14336, rank 64 -> 32
    python scripts/bench_truncate.py --out 1024 --in 4096 --rank 16 --keep 8 --dense-dtype float64

The factored route (``loracc.passes.truncate_rank.truncate_factors``) takes a QR of B (out, r)
and of Aᵀ (in, r) and an SVD of the r×r core, in fp64. The dense route forms ``B @ A`` and takes
``torch.linalg.svd(..., full_matrices=False)`` of the (out, in) delta (fp32 by default, the
cheaper choice for it). Both keep ``--keep`` singular triplets; the script reports the median
time of each, the speedup, and the relative Frobenius difference of the two truncated deltas.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from loracc.passes.truncate_rank import truncate_factors


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=int, default=4096, help="delta rows (out features)")
    p.add_argument("--in", dest="inp", type=int, default=14336, help="delta columns (in features)")
    p.add_argument("--rank", type=int, default=64, help="the adapter's rank r")
    p.add_argument("--keep", type=int, default=32, help="the rank kept")
    p.add_argument("--repeat", type=int, default=5, help="runs of the factored route")
    p.add_argument("--dense-repeat", type=int, default=1, help="runs of the dense route")
    p.add_argument("--dense-dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    U0 = torch.linalg.qr(torch.randn(args.out, args.rank, generator=gen, dtype=torch.float64))[0]
    V0 = torch.linalg.qr(torch.randn(args.inp, args.rank, generator=gen, dtype=torch.float64))[0]
    sigma = 0.97 ** torch.arange(args.rank, dtype=torch.float64)
    B = (U0 * sigma.sqrt()).float()
    A = (sigma.sqrt()[:, None] * V0.T).float()
    k = args.keep
    exact = (U0[:, :k] * sigma[:k]) @ V0[:, :k].T
    norm = float(sigma.square().sum().sqrt())

    factored_s, t = _timed(lambda: truncate_factors(A, B, rank=k), args.repeat)
    dtype = getattr(torch, args.dense_dtype)

    def dense() -> torch.Tensor:
        delta = B.to(dtype) @ A.to(dtype)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return (U[:, :k] * S[:k]) @ Vh[:k]

    dense_s, ref = _timed(dense, args.dense_repeat)
    got = t.B.double() @ t.A.double()
    err_factored = float((got - exact).norm()) / norm
    err_dense = float((ref.double() - exact).norm()) / norm
    between = float((got - ref.double()).norm()) / norm

    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"delta {args.out} x {args.inp}, rank {args.rank} -> {args.keep}")
    print(
        f"factored (QR + {args.rank}x{args.rank} SVD, fp64): {factored_s * 1e3:.1f} ms "
        f"(median of {args.repeat})"
    )
    print(
        f"dense SVD ({args.dense_dtype}, B@A formed):        {dense_s:.2f} s "
        f"(median of {args.dense_repeat})"
    )
    print(f"speedup: {dense_s / factored_s:.0f}x")
    print(
        f"relative Frobenius error vs the exact truncation: factored {err_factored:.1e}, "
        f"dense {err_dense:.1e}; factored vs dense {between:.1e}"
    )
    print(f"relative truncation error (reported by loracc): {t.rel_error:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
