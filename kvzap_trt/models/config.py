"""Architecture hyper-parameters of the supported families, read from a HF `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvzap_trt.errors import KvzapError

# model_type -> whether the family normalises q and k per head (Qwen3) before RoPE.
FAMILIES = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    attention_bias: bool = False
    # Llama-3 RoPE scaling: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    rope_llama3: dict[str, float] | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise KvzapError(
                f"unsupported architecture {family!r}; supported: {', '.join(sorted(FAMILIES))}"
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise KvzapError(f"unsupported RoPE type {rope_type!r}; supported: default, llama3")
        llama3 = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            llama3 = {k: float(rope[k]) for k in keys}
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        heads = hf["num_attention_heads"]
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=float(theta),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=FAMILIES[family],
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            rope_llama3=llama3,
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        try:
            return cls.from_hf(json.loads(path.read_text()))
        except OSError as e:
            raise KvzapError(f"cannot read model config {path}: {e.strerror}") from None
        except (json.JSONDecodeError, KeyError) as e:
            raise KvzapError(f"model config {path} is malformed: {e}") from None
