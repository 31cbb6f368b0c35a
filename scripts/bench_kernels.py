#!/usr/bin/env python
"""The CUDA kernels on the GPU, beside the device copy bandwidth and a dense baseline, in one run.

Qwen3-8B shapes (32 query / 8 kv heads, head_dim 128, bf16, 16-token pages, window 128):
  - decode attention (kvzapVarlenPagedAttention) for batch x context x kept fraction: time, GB/s
    counting q + kept K/V bytes (FlashInfer's convention), and the dense baseline on the full,
    uncompressed cache (FlashInfer's paged decode if its wheel runs here, else PyTorch SDPA);
    launched as the engine launches it (splits from the step plan's key bound, kept + window + 1),
    and again with splits from the uncompressed context (what the bound buys);
  - decode evict/append (kvzapEvict) at batch 64, per layer and in one launch over 36 layers, with
    every head popping a page off the free stack at once (the worst case for its counter), 2% of
    them (a steady state) and none (what the pops cost);
  - prefill evict/append of a 32k prompt against the dense causal prefill attention of that layer;
  - chunked prefill attention (--chunks): a C-token chunk of one sequence over its compressed
    cache, by the kernel's packed launch (16 / G tokens per block: what a TensorRT engine runs)
    and by the torch executor's gather + fused attention (ops/cached_chunks.py), against fused
    attention of the same C queries over the uncompressed context: which route the torch executor
    should take, and whether a tiled chunk kernel (more tokens per key read) would pay;
  - a fresh prompt (--prompts, nothing cached) through the kernel's packed launch, as a TensorRT
    engine attends it, against PyTorch's fused causal attention (flash), which the torch executor
    uses: what a FlashAttention-style prefill in the TensorRT graph would buy;
  - page size: decode attention at the largest batch and context with 32- and 64-token pages
    (--page-sizes) beside the 16-token pages of the rest (scattered 4 KiB pages against longer runs),
    and with 16-token pages laid out in one run per head (page "16r": what allocating pages in runs
    could buy at best);
Prints a table, writes bench/results/kernels-<device>-<date>.json and a PNG.

    .venv/bin/python scripts/bench_kernels.py [--batches 1 8 32] [--contexts 4096 16384 32768] [--page-sizes 16 32 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kvzap_trt import bench
from kvzap_trt.cache.allocator import pop_blocks
from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.ops import cuda_kernels
from kvzap_trt.ops.interface import key_bound

HQ, H, D, W, BS, LAYERS = 32, 8, 128, 128, 16, 36  # BS: the page size of every case but the page-size sweep
R = -(-W // BS)  # window pages per head
DTYPE = torch.bfloat16


def time_us(fn, reps: int = 50) -> float:
    """Median microseconds per call, L2 flushed between calls (triton.testing.do_bench when present)."""
    try:
        from triton.testing import do_bench

        return 1e3 * do_bench(fn, warmup=10, rep=reps, return_mode="median")
    except ImportError:
        flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        times = []
        for _ in range(reps):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_us(lambda: dst.copy_(src)) / 1e3


def ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def attention_cache(batch: int, context: int, kept_fraction: float, block_size: int = BS, runs: bool = False):
    """One layer: each kv head of each sequence keeps kept_fraction of the tokens outside the
    window, and holds a full window; pages in random pool order, or with `runs` each head's pages
    consecutive in the pool (what allocating a head's pages in runs would give at best)."""
    kept = round(kept_fraction * (context - W))
    blocks_per_head, ring = -(-kept // block_size), -(-W // block_size)
    spec = CacheSpec(1, H, D, W, block_size, batch * H * (blocks_per_head + ring), batch, context + 1, DTYPE)
    cache = PagedKVCache(spec, "cuda")
    order = torch.arange if runs else torch.randperm
    ids = order(spec.num_blocks, device="cuda", dtype=torch.int32).view(batch, H, blocks_per_head + ring)
    cache.block_table[0, :, :, :blocks_per_head] = ids[..., :blocks_per_head]
    cache.ring_table[0] = ids[..., blocks_per_head:]
    cache.kept_len[0] = kept
    for t in (cache.k_pool, cache.v_pool):
        t.normal_()
    return cache, kept


def bench_decode_attention(batch: int, context: int, kept_fraction: float, dense_fn, block_size: int = BS,
                           runs: bool = False) -> dict:
    cache, kept = attention_cache(batch, context, kept_fraction, block_size, runs)
    lc = cache.layer(0)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
    k_new, v_new = (torch.randn(batch, H, D, device="cuda", dtype=DTYPE) for _ in range(2))
    cu, slots, ctx = ints(list(range(batch + 1))), ints(list(range(batch))), ints([context] * batch)
    out, stream = torch.empty_like(q), torch.cuda.current_stream().cuda_stream
    error = torch.zeros(1, dtype=torch.int32, device="cuda")

    def timed(max_keys: int) -> float:
        """Microseconds of one launch whose splits are sized from max_keys."""
        split, workspace = cuda_kernels.split_and_workspace(DTYPE, batch, batch, HQ, H, D, max_keys, q.device)

        def run():
            torch.ops.kvzap_trt.paged_attention(q, k_new, v_new, cu, slots, ctx, lc.k_pool, lc.v_pool, lc.block_table,
                                                lc.kept_len, lc.ring_table, W, D**-0.5, max_keys, split, out,
                                                workspace, error, stream)

        t = time_us(run)
        cuda_kernels.raise_kernel_error(int(error.item()))
        return t

    # What the engine launches: the plan's bound from the scheduler's max_kept (kept + W + 1); and
    # splits sized from the uncompressed context, as before the plan carried max_kept (and as a
    # TensorRT engine would without its max_keys input).
    t = timed(key_bound(tuple(range(batch + 1)), (context,) * batch, W, kept))
    t_context = timed(context + 1)
    keys = kept + W + 1
    moved = batch * (HQ * D + 2 * H * keys * D) * 2
    dense_t = dense_fn(batch, context)
    return {"kernel": "varlenPagedAttention", "batch": batch, "kv_len": context, "kept_fraction": kept_fraction,
            "block_size": block_size, "page_runs": runs, "time_us": t, "GBps": moved / t / 1e3, "dense_time_us": dense_t,
            "speedup_vs_dense": dense_t / t, "time_us_splits_from_context": t_context}


def dense_baseline():
    """(name, fn(batch, context) -> us) of the best dense paged decode available here."""
    try:
        import flashinfer

        def flashinfer_us(batch: int, context: int) -> float:
            pages = -(-context // BS)
            kv = torch.randn(batch * pages, 2, BS, H, D, device="cuda", dtype=DTYPE)
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
            wrapper.plan(torch.arange(batch + 1, device="cuda", dtype=torch.int32) * pages,
                         torch.arange(batch * pages, device="cuda", dtype=torch.int32),
                         torch.full((batch,), context - (pages - 1) * BS, device="cuda", dtype=torch.int32),
                         HQ, H, D, BS, data_type=DTYPE)
            q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE)
            return time_us(lambda: wrapper.run(q, kv))

        flashinfer_us(1, 256)  # fails here if the wheel does not run on this machine
        return f"flashinfer {flashinfer.__version__} BatchDecodeWithPagedKVCacheWrapper", flashinfer_us
    except Exception:  # not installed, or built for another CUDA/torch: fall back
        pass

    def sdpa_us(batch: int, context: int) -> float:
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=DTYPE)
        k, v = (torch.randn(batch, H, context, D, device="cuda", dtype=DTYPE) for _ in range(2))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return time_us(lambda: sdpa(q, k, v, enable_gqa=True))

    return f"torch {torch.__version__} scaled_dot_product_attention (dense, GQA)", sdpa_us


def evict_args(cache: PagedKVCache, layered: bool, batch: int, tokens: int, context: int) -> tuple:
    """torch.ops.kvzap_trt.evict_append arguments: every leaver kept (the most work)."""
    k = torch.randn(*([LAYERS] if layered else []), batch * tokens, H, D, device="cuda", dtype=DTYPE)
    scores = torch.full(k.shape[:-1], float("inf"), device="cuda")
    t = cache if layered else cache.layer(0)  # [L, ...] tensors, or one layer's views
    a = cache.allocator
    return (k, k.clone(), scores, ints([i * tokens for i in range(batch + 1)]), ints(list(range(batch))),
            ints([context] * batch), cache.k_pool, cache.v_pool, cache.pos_pool, cache.score_pool, t.block_table,
            t.kept_len, t.ring_table, a.free_stack, a.num_free_t, torch.zeros(1, dtype=torch.int32, device="cuda"), W,
            0.0, tokens, torch.cuda.current_stream().cuda_stream)


def hold_full_windows(cache: PagedKVCache, batch: int) -> None:
    """Give slots [0, batch) of every layer the window pages of a context >= W, as if written."""
    L, a = cache.spec.num_layers, cache.allocator
    cache.ring_table[:, :batch] = pop_blocks(a.free_stack, a.num_free_t, L * batch * H * R).view(L, batch, H, R)


def time_evict_us(cache: PagedKVCache, args: tuple, reps: int, kept_len: torch.Tensor | None = None) -> float:
    """Each call appends, so the cache is reset before it (kept lengths to `kept_len`, else 0; the
    free count); the reset's own time is measured alone and taken off."""
    num_free = cache.allocator.num_free

    def reset():
        if kept_len is None:
            cache.kept_len.zero_()
        else:
            cache.kept_len.copy_(kept_len)
        cache.allocator.num_free_t.fill_(num_free)

    def run():
        reset()
        torch.ops.kvzap_trt.evict_append(*args)

    t = max(0.0, time_us(run, reps) - time_us(reset, reps))
    error = int(args[15].item())  # OR-ed by every call: a failing evict would time as a fast no-op
    if error:
        raise RuntimeError(f"evict_append set error bits {error} while timed (1 pool exhausted, 2 table full, 4 bound)")
    return t


def bench_decode_evict(batch: int, layered: bool, pop_share: float = 1.0) -> dict:
    """One decode token per sequence at context 2048: a token leaves the window of every head and
    is kept. A `pop_share` of the heads (chosen at random) start the step with a full kept page, so
    they pop a new one from the free stack; the others add to a page they hold. 1.0, every head
    pops at once: the most work and the most contention on the stack's counter; ~0.02, a steady
    state (30% of leavers kept into 16-token pages); 0, what the pops cost by difference."""
    layers = LAYERS if layered else 1
    cache = PagedKVCache(CacheSpec(layers, H, D, W, BS, layers * batch * H * (2 + R), batch, 4096, DTYPE), "cuda")
    hold_full_windows(cache, batch)
    kept_len = None
    if pop_share < 1.0:  # a kept page for every head: kept_len BS (full: the next row pops) or 1 (room)
        a = cache.allocator
        cache.block_table[:, :batch, :, 0] = pop_blocks(a.free_stack, a.num_free_t, layers * batch * H).view(layers, batch, H)
        pops = torch.rand(layers, batch, H, generator=torch.Generator().manual_seed(0)) < pop_share
        kept_len = torch.ones_like(cache.kept_len)
        kept_len[:, :batch] = torch.where(pops, BS, 1).to(kept_len.device, kept_len.dtype)
    t = time_evict_us(cache, evict_args(cache, layered, batch, 1, 2048), reps=50, kept_len=kept_len)
    share = "" if pop_share == 1.0 else "_no_pop" if pop_share == 0 else f"_pop_{pop_share:.0%}"
    return {"kernel": "evict_decode" + ("_36_layers" if layered else "") + share, "batch": batch, "kv_len": 2048,
            "kept_fraction": 1.0, "pop_share": pop_share, "time_us": t, "time_us_per_layer": t / layers}


def bench_prefill_evict(prompt: int) -> dict:
    """A fresh prompt of `prompt` tokens, one layer, against that layer's dense causal attention
    (the call takes the window pages too)."""
    cache = PagedKVCache(CacheSpec(1, H, D, W, BS, H * (prompt // BS + R), 1, prompt, DTYPE), "cuda")
    t = time_evict_us(cache, evict_args(cache, False, 1, prompt, 0), reps=20)
    q = torch.randn(1, HQ, prompt, D, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(1, H, prompt, D, device="cuda", dtype=DTYPE) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dense = time_us(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), reps=20)
    return {"kernel": "evict_prefill", "batch": 1, "kv_len": prompt, "kept_fraction": 1.0, "time_us": t,
            "dense_prefill_attention_us": dense, "fraction_of_prefill_attention": t / dense}


def time_kernel_and_pytorch(q, k_new, v_new, host, lc, max_kept: int) -> tuple[float, float]:
    """Microseconds of one layer's attention of these rows (host: cu_seqlens, slots, ctx) through the
    kernel alone (kernel_only: the packed launch, as a TensorRT engine runs them) and through the
    torch executor's route (PyTorch's fused attention for prompt rows)."""
    def attend(kernel_only: bool):
        return lambda: cuda_kernels.paged_attention(q, k_new, v_new, *host, lc.k_pool, lc.v_pool, lc.block_table,
                                                    lc.kept_len, lc.ring_table, W, D**-0.5, max_kept,
                                                    kernel_only=kernel_only)

    return time_us(attend(True), reps=20), time_us(attend(False), reps=20)


def bench_chunk_attention(chunk: int, context: int, kept_fraction: float) -> dict:
    """One layer: a `chunk`-token prompt chunk of one sequence whose cache holds `context` tokens
    (kept_fraction of those outside the window kept), three ways (module docstring)."""
    cache, kept = attention_cache(1, context, kept_fraction)
    lc = cache.layer(0)
    q = torch.randn(chunk, HQ, D, device="cuda", dtype=DTYPE)
    k_new, v_new = (torch.randn(chunk, H, D, device="cuda", dtype=DTYPE) for _ in range(2))
    host = [torch.tensor(v, dtype=torch.int32) for v in ([0, chunk], [0], [context])]  # cu_seqlens, slots, ctx

    packed, gathered = time_kernel_and_pytorch(q, k_new, v_new, host, lc, kept)
    # Dense: the same queries over the uncompressed context + the chunk, causal within the chunk.
    qd = q.transpose(0, 1)[None]  # [1, Hq, C, D]
    kd, vd = (torch.randn(1, H, context + chunk, D, device="cuda", dtype=DTYPE) for _ in range(2))
    mask = torch.ones(chunk, context + chunk, dtype=torch.bool, device="cuda").tril(context)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dense = time_us(lambda: sdpa(qd, kd, vd, attn_mask=mask, enable_gqa=True), reps=20)
    return {"kernel": "chunk_attention", "batch": 1, "chunk": chunk, "kv_len": context, "kept_fraction": kept_fraction,
            "time_us": packed, "time_us_gather_fused": gathered, "dense_time_us": dense,
            "packed_kernel_vs_gather_fused": packed / gathered}


def bench_fresh_prompt_attention(prompt: int) -> dict:
    """One layer: a `prompt`-token prompt with nothing cached, through the kernel (every row: the
    packed launch) and through PyTorch's fused causal attention."""
    R = -(-W // BS)
    cache = PagedKVCache(CacheSpec(1, H, D, W, BS, H * R, 1, prompt + 1, DTYPE), "cuda")
    lc = cache.layer(0)
    q = torch.randn(prompt, HQ, D, device="cuda", dtype=DTYPE)
    k_new, v_new = (torch.randn(prompt, H, D, device="cuda", dtype=DTYPE) for _ in range(2))
    host = [torch.tensor(v, dtype=torch.int32) for v in ([0, prompt], [0], [0])]  # cu_seqlens, slots, ctx

    packed, fused = time_kernel_and_pytorch(q, k_new, v_new, host, lc, 0)
    return {"kernel": "fresh_prompt_attention", "batch": 1, "prompt": prompt, "kv_len": prompt, "kept_fraction": 1.0,
            "time_us": packed, "fused_causal_time_us": fused, "packed_kernel_vs_fused_causal": packed / fused}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--kept", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32, 64],
                    help="page sizes compared at the largest batch and context (the rest use 16)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 2048],
                    help="prefill chunk sizes timed over the largest context at each kept fraction")
    ap.add_argument("--prompts", type=int, nargs="+", default=[2048, 8192],
                    help="fresh prompt lengths timed through the kernel and through fused causal attention")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device")
    cuda_kernels.load()
    machine = bench.machine_info("cuda")
    device = machine["device"]
    copy = copy_bandwidth()
    baseline, dense_fn = dense_baseline()

    cases = []
    grid = [(b, c, f) for b in args.batches for c in args.contexts for f in args.kept]
    grid += [(max(args.batches), max(args.contexts), f, bs) for bs in args.page_sizes if bs != BS for f in args.kept]
    # Each head's pages consecutive in the pool, at the largest batch and context: whether
    # allocating pages in runs would pay (against the scattered pages of the same case above).
    grid += [(max(args.batches), max(args.contexts), f, BS, True) for f in args.kept]
    for b, c, f, *layout in tqdm(grid, desc="decode attention", file=sys.stderr):
        cases.append(bench_decode_attention(b, c, f, dense_fn, *layout))
    cases += [bench_decode_evict(64, layered=False), bench_decode_evict(64, layered=True),
              bench_decode_evict(64, layered=True, pop_share=0.02), bench_decode_evict(64, layered=True, pop_share=0.0),
              bench_prefill_evict(32768)]
    chunk_grid = [(c, max(args.contexts), f) for c in args.chunks for f in args.kept]
    cases += [bench_chunk_attention(*g) for g in tqdm(chunk_grid, desc="chunk attention", file=sys.stderr)]
    cases += [bench_fresh_prompt_attention(n) for n in tqdm(args.prompts, desc="fresh prompts", file=sys.stderr)]

    print(f"{device}: copy {copy:.0f} GB/s; dense baseline: {baseline}")
    print(f"{'kernel':<22}{'batch':>6}{'kv_len':>8}{'kept':>6}{'page':>6}{'us':>10}{'GB/s':>8}{'%copy':>7}{'dense us':>10}"
          f"{'speedup':>9}{'ctx-split us':>13}")
    for r in cases:
        gbps = r.get("GBps")
        page = f"{r.get('block_size', BS)}{'r' if r.get('page_runs') else ''}"  # r: the head's pages in one run
        print(f"{r['kernel']:<22}{r['batch']:>6}{r['kv_len']:>8}{r['kept_fraction']:>6.2f}{page:>6}"
              f"{r['time_us']:>10.1f}"
              + (f"{gbps:>8.0f}{100 * gbps / copy:>6.0f}%{r['dense_time_us']:>10.1f}{r['speedup_vs_dense']:>8.2f}x"
                 f"{r['time_us_splits_from_context']:>13.1f}"
                 if gbps else f"{'':>8}{'':>7}" + "".join(f"  {k}={v:.4g}" for k, v in r.items()
                                                          if k in ("time_us_per_layer", "fraction_of_prefill_attention",
                                                                   "chunk", "time_us_gather_fused", "dense_time_us",
                                                                   "fused_causal_time_us"))))

    result = bench.result("kernels", "bench_kernels.py", argv, machine, device=device, copy_GBps=copy,
                          dense_baseline=baseline, dtype=str(DTYPE),
                          shapes={"q_heads": HQ, "kv_heads": H, "head_dim": D, "block_size": BS, "window": W}, cases=cases)
    path = bench.write_result(result, args.out, f"kernels-{bench.device_slug(device)}")
    plot([r for r in cases if "GBps" in r and r["block_size"] == BS and not r["page_runs"]], copy, path.with_suffix(".png"),
         device)
    print(f"wrote {path}")
    return 0


def plot(rows: list[dict], copy: float, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for f in sorted({r["kept_fraction"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["kept_fraction"] == f and r["batch"] == max(x["batch"] for x in rows)]
        ax1.plot([r["kv_len"] for r in sel], [r["GBps"] for r in sel], "o-", label=f"kept {f:.0%}")
        ax2.plot([r["kv_len"] for r in sel], [r["speedup_vs_dense"] for r in sel], "o-", label=f"kept {f:.0%}")
    ax1.axhline(copy, color="gray", ls="--", label="device copy")
    ax1.set(xscale="log", xlabel="context (tokens)", ylabel="GB/s (q + kept K/V)", title=f"decode attention, {device}")
    ax2.set(xscale="log", xlabel="context (tokens)", ylabel="speed-up vs dense", title="vs dense decode, full cache")
    for ax in (ax1, ax2):
        ax.legend()
    fig.tight_layout()
    bench.save_plot(fig, path)


if __name__ == "__main__":
    sys.exit(main())
