"""KVzip+ scores as NVIDIA's training collector computes them (kvpress `kvzap/data.py`), the
targets its released surrogates were fit to; oracle/kvzip.py is kvpress's KVzipPress instead.

One pass over the chat rendering of

    user: TEXT + "\\n\\nRepeat the previous context exactly."    assistant: TEXT

with the model's own causal attention. A KV pair i of the first TEXT scores

    max over the repeated TEXT's queries t and the heads g of its kv group of
        softmax_t(q_t . k / sqrt(D))[i] / ||h_t|| * ||W_O,g v_i||

where the softmax runs over every key up to t (KVzipPress: over sinks, one chunk and the repeat
tokens only, and the max also over the instruction's tokens), h_t the hidden state entering
attention. Measured on SmolLM2 (scripts/compare_oracles.py): the two keep 94-98% of the same
entries at 50-75% compression, their log-scores correlate at 0.88-0.998 per layer, and
KVzipPress's sit 0.05-0.13 higher, so a tau fit under one is not the other's.

Differences from kvzap/data.py that remain: the pieces are tokenised apart (prefix, text,
instruction and turn change, text, end) where data.py tokenises the whole rendering (a token may
merge across a piece's edge there); no BOS is added (data.py's tokenizer call adds a second one
where the template already has it); and the text is used as given, where data.py strips it (a
text cut at a token boundary may end in a space or newline before the instruction).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvzap_trt.errors import KvzapError
from kvzap_trt.models.transformer import Transformer
from kvzap_trt.oracle.kvzip import chat_frame_texts, wo_v_norms

REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."
QUERY_BLOCK = 512  # repeat queries whose attention rows are materialised at once


def repeat_frame(tokenizer) -> tuple[str, str, str]:
    """(before the text, between the text and its repeat, after the repeat) of the rendering."""
    if tokenizer.chat_template is None:
        raise KvzapError("the kvzap-data oracle needs a chat template (it repeats the text as the assistant's turn)")
    first, second = "FIRST-kvzap-sentinel", "SECOND-kvzap-sentinel"
    text = tokenizer.apply_chat_template([{"role": "user", "content": first + REPEAT_INSTRUCTION},
                                          {"role": "assistant", "content": second}], tokenize=False)
    before, rest = text.split(first)
    between, after = rest.split(second)
    return before, between, after


@torch.inference_mode()
def repeat_once_scores(model: Transformer, tokenizer, context_ids: list[int],
                       hidden: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """context_ids: chat prefix + text ids (oracle.kvzip.context_ids) -> scores [L, Hkv, T] float32,
    zero on the prefix (the same shape and convention as kvzip_plus_scores).

    hidden: if given, filled with each layer's hidden state entering attention over context_ids,
    [T, d] (the surrogate's input; the same values a forward over context_ids alone gives, as
    attention is causal).
    """
    cfg = model.cfg
    Hkv, G, D = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    before, between, after = repeat_frame(tokenizer)
    prefix = tokenizer.encode(before, add_special_tokens=False)
    if context_ids[: len(prefix)] != prefix or before != chat_frame_texts(tokenizer)[0]:
        raise KvzapError("the chat template frames a user turn differently when an assistant turn follows")
    text, turn = list(context_ids[len(prefix):]), tokenizer.encode(between, add_special_tokens=False)
    s, e = len(prefix), len(context_ids)  # the text
    rs = e + len(turn)  # its repeat: [rs, rs + len(text))
    ids = context_ids + turn + text + tokenizer.encode(after, add_special_tokens=False)
    if len(ids) > cfg.max_position_embeddings:
        raise KvzapError(f"the text and its repeat take {len(ids)} tokens, past the model's context of "
                         f"{cfg.max_position_embeddings}")
    scores = torch.zeros(cfg.num_layers, Hkv, e)

    def attend(layer, h_norm, q, k, v):
        if hidden is not None:
            hidden[layer] = h_norm[:e]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             is_causal=True, enable_gqa=True)
        wov = wo_v_norms(model, layer, v[s:e])  # [Hkv, G, text]
        best = torch.zeros(Hkv, e - s)
        for t0 in range(rs, rs + len(text), QUERY_BLOCK):
            t1 = min(t0 + QUERY_BLOCK, rs + len(text))
            qh = q[t0:t1].float().view(t1 - t0, Hkv, G, D)
            logits = torch.einsum("thgd,khd->hgtk", qh, k[:t1].float()) / math.sqrt(D)  # [Hkv, G, n, t1]
            future = torch.arange(t1)[None, :] > torch.arange(t0, t1)[:, None]  # key after the query
            a = logits.masked_fill_(future, float("-inf")).softmax(-1)[..., s:e]  # [Hkv, G, n, text]
            a = a / h_norm[t0:t1].float().norm(dim=-1)[None, None, :, None] * wov[:, :, None, :]
            best = torch.maximum(best, a.amax(dim=(1, 2)))
        scores[layer, :, s:e] = best
        return out[0].transpose(0, 1)

    model(torch.tensor(ids), torch.arange(len(ids)), attend, logits_at=torch.tensor([len(ids) - 1]))
    return scores
