"""A decode step evicts every layer in one op call after the forward (what makes it one kernel
launch on a GPU); a step that feeds a prompt evicts layer by layer. That both leave the cache
kvpress would is tests/test_kvpress_fidelity.py's job (its decode steps take the one call)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvzap_trt.runtime.sampler import SamplingParams
from tests.test_device_reads import tiny_engine


def counting(engine) -> list[int]:
    """Wrap engine.ops.evict_append; returns the list of each call's slot count (B per layer or L x B)."""
    calls: list[int] = []
    inner = engine.ops.evict_append

    def evict_append(*args, **kwargs):
        calls.append(len(args[4]))  # seq_slots
        return inner(*args, **kwargs)

    engine.ops = SimpleNamespace(**{**vars(engine.ops), "evict_append": evict_append})
    return calls


def test_decode_steps_evict_all_layers_in_one_call():
    layers, batch = 5, 3
    engine = tiny_engine(layers, batch)
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        engine.submit(torch.randint(0, 160, (15 + 4 * i,), generator=g).tolist(), SamplingParams(max_new_tokens=6))
    calls = counting(engine)
    engine.step()  # prefill: one call per layer
    assert calls == [batch] * layers
    calls.clear()
    engine.step()  # decode: one call over all layers, their slots folded
    assert calls == [layers * batch]


def test_attention_gets_the_kept_bound_the_scheduler_read():
    """Every attention call of a step gets, in its plan, max_kept: no head of the step's sequences holds more kept
    tokens (the kernel sizes its splits from it). In a decode step (no layer evicts before the
    forward ends) some head of some layer holds exactly that many. Once eviction has run, the
    bound is below the uncompressed context the kernel would size from otherwise."""
    engine = tiny_engine(3, 3)
    g = torch.Generator().manual_seed(1)
    for n in (40, 25, 60):
        engine.submit(torch.randint(0, 160, (n,), generator=g).tolist(), SamplingParams(max_new_tokens=12))
    seen: list[tuple] = []  # (max_kept, this layer's max kept, all layers' max kept, decode step?, longest context)
    inner = engine.ops.paged_attention

    def paged_attention(*args, **kw):
        cu, slots, ctx, kept_len = args[3], args[4].long(), args[5], args[9]
        decode = bool(((cu[1:] - cu[:-1]) == 1).all())
        seen.append((kw["plan"].max_kept, int(kept_len[slots].max()), int(engine.cache.kept_len[:, slots].max()),
                     decode, int(ctx.max())))
        return inner(*args, **kw)

    engine.ops = SimpleNamespace(**{**vars(engine.ops), "paged_attention": paged_attention})
    engine.run()
    assert seen and all(bound is not None and bound >= layer_max for bound, layer_max, *_ in seen)
    decode_calls = [(bound, all_max) for bound, _, all_max, decode, _ in seen if decode]
    assert decode_calls and all(bound == all_max for bound, all_max in decode_calls)
    assert any(bound + engine.cache.spec.window < ctx for bound, *_, ctx in seen)  # tighter than the context
