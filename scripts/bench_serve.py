#!/usr/bin/env python
"""Concurrency and throughput at a fixed KV memory budget: dense vs KVzap, in one run.

The serving engine (the same scheduler the Triton model runs; no HTTP in the timing) gets a
burst of requests, each a different slice of real text, and a block pool sized to hold
`--budget-seqs` of them uncompressed. Admission is by free blocks, so what KVzap evicts becomes
room for more sequences. For each configuration it records the peak number of sequences running
at once, generated tokens per second, and the mean compression ratio; KVzap's concurrency over
dense should be about 1/(1 - compression) (the bound: within 10%).

Prints a table, writes bench/results/serve-<date>.json (with the resolved config) and a PNG.

    .venv/bin/python scripts/bench_serve.py [--requests 80] [--prompt-tokens 384] [--thresholds 0.0 0.2]

With --openai, the same comparison through the OpenAI-compatible HTTP front, driven by NVIDIA's
AIPerf at several concurrencies (scripts/bench_serve_openai.py: throughput, time to first
token, inter-token latency, peak running sequences; --help there).
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
from kvzap_trt.runtime.engine import Engine, EvictionPolicy
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.runtime.sampler import SamplingParams


def run_config(rt: Runtime, prompts: list[list[int]], num_blocks: int, max_seqs: int, new_tokens: int, desc: str):
    m = rt.loaded.config
    cache = rt.make_cache(m.max_position_embeddings, max_seqs, num_blocks)
    policy = EvictionPolicy(rt.surrogate, rt.cfg.threshold, rt.cfg.compress_decoding)
    engine = Engine(rt.loaded.model, cache, policy, m.max_position_embeddings)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=new_tokens)) for p in prompts]
    peak, t0 = 0, time.perf_counter()
    with tqdm(total=len(reqs), desc=desc, file=sys.stderr) as bar:
        while engine.has_work():
            done = engine.step()
            peak = max(peak, len(engine.running) + len(done))
            bar.update(len(done))
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in reqs)
    return {
        "peak_concurrent_seqs": peak,
        "generated_tokens": tokens,
        "seconds_cpu": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 3),
        "compression_ratio": sum(r.kv["compression_ratio"] for r in reqs) / len(reqs),
        "preemptions": sum(r.preemptions for r in reqs),
        "all_finished": all(r.finish_reason == "length" for r in reqs),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--openai" in argv:
        import bench_serve_openai  # scripts/ is on sys.path when a script runs

        return bench_serve_openai.main(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--openai", action="store_true",
                    help="through the OpenAI front with AIPerf instead (scripts/bench_serve_openai.py --help)")
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--prompt-tokens", type=int, default=384)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--budget-seqs", type=int, default=16, help="KV pool = this many requests held uncompressed")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.2])
    ap.add_argument("--surrogate", default="random:linear:0",
                    help="surrogate (default: seeded random weights, which the recorded thresholds refer to)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)

    base = resolve_config("smollm2-135m", window=args.window, surrogate=args.surrogate)
    machine = bench.machine_info(base.device)
    rt = Runtime.from_config(base)
    ids = rt.encode(long_text())
    n = args.prompt_tokens
    if len(ids) < n * args.requests:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {args.requests} x {n}")
    prompts = [ids[i * n : (i + 1) * n] for i in range(args.requests)]

    spec = rt.make_cache(1, 1, 1).spec
    dense_blocks_per_req = spec.prefill_blocks(n + args.new_tokens)  # kept and window pages, nothing evicted
    num_blocks = args.budget_seqs * dense_blocks_per_req
    budget_mib = num_blocks * spec.block_bytes / 2**20

    rows = []
    for tau in [None] + args.thresholds:
        cfg = dataclasses.replace(base, threshold=0.0 if tau is None else tau)
        run = Runtime(cfg, rt.loaded, None if tau is None else rt.surrogate)
        name = "dense" if tau is None else f"tau={tau:+.2f}"
        rows.append({"config": name, "threshold": tau,
                     **run_config(run, prompts, num_blocks, args.requests, args.new_tokens, name)})
    dense = rows[0]
    for r in rows:
        r["concurrency_vs_dense"] = round(r["peak_concurrent_seqs"] / dense["peak_concurrent_seqs"], 3)
        r["expected_1_over_1_minus_c"] = round(1 / (1 - r["compression_ratio"]), 3)
        r["within_10pct"] = abs(r["concurrency_vs_dense"] / r["expected_1_over_1_minus_c"] - 1) <= 0.10
        r["throughput_vs_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)

    print(f"\nSmolLM2-135M on {machine['device']}, {args.requests} requests x {n} prompt tokens + "
          f"{args.new_tokens} new, window {args.window}, KV pool {num_blocks} blocks = {budget_mib:.1f} MiB "
          f"({args.budget_seqs} requests uncompressed)")
    print(f"{'config':>10} {'compression':>11} {'peak seqs':>9} {'x dense':>8} {'1/(1-c)':>8} {'ok':>3} "
          f"{'tok/s':>7} {'x dense':>8} {'preempt':>7}")
    for r in rows:
        print(f"{r['config']:>10} {r['compression_ratio']:>11.1%} {r['peak_concurrent_seqs']:>9} "
              f"{r['concurrency_vs_dense']:>8.2f} {r['expected_1_over_1_minus_c']:>8.2f} "
              f"{'yes' if r['within_10pct'] else 'NO':>3} {r['tokens_per_s']:>7.2f} {r['throughput_vs_dense']:>8.2f} "
              f"{r['preemptions']:>7}")

    result = bench.result("serve", "bench_serve.py", argv, machine, device=base.device, config=base.to_dict(),
                          requests=args.requests, prompt_tokens=n, new_tokens=args.new_tokens, kv_pool_blocks=num_blocks,
                          kv_pool_mib=round(budget_mib, 2), rows=rows)
    path = bench.write_result(result, args.out)
    plot(rows, path.with_suffix(".png"), budget_mib)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0 if all(r["within_10pct"] and r["all_finished"] for r in rows) else 1


def plot(rows: list[dict], path: Path, budget_mib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [f"{r['config']}\n({r['compression_ratio']:.0%} evicted)" for r in rows]
    a.bar(names, [r["peak_concurrent_seqs"] for r in rows], color="tab:blue", label="measured")
    a.plot(names, [rows[0]["peak_concurrent_seqs"] * r["expected_1_over_1_minus_c"] for r in rows], "k_",
           markersize=30, mew=2, label="dense × 1/(1-c)")
    a.set_title(f"peak concurrent sequences, {budget_mib:.0f} MiB KV pool")
    a.legend(fontsize=8)
    b.bar(names, [r["tokens_per_s"] for r in rows], color="tab:green")
    b.set_title("generated tokens / s (CPU)")
    fig.tight_layout()
    bench.save_plot(fig, path)


if __name__ == "__main__":
    sys.exit(main())
