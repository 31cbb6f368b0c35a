"""NVIDIA kvpress 0.5.5 `DMSPress(KVzapPress)` as the decision reference.

Runs transformers' `generate` (greedy, sdpa attention) under the press with our surrogate's
weights and reads back which (layer, kv head, position) the press masked.
"""

from __future__ import annotations

from pathlib import Path

import torch


def kvpress_generate(
    model_dir: Path, surrogate_dir: Path, prompt: list[int], max_new_tokens: int, threshold: float,
    window: int, decoding: bool = True, kind: str = "linear",
) -> tuple[list[int], list[list[list[int]]], float]:
    """-> (generated ids, kept positions [layer][kv_head], kvpress compression ratio)."""
    from kvpress import DMSPress, KVzapPress
    from kvpress.presses.kvzap_press import KVzapModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    press = DMSPress(KVzapPress(model_type=kind), threshold=threshold, sliding_window_size=window, decoding=decoding)
    # KVzapPress would download nvidia/KVzap-<kind>-<model>; give it our weights under that name.
    press.press.kvzap_model = KVzapModel.from_pretrained(surrogate_dir)
    press.press.kvzap_model_name = f"nvidia/KVzap-{kind}-{model.config.name_or_path.split('/')[-1]}"
    with torch.no_grad(), press(model):
        ids = torch.tensor([prompt])
        # An explicit mask: otherwise generate() takes prompt tokens equal to pad_token_id for padding.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    generated = out[0, len(prompt):].tolist()
    tokens = len(prompt) + len(generated) - 1  # the last sampled token is never fed
    kept = []
    for layer in model.model.layers:
        masked = layer.self_attn.masked_key_indices
        heads = []
        for h in range(model.config.num_key_value_heads):
            gone = set(masked[2][masked[1] == h].tolist()) if masked is not None else set()
            heads.append(sorted(set(range(tokens)) - gone))
        kept.append(heads)
    ratio = press.compression_ratio if press.compression_ratios else 0.0
    return generated, kept, ratio
