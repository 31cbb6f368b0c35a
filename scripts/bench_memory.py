#!/usr/bin/env python
"""KV memory on the embedded default: bytes really allocated vs the dense cache, for several tau.

Runs SmolLM2-135M (the smollm2-135m preset, CPU by default) on one long prompt (>= 4k tokens of
real English: the documentation of Python's standard library), once without eviction and once
per threshold, and checks the allocation bound

    bytes_allocated <= (1 - compression) * bytes_dense * stored / kv + layers * kv_heads * block_bytes

Every stored token, kept or in the window, lives in pool blocks; (1 - compression) of the dense
K/V is what they hold, stored / kv the 8 bytes of position and score a token carries beside its
K and V, and one partly filled block per head the rest. Prints a table, writes
bench/results/memory-<date>.json (with the resolved config) and a PNG plot.

    .venv/bin/python scripts/bench_memory.py [--tokens 4096] [--thresholds -0.4 -0.2 0 0.2 0.35]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench_text import long_text  # scripts/ is on sys.path when a script runs
from kvzap_trt.atomic import atomic_write_text
from kvzap_trt.config import resolve_config
from kvzap_trt.runtime.generate import Runtime

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length in tokens (default 4096)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[-0.4, -0.2, 0.0, 0.2, 0.35])
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--surrogate", default="random:linear:0",
                    help="surrogate (default: seeded random weights, which the recorded thresholds refer to)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)

    base = resolve_config("smollm2-135m", max_new_tokens=args.new_tokens, surrogate=args.surrogate)
    rt = Runtime.from_config(base)
    prompt = rt.encode(long_text())[: args.tokens]
    if len(prompt) < args.tokens:
        raise SystemExit(f"the documentation text has only {len(prompt)} tokens")

    rows = []
    for tau in tqdm([None] + args.thresholds, desc="thresholds", file=sys.stderr):
        cfg = dataclasses.replace(base, threshold=0.0 if tau is None else tau)
        run = Runtime(cfg, rt.loaded, None if tau is None else rt.surrogate)
        t0 = time.perf_counter()
        kv = run.generate([prompt], run.sampling(stop_token_ids=()))[0].kv
        seconds = time.perf_counter() - t0
        spec = run.make_cache(1, 1, 1).spec
        stored_per_kv = spec.block_bytes / (spec.block_size * 2 * spec.head_dim * spec.elem_bytes)
        partial = spec.num_layers * spec.num_kv_heads * spec.block_bytes  # one partly filled block per head
        bound = (1 - kv["compression_ratio"]) * kv["bytes_dense"] * stored_per_kv + partial
        rows.append({"threshold": tau, "tokens": kv["tokens"], "compression_ratio": kv["compression_ratio"],
                     "bytes_allocated": kv["bytes_allocated"], "bytes_dense": kv["bytes_dense"],
                     "partial_block_bytes": partial, "bound_bytes": int(bound),
                     "within_bound": kv["bytes_allocated"] <= bound, "seconds_cpu": round(seconds, 2)})

    print(f"\nSmolLM2-135M, {len(prompt)}-token prompt + {args.new_tokens} new, window {base.window}, "
          f"block {base.block_size}, {base.dtype}, surrogate {base.surrogate}")
    print(f"{'tau':>7} {'compression':>11} {'allocated MiB':>14} {'dense MiB':>10} {'bound MiB':>10} {'ok':>3}")
    for r in rows:
        tau = "dense" if r["threshold"] is None else f"{r['threshold']:+.2f}"
        print(f"{tau:>7} {r['compression_ratio']:>11.1%} {r['bytes_allocated'] / 2**20:>14.2f} "
              f"{r['bytes_dense'] / 2**20:>10.2f} {r['bound_bytes'] / 2**20:>10.2f} {'yes' if r['within_bound'] else 'NO':>3}")

    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "memory", "date": date, "machine": platform.machine(), "device": base.device,
              "command": " ".join(["scripts/bench_memory.py"] + (argv if argv is not None else sys.argv[1:])),
              "config": base.to_dict(), "prompt_tokens": len(prompt), "rows": rows}
    path = args.out / f"memory-{date}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / f"memory-{date}.png", len(prompt))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0 if all(r["within_bound"] for r in rows) else 1


def plot(rows: list[dict], path: Path, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    cr = [r["compression_ratio"] for r in rows]
    ax.plot(cr, [r["bytes_allocated"] / 2**20 for r in rows], "o-", label="allocated (kept + window pages)")
    ax.plot(cr, [r["bound_bytes"] / 2**20 for r in rows], "--", label="bound: (1-c)·dense·stored/kv + a block per head")
    ax.axhline(rows[0]["bytes_dense"] / 2**20, color="gray", lw=1, label="dense cache")
    ax.set_xlabel("compression ratio (evicted / all KV pairs)")
    ax.set_ylabel("KV cache MiB")
    ax.set_title(f"SmolLM2-135M, {tokens}-token prompt: real KV bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
