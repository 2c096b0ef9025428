#!/usr/bin/env python
"""Peak memory of ``loracc merge`` stacking K adapters: it grows with the adapters, not the model.

Uses ``scripts/bench_merge.py``'s synthetic bf16 Llama checkpoint and r=16 fp32 adapters (each K
with its own alpha, so the deltas differ) and its measurement: each merge in its own subprocess,
peak ``RssAnon`` sampled from ``/proc/PID/status`` (anonymous pages: no page cache, no mmap'ed
file pages). Prints one row per K: peak RSS, its growth over K=1, the adapters' bytes, the base's.

Usage::

    python scripts/bench_stack.py --size 0.1B --adapters 1,2,4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import bench_merge as bm


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.1B", choices=list(bm.SIZES))
    parser.add_argument("--adapters", default="1,2,4", help="stack sizes K, e.g. 1,2,4")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--sample-ms", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    counts = [int(k) for k in args.adapters.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_stack_"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"base-{args.size}"
    if not base.exists():
        bm.make_base(args.size, base, shard_bytes=2 * 10**9)
    adapters = []
    for i in range(max(counts)):
        folder = work / f"adapter-{args.size}-{i}"
        if not folder.exists():
            bm.make_adapter(args.size, folder, base, alpha=bm.ALPHA + i)
        adapters.append(folder)
    rows = []
    for k in counts:
        out = work / f"out-{k}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "loracc", "merge", "--base", str(base), "-o", str(out)]
        for a in adapters[:k]:
            cmd += ["--adapter", str(a)]
        bm.prepare_cache("warm", base)
        wall, anon, _, _, rc, _, err = bm.measure(cmd, args.sample_ms / 1000, 600, bm.ENV, bm.REPO)
        if rc != 0:
            print(err, file=sys.stderr)
            return rc
        shutil.rmtree(out)
        rows.append(
            {
                "k": k,
                "peak_anon_mib": anon / 1024,
                "adapters_mib": sum(folder_bytes(a) for a in adapters[:k]) / 2**20,
                "base_mib": folder_bytes(base) / 2**20,
                "wall_s": wall,
            }
        )
    first = rows[0]["peak_anon_mib"]
    print(f"{bm.machine()}\n")
    print("| K | peak RssAnon MiB | growth over K=1 MiB | adapters MiB | base MiB | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['k']} | {r['peak_anon_mib']:.0f} | {r['peak_anon_mib'] - first:+.0f} | "
            f"{r['adapters_mib']:.0f} | {r['base_mib']:.0f} | {r['wall_s']:.1f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
