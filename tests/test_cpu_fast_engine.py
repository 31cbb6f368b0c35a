"""The default CPU ops (ops/cpu_fast.py, what every CPU run uses) give the reference ops' tokens,
kept positions and pool use through the whole engine: random families, page sizes, windows,
thresholds, chunked prefill, tight pools that preempt, decode-time eviction on and off, sampling.
The op-level tests compare single calls; this compares what a user gets. (An independent fuzz
of 1,880 such configurations and 800 op-level schedules found no difference in float32 beyond
one tie at a score equal to tau.)"""

from __future__ import annotations

import random

import pytest

from kvzap_trt.config import RunConfig
from kvzap_trt.runtime.engine import Engine, EvictionPolicy
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.runtime.sampler import SamplingParams
from tests.tiny_models import random_prompts


def random_case(seed: int) -> dict:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 5))]
    bs = rng.choice([1, 3, 4, 7, 16])
    window = rng.choice([0, 1, 5, 9, 16, 200])
    tight = rng.random() < 0.4
    return dict(
        family=rng.choice(["llama", "qwen3", "qwen2"]), surrogate=rng.choice(["random:mlp:3", "random:linear:0"]),
        tau=rng.choice([-0.2, 0.0, 0.1]), window=window, block_size=bs, lengths=lengths,
        max_new=rng.randint(0, 40 if tight else 20), chunk=rng.choice([None, None, 1, 5, 16]), compress_decoding=rng.random() < 0.8,
        temperature=rng.choice([0.0, 0.0, 1.2]), max_seqs=len(lengths) if tight else rng.randint(1, len(lengths)),
        # tight: 1.1 times the longest prompt's worst case, kept and window pages of 3 layers x 4
        # kv heads (the tiny models): every prompt is admitted, running sequences preempt each other
        num_blocks=None if not tight else int(1.1 * 3 * 4 * (-(-max(0, max(lengths) - window) // bs)
                                                             + -(-min(max(lengths), window) // bs))) + 12,
    )


def run(tiny_dirs, case: dict, choice: str, monkeypatch) -> tuple[list, int, int]:
    """(per request: tokens, finish reason, kv report), blocks free at the end, the pool's size."""
    monkeypatch.setenv("KVZAP_TRT_OPS", choice)
    cfg = RunConfig(model=str(tiny_dirs[case["family"]]), surrogate=case["surrogate"], threshold=case["tau"],
                    window=case["window"], block_size=case["block_size"]).validate()
    rt = Runtime.from_config(cfg)
    num_blocks = case["num_blocks"] or 3 * 4 * len(case["lengths"]) * (2 * 200 // case["block_size"] + 8)
    cache = rt.make_cache(max_seq_len=256, max_seqs=case["max_seqs"], num_blocks=num_blocks)
    engine = Engine(rt.loaded.model, cache, EvictionPolicy(rt.surrogate, case["tau"], case["compress_decoding"]), 256,
                    record_positions=True, max_num_tokens=case["chunk"])
    assert engine.ops.name == ("reference" if choice == "reference" else "cpu")
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=case["max_new"], temperature=case["temperature"], seed=i))
            for i, p in enumerate(random_prompts(case["lengths"], seed=len(case["lengths"])))]
    engine.run()
    return [(r.output_ids, r.finish_reason, r.kv) for r in reqs], cache.allocator.num_free, num_blocks


@pytest.mark.parametrize("seed", range(20))
def test_default_cpu_ops_equal_the_reference_through_the_engine(tiny_dirs, seed, monkeypatch):
    case = random_case(seed)
    fast, fast_free, pool = run(tiny_dirs, case, "auto", monkeypatch)
    ref, ref_free, _ = run(tiny_dirs, case, "reference", monkeypatch)
    assert fast_free == ref_free == pool  # every block back
    for (tokens, reason, kv), (want_tokens, want_reason, want_kv) in zip(fast, ref):
        assert (tokens, reason) == (want_tokens, want_reason), case
        assert kv == want_kv, case  # kept positions per (layer, head), counts, bytes, compression
    if max(case["lengths"]) > case["window"] + 10 and case["tau"] >= 0:
        assert any(kv["compression_ratio"] > 0 for _, _, kv in ref), case  # the case really evicts
