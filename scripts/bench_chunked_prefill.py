#!/usr/bin/env python
"""Chunked prefill on the embedded default: what one long prompt costs the requests already decoding.

SmolLM2-135M on this CPU, float32, greedy, the preset's surrogate and tau. `--decoders` requests
(short prompts of real text) are decoding when one long prompt (`--long-tokens` of real text)
arrives; the engine is stepped until everything finishes. For each chunk size (`whole`: no
`max_num_tokens`, the prompt prefilled in one step; then each of `--chunks`), in one process,
one after the other:
  - the decoders' inter-token gaps after the long prompt arrives: median and max (the stall);
  - the long request's time to first token, and the whole run's generated tokens per second;
  - the long request's compression, and its greedy tokens against the whole-prompt run's (chunks
    change KVzap's decisions past the first chunk: later chunks attend to the compressed earlier
    ones), as the index of the first token that differs.
Timings are CPU wall times of one run each; compare ratios within the run.

Prints a table, writes bench/results/chunked-prefill-<date>.json (with the resolved config) and a PNG.

    .venv/bin/python scripts/bench_chunked_prefill.py [--long-tokens 4096] [--chunks 256 512 1024 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench_text import long_text  # scripts/ is on sys.path when a script runs
from kvzap_trt import bench
from kvzap_trt.config import resolve_config
from kvzap_trt.runtime.engine import Engine, EvictionPolicy
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.runtime.sampler import SamplingParams

PRESET = "smollm2-135m"


def run_one(rt: Runtime, short: list[list[int]], long_prompt: list[int], chunk: int | None, args) -> dict:
    """Decoders start, `args.warm_steps` steps later the long prompt arrives; step to the end."""
    m = rt.loaded.config
    spec = rt.make_cache(1, 1, 1).spec
    lens = [len(p) + args.decoder_new_tokens for p in short] + [len(long_prompt) + args.long_new_tokens]
    cache = rt.make_cache(m.max_position_embeddings, len(lens), sum(spec.prefill_blocks(n) for n in lens))
    policy = EvictionPolicy(rt.surrogate, rt.cfg.threshold, rt.cfg.compress_decoding)
    engine = Engine(rt.loaded.model, cache, policy, m.max_position_embeddings, max_num_tokens=chunk)
    decoders = [engine.submit(p, SamplingParams(max_new_tokens=args.decoder_new_tokens)) for p in short]
    for _ in range(args.warm_steps):
        engine.step()
    arrived = time.perf_counter()
    target = engine.submit(long_prompt, SamplingParams(max_new_tokens=args.long_new_tokens))
    emitted = {r.request_id: [arrived] for r in decoders}  # the arrival opens each decoder's first gap
    first_token = None
    start, steps = arrived, 0
    while engine.has_work():
        before = {r.request_id: len(r.output_ids) for r in decoders}
        engine.step()
        now, steps = time.perf_counter(), steps + 1
        for r in decoders:
            if len(r.output_ids) > before[r.request_id]:
                emitted[r.request_id].append(now)
        if first_token is None and target.output_ids:
            first_token = now - arrived
    seconds = time.perf_counter() - start
    # Gaps while the long prompt was being prefilled or decoded beside them, until each decoder ends.
    gaps = [b - a for times in emitted.values() for a, b in zip(times, times[1:])]
    generated = sum(len(r.output_ids) for r in decoders) - args.warm_steps * len(decoders) + len(target.output_ids)
    return {"chunk": chunk, "steps": steps, "decoder_gap_median_ms": 1e3 * statistics.median(gaps),
            "decoder_gap_max_ms": 1e3 * max(gaps), "long_ttft_s": first_token, "tokens_per_s": generated / seconds,
            "long_compression": target.kv["compression_ratio"], "long_token_ids": target.output_ids,
            "all_finished": all(r.finish_reason in ("length", "stop") for r in [*decoders, target])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long-tokens", type=int, default=4096)
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--decoders", type=int, default=4, help="requests decoding when the long prompt arrives")
    ap.add_argument("--decoder-prompt-tokens", type=int, default=64)
    ap.add_argument("--decoder-new-tokens", type=int, default=48)
    ap.add_argument("--long-new-tokens", type=int, default=32)
    ap.add_argument("--warm-steps", type=int, default=4, help="decoder steps before the long prompt arrives")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see bench_cpu.py)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    if any(c < 1 for c in args.chunks):
        ap.error("--chunks must be >= 1")
    if args.decoder_new_tokens <= args.warm_steps + -(-args.long_tokens // min(args.chunks)):
        ap.error("--decoder-new-tokens must outlast the warm steps and the smallest chunk's prefill steps")
    torch.set_num_threads(args.threads)

    rt = Runtime.from_config(resolve_config(PRESET))
    ids = rt.encode(long_text())
    n, k = args.decoder_prompt_tokens, args.decoders
    if len(ids) < args.long_tokens + n * k:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {args.long_tokens} + {k} x {n}")
    long_prompt = ids[: args.long_tokens]
    short = [ids[args.long_tokens + i * n: args.long_tokens + (i + 1) * n] for i in range(k)]
    rt.generate([ids[:32]], SamplingParams(max_new_tokens=2))  # warm-up, untimed

    rows = []
    machine = bench.machine_info(threads=args.threads)
    for chunk in tqdm([None, *args.chunks], desc="chunk sizes", file=sys.stderr):
        rows.append(run_one(rt, short, long_prompt, chunk, args))
    whole = rows[0]
    for r in rows:
        a, b = r["long_token_ids"], whole["long_token_ids"]
        r["first_token_differing_from_whole"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        r["stall_vs_whole"] = r["decoder_gap_max_ms"] / whole["decoder_gap_max_ms"]
        r["ttft_vs_whole"] = r["long_ttft_s"] / whole["long_ttft_s"]

    print(f"\nSmolLM2-135M, {machine['device']}, {args.threads} thread(s): {k} requests decoding, then a "
          f"{args.long_tokens}-token prompt arrives (preset tau {rt.cfg.threshold}, window {rt.cfg.window})")
    print(f"{'chunk':>6} {'steps':>6} {'gap p50 ms':>11} {'gap max ms':>11} {'x whole':>8} {'long TTFT s':>12} "
          f"{'x whole':>8} {'tok/s':>7} {'long evicted':>13} {'1st diff':>9}")
    for r in rows:
        diff = r["first_token_differing_from_whole"]
        print(f"{r['chunk'] or 'whole':>6} {r['steps']:>6} {r['decoder_gap_median_ms']:>11.1f} "
              f"{r['decoder_gap_max_ms']:>11.1f} {r['stall_vs_whole']:>8.3f} {r['long_ttft_s']:>12.2f} "
              f"{r['ttft_vs_whole']:>8.2f} {r['tokens_per_s']:>7.2f} {r['long_compression']:>13.1%} "
              f"{'none' if diff is None else diff:>9}")

    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = bench.result("chunked-prefill", "bench_chunked_prefill.py", argv, machine,
                          config=rt.cfg.to_dict(), long_tokens=args.long_tokens, decoders=k, decoder_prompt_tokens=n,
                          decoder_new_tokens=args.decoder_new_tokens, long_new_tokens=args.long_new_tokens,
                          warm_steps=args.warm_steps, rows=rows)
    path = bench.write_result(result, args.out)
    plot(rows, path.with_suffix(".png"), args.long_tokens)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0 if all(r["all_finished"] for r in rows) else 1


def plot(rows: list[dict], path: Path, long_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r["chunk"] or "whole") for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [r["decoder_gap_max_ms"] / 1e3 for r in rows], color="tab:red", label="longest gap")
    ax1.bar(names, [r["decoder_gap_median_ms"] / 1e3 for r in rows], color="tab:blue", label="median gap")
    ax1.set(xlabel="prefill chunk (tokens)", ylabel="seconds between tokens",
            title=f"requests decoding while a {long_tokens}-token prompt arrives")
    ax1.legend()
    ax2.bar(names, [r["long_ttft_s"] for r in rows], color="tab:gray")
    ax2.set(xlabel="prefill chunk (tokens)", ylabel="seconds", title="the long prompt's time to first token")
    fig.tight_layout()
    bench.save_plot(fig, path)


if __name__ == "__main__":
    sys.exit(main())
