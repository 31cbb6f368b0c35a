"""Our compact forward reproduces transformers' logits (fp32) on tiny Llama / Qwen3 and SmolLM2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvzap_trt.models.loading import load_model


def dense_causal_attend(layer, h_norm, q, k, v):
    """Plain causal attention over one packed sequence: the model's contract, no cache."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, enable_gqa=True
    )
    return out[0].transpose(0, 1)


def hf_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def assert_same_logits(model_dir, ids):
    ours = load_model(model_dir).model
    got = ours(torch.tensor(ids), torch.arange(len(ids)), dense_causal_attend)
    want = hf_logits(model_dir, ids)
    rel = (got - want).norm() / want.norm()
    assert rel <= 1e-4, f"relative logits error {rel:.2e}"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("length", [1, 17, 300])
def test_tiny_logits_match_transformers(tiny_dirs, family, length):
    ids = torch.randint(0, 160, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    assert_same_logits(tiny_dirs[family], ids)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_dir):
    ids = torch.randint(0, 49152, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    assert_same_logits(smollm2_dir, ids)
