"""A compact Llama / Qwen3 forward over packed variable-length batches.

Module names follow Hugging Face's (`layers.{i}.self_attn.q_proj`, ...) so that a HF state dict
loads with its `model.` prefix stripped. The attention itself is not here: every layer hands its
normalised hidden state and its q/k/v (after RoPE) to an `attend` callback, which owns the KV
cache, the KVzap scoring and eviction. That keeps this file a plain model a reader can hold in
their head, and lets one model serve the paged runtime and any other cache.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kvzap_trt.models.config import ModelConfig


class Attend(Protocol):
    def __call__(
        self, layer: int, h_norm: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """h_norm: [N, d] (input of self_attn)  q: [N, Hq, D]  k, v: [N, Hkv, D]  -> [N, Hq, D]"""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[D/2] inverse frequencies, with Llama-3 scaling when the config asks for it."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    if cfg.rope_llama3 is None:
        return inv_freq
    r = cfg.rope_llama3
    factor, low, high, old_len = r["factor"], r["low_freq_factor"], r["high_freq_factor"], r["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * D, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.cfg = cfg

    def forward(self, layer: int, h_norm, cos, sin, attend: Attend) -> torch.Tensor:
        N, c = h_norm.shape[0], self.cfg
        q = self.q_proj(h_norm).view(N, c.num_heads, c.head_dim)  # [N, Hq, D]
        k = self.k_proj(h_norm).view(N, c.num_kv_heads, c.head_dim)  # [N, Hkv, D]
        v = self.v_proj(h_norm).view(N, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = attend(layer, h_norm, q, k, v)  # [N, Hq, D]
        return self.o_proj(out.reshape(N, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend, logits_at: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens, positions: [N] packed over sequences.  logits_at: [B] row indices (default: all).

        Returns logits [B or N, vocab] in float32.
        """
        h = self.embed_tokens(tokens)  # [N, d]
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, D]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        for i, layer in enumerate(self.layers):
            h = h + layer.self_attn(i, layer.input_layernorm(h), cos, sin, attend)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if logits_at is not None:
            h = h[logits_at]
        return self.lm_head(self.norm(h)).float()
