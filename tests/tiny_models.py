"""Tiny random-weight Hugging Face models, built locally (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=1024)


def build_tiny(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random `llama` (Llama-3 RoPE scaling), `qwen3`, `qwen2` (q/k/v biases) or `mistral`
    (a sliding window: pass sliding_window=) model to `out`; returns `out`."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = LlamaConfig(rope_parameters=rope, tie_word_embeddings=False, **kw)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen3":
        cfg = Qwen3Config(tie_word_embeddings=True, **kw)
        model = Qwen3ForCausalLM(cfg)
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **kw))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(tie_word_embeddings=False, **kw))
    else:
        raise ValueError(family)
    # Random init leaves norm gains at 1 and biases at 0; perturb them so the tests see them applied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.eval().save_pretrained(out)
    return out


def random_prompts(lengths, seed: int = 0, vocab: int = TINY["vocab_size"]) -> list[list[int]]:
    """Prompts of the given lengths, token ids drawn uniformly from the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
