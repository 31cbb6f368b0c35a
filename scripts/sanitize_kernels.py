#!/usr/bin/env python
"""Small runs of both CUDA kernels, each checked against the PyTorch reference: the program that
scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

  - kvzapEvict, fused path (evict_fused_kernel): a batch of a 300-token and a 17-token prefill,
    then a decode step (evict_decode_kernel, a warp per head); chunked path (evict_plan/copy/commit_kernel): a 4200-token prefill
    (>= 4096 new tokens in a sequence);
  - kvzapVarlenPagedAttention (attention_mma_kernel in bf16, attention_kernel in fp32, merge_kernel): decode rows over ragged kept pages
    and a full window with a forced split of 40 keys (splits start mid-page, many of them, merged),
    and a chunked-prefill row set (tokens added to a cached sequence), in bf16 and fp32.
The kernels run through kvzap_trt.ops.dispatch.CUDA on the device; the reference runs on CPU
copies of the same inputs. Any mismatch exits 1, so a sanitizer run fails on wrong output too.

    python scripts/sanitize_kernels.py                 # on a GPU: kernels vs reference
    python scripts/sanitize_kernels.py --device cpu    # the reference on both sides: checks this script
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvzap_trt.cache.allocator import pop_blocks
from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.ops.dispatch import CUDA, REFERENCE
from kvzap_trt.ops.evict_append import window_rows

TAU = 0.0
EVICT = dict(num_layers=1, num_kv_heads=2, head_dim=64, window=128, block_size=16, num_blocks=1024, max_seqs=3,
             max_seq_len=4400)
# (chunk sizes per sequence, step by step): fused path (prefill then decode), chunked path
EVICT_RUNS = {"evict fused: prefill 300 + 17, then decode": [[300, 1], [17, 1]],
              "evict chunked: prefill 4200": [[4200]]}
# kept tokens per kv head of each sequence, new tokens of each sequence
ATTENTION_RUNS = {"attention decode, split 40": ([[0, 700], [33, 1], [300, 5]], [1, 1, 1]),
                  "attention chunked prefill": ([[129, 40], [0, 17]], [24, 9]),
                  # None: nothing cached (a fresh prompt, which a TensorRT engine attends in the kernel too)
                  "attention fresh prompt, chunk, decode": ([None, [129, 40], [0, 700]], [37, 24, 1])}


def evict_check(chunks: list[list[int]], device: str, ops, dtype: torch.dtype, g: torch.Generator) -> None:
    """Write `chunks` into a cache on `device` with `ops` and into a CPU cache with the reference;
    the kept and the window tokens (positions, K/V, scores) in order, lengths and pool usage must be
    equal."""
    spec = CacheSpec(**EVICT, dtype=dtype)
    caches = {"run": PagedKVCache(spec, device), "reference": PagedKVCache(spec, "cpu")}
    slots = [caches["run"].add_sequence() for _ in chunks]
    assert slots == [caches["reference"].add_sequence() for _ in chunks]
    H, D = spec.num_kv_heads, spec.head_dim
    streams = [(torch.randn(sum(c), H, D, generator=g).to(dtype), torch.randn(sum(c), H, D, generator=g).to(dtype),
                torch.randn(sum(c), H, generator=g)) for c in chunks]
    written = [0] * len(chunks)
    for step in range(max(len(c) for c in chunks)):
        batch = [b for b, c in enumerate(chunks) if step < len(c)]
        sizes = [chunks[b][step] for b in batch]
        rows = [slice(written[b], written[b] + n) for b, n in zip(batch, sizes)]
        k, v, sc = (torch.cat([streams[b][i][r] for b, r in zip(batch, rows)]) for i in range(3))
        cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)
        slot_t = torch.tensor([slots[b] for b in batch], dtype=torch.int32)
        ctx = torch.tensor([written[b] for b in batch], dtype=torch.int32)
        for name, cache in caches.items():
            impl, dev = (ops, device) if name == "run" else (REFERENCE, "cpu")
            lc, a = cache.layer(0), cache.allocator
            impl.evict_append(k.to(dev), v.to(dev), sc.to(dev), cu, slot_t, ctx, lc.k_pool, lc.v_pool, lc.pos_pool,
                              lc.score_pool, lc.block_table, lc.kept_len, lc.ring_table, a.free_stack, a.num_free_t,
                              spec.window, TAU)
        for b, n in zip(batch, sizes):
            written[b] += n
    for cache in caches.values():
        for b, s in enumerate(slots):
            cache.ctx_len[s] = written[b]
    assert_same_cache(caches["run"], caches["reference"], slots)


def pool_rows(cache: PagedKVCache, blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(positions, K, V, scores) of pool rows blocks * bs + offsets, on CPU."""
    return tuple(t[blocks, offsets].cpu() for t in (cache.pos_pool, cache.k_pool, cache.v_pool, cache.score_pool))


def kept_pages(cache: PagedKVCache, slot: int, head: int) -> tuple[torch.Tensor, ...]:
    """(positions [n], K [n, D], V [n, D], scores [n]) of one head's kept pages in page order."""
    n, bs = int(cache.kept_len[0, slot, head]), cache.spec.block_size
    j = torch.arange(n, device=cache.device)
    return pool_rows(cache, cache.block_table[0, slot, head, j // bs].long(), j % bs)


def window(cache: PagedKVCache, slot: int, head: int) -> tuple[torch.Tensor, ...]:
    """(positions, K, V, scores) of one head's window, oldest first."""
    spec, c = cache.spec, cache.ctx_len[slot]
    positions = torch.arange(max(0, c - spec.window), c, device=cache.device)
    blocks, offsets = window_rows(cache.layer(0).ring_table[slot], positions, spec.window, spec.block_size)
    return pool_rows(cache, blocks[head], offsets)


def assert_same_cache(got: PagedKVCache, want: PagedKVCache, slots: list[int]) -> None:
    """Block ids may differ (the kernel pops concurrently); everything a reader sees may not."""
    assert got.allocator.num_free == want.allocator.num_free, "pool usage differs"
    assert torch.equal(got.kept_len.cpu(), want.kept_len.cpu()), "kept lengths differ"
    assert torch.equal((got.ring_table.cpu() >= 0)[:, slots], (want.ring_table.cpu() >= 0)[:, slots]), \
        "window pages held differ"
    for s in slots:
        for h in range(got.spec.num_kv_heads):
            for region in (kept_pages, window):
                for a, b, what in zip(region(got, s, h), region(want, s, h), ("positions", "K", "V", "scores")):
                    assert torch.equal(a, b), f"{region.__name__} {what} of slot {s} head {h} differ"


def fill_pages(cache: PagedKVCache, kept: list[list[int] | None], g: torch.Generator) -> list[int]:
    """One sequence per entry of `kept` (tokens per kv head) with random kept pages and a full
    random window (None: nothing cached) -> the sequences' slots."""
    spec, lc, a = cache.spec, cache.layer(0), cache.allocator
    R = lc.ring_table.shape[-1]
    slots = []
    for lengths in kept:
        s = cache.add_sequence()
        if lengths is None:
            slots.append(s)
            continue
        for h, n in enumerate(lengths):
            nb = -(-n // spec.block_size)
            ids = pop_blocks(a.free_stack, a.num_free_t, nb + R)
            lc.block_table[s, h, :nb] = ids[:nb]
            lc.kept_len[s, h] = n
            lc.ring_table[s, h] = ids[nb:]
            for pool in (lc.k_pool, lc.v_pool):
                pool[ids.long()] = torch.randn(nb + R, spec.block_size, spec.head_dim, generator=g).to(pool)
        cache.ctx_len[s] = max(lengths) + spec.window
        slots.append(s)
    return slots


def attention_check(kept: list[list[int] | None], new: list[int], device: str, ops, dtype: torch.dtype,
                    g: torch.Generator) -> float:
    """Kernel (40-key splits) vs the fp32 reference on CPU copies -> max abs error (asserted)."""
    H, G, D, W = 2, 4, 128, 40  # W not a multiple of the page size: the last window page is partial
    cache = PagedKVCache(CacheSpec(1, H, D, W, 16, 256, len(new), 1024, dtype), device)
    slots = fill_pages(cache, kept, g)
    N = sum(new)
    q = torch.randn(N, H * G, D, generator=g).to(device, dtype)
    k_new, v_new = (torch.randn(N, H, D, generator=g).to(device, dtype) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    slot_t = torch.tensor(slots, dtype=torch.int32)
    ctx = torch.tensor([cache.ctx_len[s] for s in slots], dtype=torch.int32)
    lc = cache.layer(0)
    tensors = (q, k_new, v_new, lc.k_pool, lc.v_pool, lc.block_table, lc.kept_len, lc.ring_table)
    out = torch.full_like(q, float("nan"))
    # kernel_only: every row through the kernel as a TensorRT engine runs them (chunks and fresh
    # prompts through its packed launch in bf16), not PyTorch's attention, so the sanitizer sees
    # the kernel on every case.
    kw = dict(split_size=40, out=out, kernel_only=True) if ops is CUDA else {}
    result = ops.paged_attention(*tensors[:3], cu, slot_t, ctx, *tensors[3:], W, D**-0.5, **kw)
    f32 = [t.cpu().float() if t.is_floating_point() else t.cpu() for t in tensors]
    truth = REFERENCE.paged_attention(*f32[:3], cu, slot_t, ctx, *f32[3:], W, D**-0.5)
    assert not result.isnan().any(), "output not fully written"
    err = (result.cpu().float() - truth).abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert err <= tolerance, f"max abs error {err:.3g} > {tolerance}"
    return err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda: the kernels (dispatch.CUDA); cpu: the reference on both sides")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sanitize_kernels: no CUDA device (use --device cpu to check the script itself)")
    ops = CUDA if args.device == "cuda" else REFERENCE
    g = torch.Generator().manual_seed(0)
    failed = 0
    runs = [(name, dtype, lambda c=chunks, d=dtype: evict_check(c, args.device, ops, d, g))
            for name, chunks in EVICT_RUNS.items() for dtype in (torch.bfloat16,)]
    runs += [(name, dtype, lambda c=case, d=dtype: attention_check(*c, args.device, ops, d, g))
             for name, case in ATTENTION_RUNS.items() for dtype in (torch.bfloat16, torch.float32)]
    for name, dtype, run in runs:
        try:
            err = run()
            print(f"ok    {name} ({str(dtype).removeprefix('torch.')})" + (f": max abs error {err:.2e}" if err is not None else ""))
        except AssertionError as e:
            failed += 1
            print(f"FAIL  {name} ({str(dtype).removeprefix('torch.')}): {e}")
        if args.device == "cuda":
            torch.cuda.synchronize()
    print(f"sanitize_kernels: {len(runs) - failed} of {len(runs)} runs match the reference ({ops.name} on {args.device})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
