#!/usr/bin/env python
"""End to end: decode throughput and the largest batch at long context, KVzap vs dense, in the
same KV memory, with the PyTorch executor (and the CUDA kernels on a GPU), in one run.

A Qwen3-8B-shaped model with random weights (36 layers, hidden 4096, 32 query / 8 kv heads,
head_dim 128, bf16) and a random linear surrogate whose threshold is set from its own scores on
a prompt to evict `--evict` of the tokens (default 0.72, the paper's Qwen3-8B figure). The block
pool holds `--dense-seqs` requests of `--context` tokens uncompressed; `--requests` arrive at
once; admission is by free blocks. For dense and KVzap it records the peak number of sequences
decoding together and decode tokens/s over the steps without a prefill in them.
Writes bench/results/e2e-<device>-<date>.json.

    .venv/bin/python scripts/bench_e2e.py                      # on a GPU: the issue's setting
    .venv/bin/python scripts/bench_e2e.py --device cpu --layers 2 --hidden 256 --heads 8 \\
        --kv-heads 2 --head-dim 32 --context 600 --window 16 --dense-seqs 2 --requests 6   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvzap_trt import bench
from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.models.config import ModelConfig
from kvzap_trt.models.transformer import Transformer, rope_inv_freq
from kvzap_trt.ops.dispatch import ops
from kvzap_trt.runtime.engine import Engine, EvictionPolicy
from kvzap_trt.runtime.sampler import SamplingParams
from kvzap_trt.surrogate import random_surrogate


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: str) -> Transformer:
    """Our forward with N(0, 0.02) weights, built in place on the device (no fp32 copy)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)  # meta -> dtype first: no fp32 copy on the device
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


@torch.inference_mode()
def threshold_for(model: Transformer, surrogate, ids: list[int], evict: float, device: str) -> float:
    """tau such that `evict` of the surrogate's scores on `ids` fall below it (dense causal attention)."""
    scores = []

    def attend(layer, h_norm, q, k, v):
        scores.append(surrogate.score(layer, h_norm).float().flatten().cpu())
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)

    dev = torch.device(device)
    model(torch.tensor(ids, device=dev), torch.arange(len(ids), device=dev), attend,
          logits_at=torch.tensor([len(ids) - 1], device=dev))
    s = torch.cat(scores)
    s = s[torch.randperm(s.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 22]]
    return float(torch.quantile(s, evict))


def run(model, spec: CacheSpec, device: str, policy: EvictionPolicy, prompts, new_tokens: int, name: str) -> dict:
    cache = PagedKVCache(spec, device)
    engine = Engine(model, cache, policy, spec.max_seq_len)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=new_tokens)) for p in prompts]
    peak, decode_tokens, decode_seconds, decode_steps = 0, 0, 0.0, 0
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with tqdm(total=len(reqs), desc=name, file=sys.stderr) as bar:
        while engine.has_work():
            sync()
            t0 = time.perf_counter()
            done = engine.step()
            sync()
            seconds = time.perf_counter() - t0
            batch = engine.running + done
            peak = max(peak, len(batch))
            if batch and all(len(r.output_ids) >= 2 for r in batch):  # nobody prefilled in this step
                decode_tokens, decode_seconds, decode_steps = decode_tokens + len(batch), decode_seconds + seconds, decode_steps + 1
            bar.update(len(done))
    return {"config": name, "peak_concurrent_seqs": peak, "decode_steps": decode_steps,
            "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else None,
            "compression_ratio": sum(r.kv["compression_ratio"] for r in reqs) / len(reqs),
            "preemptions": sum(r.preemptions for r in reqs),
            "all_finished": all(r.finish_reason == "length" for r in reqs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=None, help="default 3 x hidden")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--context", type=int, default=32768, help="prompt + generated tokens per request")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dense-seqs", type=int, default=4, help="KV pool = this many requests held uncompressed")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--evict", type=float, default=0.72, help="fraction of the surrogate's scores below tau")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with small shapes) for a smoke run")
    machine = bench.machine_info(args.device)

    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig(family="qwen3", vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.intermediate or 3 * args.hidden, num_layers=args.layers,
                      num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim, rms_norm_eps=1e-6,
                      rope_theta=1e6, max_position_embeddings=args.context, qk_norm=True)
    model = random_model(cfg, dtype, args.device)
    surrogate = random_surrogate("linear", args.layers, args.hidden, args.kv_heads).to(args.device)
    g = torch.Generator().manual_seed(1)
    prompt_len = args.context - args.new_tokens
    prompts = [torch.randint(0, args.vocab, (prompt_len,), generator=g).tolist() for _ in range(args.requests)]
    tau = threshold_for(model, surrogate, prompts[0][: min(prompt_len, 4096)], args.evict, args.device)

    # A dense request at full context holds its kept pages and its window pages: --dense-seqs of them fit.
    shape = (args.layers, args.kv_heads, args.head_dim, args.window, args.block_size)
    per_request = CacheSpec(*shape, 1, 1, args.context, dtype).prefill_blocks(args.context)
    spec = CacheSpec(*shape, args.dense_seqs * per_request, args.requests, args.context, dtype)
    rows = [run(model, spec, args.device, EvictionPolicy(None, tau, True), prompts, args.new_tokens, "dense"),
            run(model, spec, args.device, EvictionPolicy(surrogate, tau, True), prompts, args.new_tokens, "kvzap")]
    dense, kvzap = rows
    ratio = {
        "peak_seqs": kvzap["peak_concurrent_seqs"] / dense["peak_concurrent_seqs"],
        "decode_tokens_per_s": (kvzap["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
                                if kvzap["decode_tokens_per_s"] and dense["decode_tokens_per_s"] else None),
    }
    device = machine["device"]
    print(f"\n{device}; ops: {ops(args.device).name}; pool {spec.num_blocks} blocks "
          f"= {spec.num_blocks * spec.block_bytes / 2**30:.2f} GiB ({args.dense_seqs} x {args.context} tokens dense); "
          f"tau {tau:+.3f}")
    print(f"{'config':>7} {'compression':>11} {'peak seqs':>9} {'decode tok/s':>12} {'preempt':>7}")
    for r in rows:
        tps = r["decode_tokens_per_s"]
        print(f"{r['config']:>7} {r['compression_ratio']:>11.1%} {r['peak_concurrent_seqs']:>9} "
              f"{(f'{tps:.1f}' if tps else '-'):>12} {r['preemptions']:>7}")
    print(f"kvzap / dense: peak sequences {ratio['peak_seqs']:.2f}x, decode tokens/s "
          + (f"{ratio['decode_tokens_per_s']:.2f}x" if ratio["decode_tokens_per_s"] else "-"))

    result = bench.result("e2e", "bench_e2e.py", argv, machine, device=device, ops=ops(args.device).name,
                          model={k: v for k, v in vars(cfg).items() if k != "eos_token_ids"}, dtype=args.dtype,
                          threshold=tau, target_evicted=args.evict, kv_pool_blocks=spec.num_blocks,
                          kv_pool_bytes=spec.num_blocks * spec.block_bytes, rows=rows, kvzap_over_dense=ratio)
    path = bench.write_result(result, args.out, f"e2e-{bench.device_slug(device)}")
    print(f"wrote {path}")
    return 0 if all(r["all_finished"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
