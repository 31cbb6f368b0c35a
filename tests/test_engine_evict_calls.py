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

    def evict_append(*args):
        calls.append(len(args[4]))  # seq_slots
        return inner(*args)

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
