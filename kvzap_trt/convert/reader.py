"""Read a TensorRT-LLM checkpoint written by `kvzap-trt convert` (any tp) back into our model.

The tp slices are merged with the same layout rules that cut them (layout.py): replicated kv
heads are dropped, the padded vocabulary trimmed, the fused qkv split into q, k and v.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kvzap_trt.convert import layout as L
from kvzap_trt.errors import KvzapError
from kvzap_trt.models.config import ModelConfig
from kvzap_trt.surrogate import Surrogate

FAMILY_OF = {arch: family for family, arch in L.ARCHITECTURES.items()}


def is_trtllm_checkpoint(path: Path) -> bool:
    try:
        c = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "architecture" in c and "mapping" in c


def model_config_from_checkpoint(c: dict[str, Any]) -> ModelConfig:
    if c["architecture"] not in FAMILY_OF:
        raise KvzapError(f"checkpoint architecture {c['architecture']!r} is not supported; supported: {', '.join(FAMILY_OF)}")
    rope = {"rope_theta": c["rotary_base"], **(c.get("rotary_scaling") or {"rope_type": "default"})}
    window = c.get("kvzap", {}).get("sliding_window")
    m = ModelConfig.from_hf({
        "model_type": FAMILY_OF[c["architecture"]], "vocab_size": c["vocab_size"], "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"], "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"],
        "head_dim": c["head_size"], "rms_norm_eps": c["norm_epsilon"], "rope_parameters": rope,
        "max_position_embeddings": c["max_position_embeddings"], "tie_word_embeddings": c["tie_word_embeddings"],
        "attention_bias": c["attn_bias"], "eos_token_id": c.get("kvzap", {}).get("eos_token_ids") or None,
        "sliding_window": window,  # explicit: a Mistral config without the key means transformers' 4096
    })
    # max_position_embeddings was written capped at the sliding window, if any; the window says why.
    return replace(m, sliding_window=window)


@dataclass
class Checkpoint:
    config: dict[str, Any]
    model_config: ModelConfig
    state: dict[str, torch.Tensor]  # HF names, `model.` prefix removed, merged over ranks
    surrogate: Surrogate | None


def read_checkpoint(path: Path) -> Checkpoint:
    from safetensors import safe_open

    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    m = model_config_from_checkpoint(c)
    tp = c["mapping"]["tp_size"]
    files = [path / f"rank{r}.safetensors" for r in range(tp)]
    for f in files:
        if not f.is_file():
            raise KvzapError(f"checkpoint {path} has tp {tp} but lacks {f.name}")
    handles = [safe_open(f, framework="pt") for f in files]

    def parts(name: str) -> list[torch.Tensor]:
        if name not in handles[0].keys():
            raise KvzapError(f"checkpoint {path} lacks tensor {name}")
        return [h.get_tensor(name) for h in handles]

    D, Hq, Hkv = m.head_dim, m.num_heads, m.num_kv_heads
    kv_r = Hkv // tp if tp <= Hkv else 1
    state: dict[str, torch.Tensor] = {}
    for hf, rule in L.GLOBAL_RULES.items():
        state[hf] = L.merge(parts(rule.trt), rule.split)
    state["lm_head.weight"] = state["lm_head.weight"][: m.vocab_size]
    kz = c.get("kvzap")
    sur: dict[str, list[torch.Tensor]] = {}
    for i in range(m.num_layers):
        for hf, rule in L.LAYER_RULES.items():
            if "_norm" in hf and not m.qk_norm:
                continue
            state[hf.format(i)] = L.merge(parts(rule.trt.format(i)), rule.split)
        for part in ("weight", "bias") if m.attention_bias else ("weight",):
            split = [p.split([Hq // tp * D, kv_r * D, kv_r * D]) for p in parts(L.QKV.format(i, part))]
            state[f"layers.{i}.self_attn.q_proj.{part}"] = torch.cat([q for q, _, _ in split])
            state[f"layers.{i}.self_attn.k_proj.{part}"] = L.kv_merge([k for _, k, _ in split], Hkv)
            state[f"layers.{i}.self_attn.v_proj.{part}"] = L.kv_merge([v for _, _, v in split], Hkv)
        if kz:
            if kz["kind"] == "mlp":
                sur.setdefault("w1", []).append(parts(L.KVZAP_FC.format(i, "weight"))[0])
                sur.setdefault("b1", []).append(parts(L.KVZAP_FC.format(i, "bias"))[0])
            out = ("w1", "b1") if kz["kind"] == "linear" else ("w2", "b2")
            sur.setdefault(out[0], []).append(L.kv_merge(parts(L.KVZAP_PROJ.format(i, "weight")), Hkv))
            sur.setdefault(out[1], []).append(L.kv_merge(parts(L.KVZAP_PROJ.format(i, "bias")), Hkv))
    surrogate = None
    if kz:
        st = {k: torch.stack(v).float() for k, v in sur.items()}
        surrogate = Surrogate(st["w1"], st["b1"], st.get("w2"), st.get("b2"), source=f"{path} (checkpoint)")
    return Checkpoint(c, m, state, surrogate)
