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

The page-size half of the page-size question (the kernels' half is bench_kernels.py
--page-sizes, on a GPU): with several --block-sizes (and --tokens), every prompt length, page
size and threshold runs, the rows say how much of the allocation is partly filled pages
(`page_waste`: allocated / (stored tokens' bytes) - 1), and the files are memory-pages-<date>.*
with a plot of that waste per page size. Decisions do not depend on the page size; the script
checks that they are identical across page sizes.

    .venv/bin/python scripts/bench_memory.py [--tokens 4096] [--thresholds -0.4 -0.2 0 0.2 0.35]
    .venv/bin/python scripts/bench_memory.py --block-sizes 16 32 64 --tokens 256 4096 --thresholds 0 0.2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench_text import long_text  # scripts/ is on sys.path when a script runs
from kvzap_trt import bench
from kvzap_trt.config import resolve_config
from kvzap_trt.runtime.generate import Runtime

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096], help="prompt lengths in tokens (default 4096)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[-0.4, -0.2, 0.0, 0.2, 0.35])
    ap.add_argument("--block-sizes", type=int, nargs="+", default=None,
                    help="page sizes in tokens (default: the preset's); several make a page-size sweep")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--surrogate", default="random:linear:0",
                    help="surrogate (default: seeded random weights, which the recorded thresholds refer to)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)

    base = resolve_config("smollm2-135m", max_new_tokens=args.new_tokens, surrogate=args.surrogate)
    machine = bench.machine_info(base.device)
    block_sizes = args.block_sizes or [base.block_size]
    rt = Runtime.from_config(base)
    text = rt.encode(long_text())
    if len(text) < max(args.tokens):
        raise SystemExit(f"the documentation text has only {len(text)} tokens")

    rows, decisions = [], {}
    grid = [(n, bs, tau) for n in args.tokens for bs in block_sizes for tau in [None] + args.thresholds]
    for n, bs, tau in tqdm(grid, desc="runs", file=sys.stderr):
        cfg = dataclasses.replace(base, threshold=0.0 if tau is None else tau, block_size=bs)
        run = Runtime(cfg, rt.loaded, None if tau is None else rt.surrogate)
        t0 = time.perf_counter()
        out = run.generate([text[:n]], run.sampling(stop_token_ids=()), positions=True)[0]
        seconds, kv = time.perf_counter() - t0, out.kv
        decisions.setdefault((n, tau), (out.token_ids, kv["positions"]))
        spec = run.make_cache(1, 1, 1).spec
        stored_per_kv = spec.block_bytes / (spec.block_size * 2 * spec.head_dim * spec.elem_bytes)
        stored = (1 - kv["compression_ratio"]) * kv["bytes_dense"] * stored_per_kv  # the stored tokens' bytes
        partial = spec.num_layers * spec.num_kv_heads * spec.block_bytes  # one partly filled block per head
        rows.append({"prompt_tokens": n, "block_size": bs, "threshold": tau, "tokens": kv["tokens"],
                     "compression_ratio": kv["compression_ratio"], "bytes_allocated": kv["bytes_allocated"],
                     "bytes_dense": kv["bytes_dense"], "partial_block_bytes": partial,
                     "bound_bytes": int(stored + partial), "within_bound": kv["bytes_allocated"] <= stored + partial,
                     "page_waste": kv["bytes_allocated"] / stored - 1,
                     "same_decisions": decisions[(n, tau)] == (out.token_ids, kv["positions"]),
                     "seconds_cpu": round(seconds, 2)})

    print(f"\nSmolLM2-135M, prompt + {args.new_tokens} new, window {base.window}, {base.dtype}, surrogate {base.surrogate}")
    print(f"{'prompt':>6} {'block':>5} {'tau':>7} {'compression':>11} {'allocated MiB':>14} {'dense MiB':>10} "
          f"{'bound MiB':>10} {'page waste':>10} {'ok':>3}")
    for r in rows:
        tau = "dense" if r["threshold"] is None else f"{r['threshold']:+.2f}"
        ok = r["within_bound"] and r["same_decisions"]
        print(f"{r['prompt_tokens']:>6} {r['block_size']:>5} {tau:>7} {r['compression_ratio']:>11.1%} "
              f"{r['bytes_allocated'] / 2**20:>14.2f} {r['bytes_dense'] / 2**20:>10.2f} {r['bound_bytes'] / 2**20:>10.2f} "
              f"{r['page_waste']:>10.1%} {'yes' if ok else 'NO':>3}")

    sweep = len(block_sizes) > 1
    result = bench.result("memory-pages" if sweep else "memory", "bench_memory.py", argv, machine, device=base.device,
                          config=base.to_dict(), prompt_tokens=args.tokens, block_sizes=block_sizes, rows=rows)
    path = bench.write_result(result, args.out)
    (plot_pages if sweep else plot)(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0 if all(r["within_bound"] and r["same_decisions"] for r in rows) else 1


def plot(rows: list[dict], path: Path) -> None:
    """Allocated and bound bytes against compression, for the first prompt length and page size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if (r["prompt_tokens"], r["block_size"]) == (rows[0]["prompt_tokens"], rows[0]["block_size"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    cr = [r["compression_ratio"] for r in rows]
    ax.plot(cr, [r["bytes_allocated"] / 2**20 for r in rows], "o-", label="allocated (kept + window pages)")
    ax.plot(cr, [r["bound_bytes"] / 2**20 for r in rows], "--", label="bound: (1-c)·dense·stored/kv + a block per head")
    ax.axhline(rows[0]["bytes_dense"] / 2**20, color="gray", lw=1, label="dense cache")
    ax.set_xlabel("compression ratio (evicted / all KV pairs)")
    ax.set_ylabel("KV cache MiB")
    ax.set_title(f"SmolLM2-135M, {rows[0]['prompt_tokens']}-token prompt: real KV bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    bench.save_plot(fig, path)


def plot_pages(rows: list[dict], path: Path) -> None:
    """Page waste (allocated over the stored tokens' bytes) against page size, a line per prompt
    length and threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = list(dict.fromkeys(r["prompt_tokens"] for r in rows))
    taus = list(dict.fromkeys(r["threshold"] for r in rows))
    for n, tau in dict.fromkeys((r["prompt_tokens"], r["threshold"]) for r in rows):
        line = [r for r in rows if (r["prompt_tokens"], r["threshold"]) == (n, tau)]
        c = line[0]["compression_ratio"]
        label = f"{n} tokens, " + ("no eviction" if tau is None else f"τ {tau:+.2f} ({c:.0%} evicted)")
        ax.plot([r["block_size"] for r in line], [100 * r["page_waste"] for r in line], label=label,
                color=f"C{lengths.index(n)}", marker="os^Dv"[taus.index(tau) % 5], ls=["-", "--", ":", "-."][taus.index(tau) % 4])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["block_size"] for r in rows}), [str(b) for b in sorted({r["block_size"] for r in rows})])
    ax.set_xlabel("page size (tokens)")
    ax.set_ylabel("partly filled pages: % over the stored tokens' bytes")
    ax.set_title("SmolLM2-135M: KV memory lost to page granularity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    bench.save_plot(fig, path)


if __name__ == "__main__":
    sys.exit(main())
