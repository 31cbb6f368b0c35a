"""Architecture hyper-parameters of the supported families, read from a HF `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvzap_trt.errors import KvzapError

# model_type -> whether the family normalises q and k per head (Qwen3) before RoPE.
FAMILIES = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}


def sliding_window_of(hf: dict[str, Any]) -> int | None:
    """The sliding window transformers applies to some layer of this HF config, else None.

    Mistral: `sliding_window` on every layer (null: none; absent: 4096, transformers' default;
    Mistral-7B-v0.1 has 4096). Qwen2 and Qwen3: only with `use_sliding_window`, on the layers
    `layer_types` marks "sliding_attention" (without it, those from `max_window_layers` on).
    Llama: none.
    """
    family, window = hf.get("model_type"), hf.get("sliding_window", 4096)  # transformers' default
    if family == "mistral":
        return window
    if family in ("qwen2", "qwen3") and window is not None and hf.get("use_sliding_window"):
        n = hf["num_hidden_layers"]
        first = hf.get("max_window_layers", 28)
        types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        return window if "sliding_attention" in types else None
    return None


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
    # The model's sliding window where some layer has one. kvzap-trt attends to every kept token,
    # which equals sliding-window attention while the context fits the window, so from_hf caps
    # max_position_embeddings (every context limit) at it.
    sliding_window: int | None = None

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
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # one function in transformers' ACT2FN
            raise KvzapError(f"unsupported MLP activation hidden_act={act!r}; supported: silu")
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
        max_pos = hf.get("max_position_embeddings", 4096)
        window = sliding_window_of(hf)
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
            max_position_embeddings=max_pos if window is None else min(max_pos, window),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qk_norm=FAMILIES[family],
            attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
            rope_llama3=llama3,
            eos_token_ids=eos_ids,
            sliding_window=window,
        )

    @property
    def context_note(self) -> str:
        """Why the context limit is what it is, when the sliding window set it ("" otherwise)."""
        if self.sliding_window is None or self.sliding_window > self.max_position_embeddings:
            return ""
        return (f" (the model's {self.sliding_window}-token sliding window: kvzap-trt attends to every kept token, "
                "which equals the model's attention only up to there)")

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        try:
            return cls.from_hf(json.loads(path.read_text()))
        except OSError as e:
            raise KvzapError(f"cannot read model config {path}: {e.strerror}") from None
        except (json.JSONDecodeError, KeyError) as e:
            raise KvzapError(f"model config {path} is malformed: {e}") from None
