"""Decision fidelity: our cache keeps exactly what kvpress DMSPress(KVzapPress) keeps, and greedy
tokens are identical (fp32, CPU, tiny random Qwen3 and Llama models, random surrogates)."""

from __future__ import annotations

import pytest
import torch

from kvzap_trt.config import RunConfig
from kvzap_trt.models.config import ModelConfig
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.surrogate import random_surrogate, save_surrogate
from tests.kvpress_reference import kvpress_generate

# family, surrogate kind, window, prompt length, new tokens, threshold, decoding
CASES = [
    ("qwen3", "linear", 16, 70, 12, 0.0, True),   # window < prompt: prefill and decode eviction
    ("qwen3", "mlp", 16, 70, 12, 0.0, True),
    ("llama", "linear", 16, 70, 12, 0.0, True),
    ("llama", "mlp", 8, 45, 16, 0.2, True),
    ("llama", "linear", 64, 30, 50, 0.0, True),   # window > prompt: first evictions while decoding
    ("qwen3", "mlp", 64, 30, 50, -0.3, True),
    ("qwen3", "linear", 16, 70, 12, 0.0, False),  # kvpress decoding=False
    ("llama", "mlp", 1, 20, 6, 0.0, True),        # a one-token window
    ("llama", "linear", 16, 300, 4, 0.0, True),   # positions past Llama-3 RoPE's original length
]


@pytest.mark.parametrize("family,kind,window,prompt_len,new,tau,decoding", CASES)
def test_same_decisions_and_tokens_as_kvpress(tiny_dirs, tmp_path, family, kind, window, prompt_len, new, tau, decoding):
    model_dir = tiny_dirs[family]
    mcfg = ModelConfig.from_dir(model_dir)
    sur_dir = tmp_path / "surrogate"
    save_surrogate(random_surrogate(kind, mcfg.num_layers, mcfg.hidden_size, mcfg.num_kv_heads, seed=prompt_len), sur_dir)
    prompt = torch.randint(0, mcfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(window)).tolist()

    ref_tokens, ref_kept, ref_ratio = kvpress_generate(model_dir, sur_dir, prompt, new, tau, window, decoding, kind)

    cfg = RunConfig(model=str(model_dir), surrogate=str(sur_dir), threshold=tau, window=window,
                    compress_decoding=decoding, max_new_tokens=new, block_size=4).validate()
    rt = Runtime.from_config(cfg)
    ours = rt.generate([prompt], rt.sampling(stop_token_ids=()), positions=True)[0]  # kvpress ran without EOS

    assert ours.token_ids == ref_tokens
    assert ours.kv["positions"] == ref_kept
    assert ours.kv["kept"] == [[len(h) for h in layer] for layer in ref_kept]
    tokens = prompt_len + new - 1
    evicted = [sum(tokens - len(h) for h in layer) / (len(layer) * tokens) for layer in ref_kept]
    assert ours.kv["compression_ratio"] == pytest.approx(sum(evicted) / len(evicted), abs=1e-12)
    if decoding:  # with decoding=False kvpress stops updating its ratio after prefill
        assert ours.kv["compression_ratio"] == pytest.approx(ref_ratio, abs=1e-12)
    # The case must exercise eviction (and keep something): otherwise it proves little.
    assert 0 < ours.kv["compression_ratio"] < 1
