"""paged_attention (reference) against dense attention over the same kept set.

The cache is filled through evict_append with random data; the dense side is built from the
naive model's kept positions and the original K/V, so both see identical values.
"""

from __future__ import annotations

import pytest
import torch

from kvzap_trt.ops.dispatch import REFERENCE
from tests.cache_sim import chunk_args, make_cache, naive_kept, random_seq, write_chunk


def dense_reference(q, s, new, window, tau, G):
    """q: [T, Hq, D] for the `new` tokens after s.written -> [T, Hq, D] in float64."""
    T, Hq, D = q.shape
    out = torch.empty(T, Hq, D, dtype=torch.float64)
    kept = naive_kept(s.scores, s.written, window, tau)
    for h, positions in enumerate(kept):
        for t in range(T):
            keys = positions + list(range(s.written, s.written + t + 1))
            k, v = s.k[keys, h].double(), s.v[keys, h].double()
            qh = q[t, h * G : (h + 1) * G].double()  # [G, D]
            out[t, h * G : (h + 1) * G] = torch.softmax(qh @ k.T / D**0.5, -1) @ v
    return out


# window, block size, per sequence: (tokens already cached, new tokens now)
CASES = [
    (4, 16, [(0, 33)]),                       # plain prefill
    (4, 1, [(577, 1)]),                       # decode over a long head, page size 1
    (8, 64, [(577, 1), (17, 1), (1, 1)]),     # batched decode, uneven lengths
    (32, 16, [(17, 1)]),                      # context shorter than the window
    (8, 16, [(100, 24)]),                     # chunked prefill over a compressed cache
    (0, 16, [(40, 1)]),                       # no window
]


@pytest.mark.parametrize("window,block_size,seqs_spec", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_dense(window, block_size, seqs_spec, dtype):
    tau, H, G, D = 0.2, 2, 3, 16
    cache = make_cache(H=H, D=D, W=window, bs=block_size, dtype=dtype, seed=block_size)
    g = torch.Generator().manual_seed(window)
    seqs = [random_seq(cache, c + n, g, dead_head=0 if i == 0 else None) for i, (c, n) in enumerate(seqs_spec)]
    if any(c for c, _ in seqs_spec):
        write_chunk(cache, seqs, [c for c, _ in seqs_spec], tau)
    new = [n for _, n in seqs_spec]
    k, v, _, cu, slots, ctx = chunk_args(cache, seqs, new)
    q = torch.randn(sum(new), H * G, D, generator=g).to(dtype)
    lc = cache.layer(0)
    out = REFERENCE.paged_attention(q, k, v, cu, slots, ctx, lc.k_pool, lc.v_pool, lc.block_table, lc.kept_len,
                                    lc.ring_k, lc.ring_v, D**-0.5)
    want = torch.cat([dense_reference(q[cu[i] : cu[i + 1]], s, n, window, tau, G) for i, (s, n) in enumerate(zip(seqs, new))])
    # The reference computes in fp32 and rounds once to the output dtype.
    atol = 1e-5 if dtype == torch.float32 else 2 * 2**-8
    assert (out.double() - want).abs().max() <= atol


def test_empty_batch():
    cache = make_cache()
    lc = cache.layer(0)
    empty = torch.empty(0, 2, 8)
    out = REFERENCE.paged_attention(empty.repeat(1, 2, 1), empty, empty, torch.zeros(1, dtype=torch.int32),
                                    torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32),
                                    lc.k_pool, lc.v_pool, lc.block_table, lc.kept_len, lc.ring_k, lc.ring_v, 0.35)
    assert out.shape == (0, 4, 8)
