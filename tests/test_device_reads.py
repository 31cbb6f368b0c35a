"""Device reads per engine step: a fixed few, whatever the batch size and the layer count."""

from __future__ import annotations

import math

import pytest
import torch

from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.device_reads import count_reads, to_host
from kvzap_trt.models.config import ModelConfig
from kvzap_trt.models.transformer import Transformer
from kvzap_trt.runtime.engine import Engine, EvictionPolicy
from kvzap_trt.runtime.sampler import SamplingParams
from kvzap_trt.surrogate import random_surrogate

# A decode step reads the running slots' kept lengths, the free block count and the greedy
# token ids; sampling rows (temperature > 0) add one read of their logits.
DECODE_READS = 3


def tiny_engine(layers: int, max_seqs: int, surrogate: bool = True, compress_decoding: bool = True) -> Engine:
    cfg = ModelConfig(family="llama", vocab_size=160, hidden_size=64, intermediate_size=128, num_layers=layers,
                      num_heads=8, num_kv_heads=4, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=512)
    torch.manual_seed(layers)
    model = Transformer(cfg).eval()
    spec = CacheSpec(layers, 4, 16, window=8, block_size=4, num_blocks=4000, max_seqs=max_seqs, max_seq_len=512)
    scorer = random_surrogate("mlp", layers, 64, 4, seed=1) if surrogate else None
    return Engine(model, PagedKVCache(spec), EvictionPolicy(scorer, 0.0, compress_decoding), max_seq_len=512)


def decode_reads(layers: int, batch: int, **policy) -> int:
    """Reads of the second step (all `batch` requests decoding, none finishing)."""
    engine = tiny_engine(layers, batch, **policy)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(0, 160, (20 + 7 * i,), generator=g).tolist()  # longer than the window
        engine.submit(prompt, SamplingParams(max_new_tokens=10))
    engine.step()  # prefill
    with count_reads() as reads:
        finished = engine.step()
    assert not finished and len(engine.running) == batch
    return reads.n


@pytest.mark.parametrize("policy", [{}, {"surrogate": False}, {"compress_decoding": False}])
def test_decode_step_reads_do_not_grow_with_batch_or_layers(policy):
    counts = {(layers, batch): decode_reads(layers, batch, **policy) for layers in (2, 6) for batch in (1, 8)}
    assert set(counts.values()) == {DECODE_READS}, counts


def test_no_read_per_layer():
    assert decode_reads(6, 2) == decode_reads(2, 2)


def test_no_read_per_sequence():
    assert decode_reads(2, 8) == decode_reads(2, 1)


def test_sampling_rows_add_one_read():
    engine = tiny_engine(3, 6)
    for i in range(6):
        engine.submit(list(range(10 + i)), SamplingParams(max_new_tokens=5, temperature=1.0 * (i % 2), seed=i))
    engine.step()
    with count_reads() as reads:
        engine.step()
    assert reads.n == DECODE_READS + 1


def test_blocks_needed_many_is_the_per_head_worst_case():
    spec = CacheSpec(3, 2, 8, window=5, block_size=4, num_blocks=100, max_seqs=6, max_seq_len=64)
    cache = PagedKVCache(spec)
    g = torch.Generator().manual_seed(0)
    cache.kept_len.copy_(torch.randint(0, 40, cache.kept_len.shape, generator=g, dtype=torch.int32))
    cache.kept_len[0, :, 0] = 8  # a full last block: one leaver takes a new block
    cache.ctx_len = [0, 3, 5, 6, 30, 9]
    slots = [5, 0, 2, 4, 1, 3]
    wants = {}
    for new in (1, 2, 7):
        want = wants[new] = []
        for s in slots:
            c = cache.ctx_len[s]
            leaving = max(0, c + new - 5) - max(0, c - 5)
            heads = cache.kept_len[:, s].flatten().tolist()
            # A head takes a block for each block boundary its kept length crosses, and one for
            # each window page (4 slots of the 5-token window) its new tokens reach first.
            window = math.ceil(min(c + new, 5) / 4) - math.ceil(min(c, 5) / 4)
            want.append(sum(math.ceil((k + leaving) / 4) - math.ceil(k / 4) + window for k in heads))
        with count_reads() as reads:
            got = cache.blocks_needed_many(slots, new)
        assert got == want and reads.n == 1
        assert [cache.blocks_needed(s, new) for s in slots] == want
    # For one token: slot 0 (empty) opens its first window page; slot 1 (3 tokens of a 5-token
    # window) fills its first page and needs nothing; the others have leavers.
    assert wants[1][4] == 0 and wants[1][1] == 6 and all(wants[1][i] > 0 for i in (0, 2, 3, 5))


def test_to_host_copies_and_counts():
    t = torch.arange(4)
    with count_reads() as outer:
        with count_reads() as inner:
            host = to_host(t)
        to_host(t)
    host[0] = 9
    assert t[0] == 0 and (inner.n, outer.n) == (1, 2)
