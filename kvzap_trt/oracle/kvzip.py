"""The KVzip+ oracle (arXiv 2601.07891 Eq. 2-3; kvpress `KVzipPress(kvzip_plus_normalization=True)`).

How much does the model need KV pair j to reproduce the context? Prefill the context, then feed
"Repeat the previous context exactly." (through the chat template) followed by the context
again, chunk by chunk. For each layer and kv head, the score of context position j is

    max over repeated queries t and the GQA group g of  a[t, j] * ||W_O v_j|| / ||h_t||

where a[t, :] is the softmax of q_t over the attention sinks, the chunk being repeated and the
repeat tokens (causally), h_t the hidden state entering attention and W_O v_j what position j
writes into the residual stream through head (h, g). Positions before the chat prefix's end keep
score 0, as in kvpress. KVzap's surrogates are trained on log(score).

This runs our compact forward (the same one the runtime uses) with a recording `attend`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvzap_trt.models.transformer import Transformer
from kvzap_trt.surrogate import Surrogate

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


def chat_frame_texts(tokenizer) -> tuple[str, str]:
    """(the chat template's text before a user turn's content, its text after it up to the
    assistant's answer), found around a sentinel content, as kvpress finds them."""
    if tokenizer.chat_template is None:
        return "", "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    context, suffix_text = text.split(separator)
    return context.split(dummy)[0], suffix_text


def chat_frame(tokenizer) -> tuple[int, list[int]]:
    """(tokens of the chat prefix before the context, ids closing the user turn), as kvpress builds them."""
    prefix_text, suffix_text = chat_frame_texts(tokenizer)
    return len(tokenizer.encode(prefix_text, add_special_tokens=False)), tokenizer.encode(suffix_text, add_special_tokens=False)


def context_ids(tokenizer, text: str) -> tuple[list[int], int]:
    """The text as a user turn's content: (chat prefix ids + text ids, length of the prefix)."""
    prefix = tokenizer.encode(chat_frame_texts(tokenizer)[0], add_special_tokens=False)
    return prefix + tokenizer.encode(text, add_special_tokens=False), len(prefix)


def causal_attend_recording(store: dict[int, tuple[torch.Tensor, torch.Tensor]],
                            hidden: dict[int, torch.Tensor] | None = None):
    """Plain causal attention over one sequence that keeps each layer's K, V: [T, Hkv, D]
    (and, given `hidden`, the hidden state entering attention: [T, d])."""

    def attend(layer, h_norm, q, k, v):
        store[layer] = (k, v)
        if hidden is not None:
            hidden[layer] = h_norm
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             is_causal=True, enable_gqa=True)
        return out[0].transpose(0, 1)

    return attend


def wo_v_norms(model: Transformer, layer: int, values: torch.Tensor) -> torch.Tensor:
    """KVzip+'s ||W_O v|| of each value through each query head of its group: values [K, Hkv, D]
    -> [Hkv, G, K] float32 (query head h * G + g reads kv head h)."""
    cfg = model.cfg
    wo = model.layers[layer].self_attn.o_proj.weight.float().view(cfg.hidden_size, cfg.num_kv_heads, cfg.group_size,
                                                                   cfg.head_dim)
    return torch.einsum("jhgi,khi->hgkj", wo, values.float()).norm(dim=-1)


@torch.inference_mode()
def kvzip_plus_scores(model: Transformer, tokenizer, context_ids: list[int], chunk_size: int = 2048,
                      n_sink: int = 4, prev_postfix_size: int = 8,
                      hidden: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """context_ids: the prompt as the model saw it (chat prefix included) -> scores [L, Hkv, T] float32.

    hidden: if given, filled with each layer's hidden state entering attention, [T, d] (the
    surrogate's input), from the same prefill pass.
    """
    cfg = model.cfg
    T, Hkv, G, D = len(context_ids), cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    prefix_len, suffix_ids = chat_frame(tokenizer)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    model(torch.tensor(context_ids), torch.arange(T), causal_attend_recording(cache, hidden),
          logits_at=torch.tensor([T - 1]))

    ctx = context_ids[prefix_len:]
    chunks = [ctx[i : i + chunk_size] for i in range(0, len(ctx), chunk_size)] or [[]]
    scores = torch.zeros(cfg.num_layers, Hkv, T)
    start = prefix_len
    for n, chunk in enumerate(chunks):
        if n == 0:
            q_ids = tokenizer.encode(FIRST_PROMPT, add_special_tokens=False)
        else:
            q_ids = tokenizer.encode(NEXT_PROMPT, add_special_tokens=False) + chunks[n - 1][-prev_postfix_size:]
        repeat = q_ids + suffix_ids + chunk
        end, Q = start + len(chunk), len(repeat)
        sink = min(n_sink, start)

        def attend(layer, h_norm, q, k, v, start=start, end=end, sink=sink, Q=Q):
            ck, cv = cache[layer]
            keys, values = torch.cat([ck, k]), torch.cat([cv, v])  # [T + Q, Hkv, D]
            # The model's own attention: every cached token, the repeat tokens causally.
            mask = torch.ones(Q, T + Q, dtype=torch.bool).tril(T)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                                 values.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
            # KVzip+: softmax over sinks + the chunk being repeated + the repeat tokens (causal).
            idx = torch.cat([torch.arange(sink), torch.arange(start, end), torch.arange(T, T + Q)])
            ks, vs = keys[idx].float(), values[idx].float()  # [K, Hkv, D]
            qh = q.float().view(Q, Hkv, G, D)
            logits = torch.einsum("thgd,khd->hgtk", qh, ks) / math.sqrt(D)
            logits[..., -Q:] += torch.full((Q, Q), torch.finfo(torch.float32).min).triu(1)
            a = logits.softmax(-1)  # [Hkv, G, Q, K]
            a = a / h_norm.float().norm(dim=-1)[None, None, :, None]
            a = a * wo_v_norms(model, layer, vs)[:, :, None, :]  # [Hkv, G, K]
            scores[layer, :, start:end] = a[..., sink : sink + (end - start)].amax(dim=(1, 2))
            return out[0].transpose(0, 1)

        model(torch.tensor(repeat), torch.arange(T, T + Q), attend, logits_at=torch.tensor([Q - 1]))
        start = end
    return scores


@torch.inference_mode()
def surrogate_scores(model: Transformer, surrogate: Surrogate, ids: list[int]) -> torch.Tensor:
    """The surrogate's log-scores of a prompt: [L, Hkv, T] (what the cache compares with tau)."""
    out = torch.empty(model.cfg.num_layers, model.cfg.num_kv_heads, len(ids))
    plain = causal_attend_recording({})

    def attend(layer, h_norm, q, k, v):
        out[layer] = surrogate.score(layer, h_norm).T
        return plain(layer, h_norm, q, k, v)

    model(torch.tensor(ids), torch.arange(len(ids)), attend, logits_at=torch.tensor([len(ids) - 1]))
    return out
