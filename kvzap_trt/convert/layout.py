"""Names and tensor-parallel layout of a TensorRT-LLM 1.x checkpoint (Llama / Qwen3), plus KVzap.

The rename table maps our (HF, `model.` prefix removed) names to TensorRT-LLM's, with the
dimension each tensor splits along across tp ranks; it follows the release's converters
(`tensorrt_llm/models/{llama,qwen}/convert.py`): `mlp.gate` is HF's up_proj, `mlp.fc` its
gate_proj. Two tensors are built explicitly: the fused `attention.qkv` (each rank: its q heads,
then its k heads, then its v heads) and the KVzap surrogate under the attention module, whose
output rows are per kv head and shard like k and v. When tp exceeds the kv heads, kv heads are
replicated (rank r holds kv head r // (tp / kv_heads)), as TensorRT-LLM's `dup_kv_weight` does.
Linear weights stay [out, in].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvzap_trt.errors import KvzapError


@dataclass(frozen=True)
class Rule:
    trt: str  # TensorRT-LLM name; {} is the layer index
    split: int | None  # tensor-parallel split dimension; None: replicated


GLOBAL_RULES = {
    "embed_tokens.weight": Rule("transformer.vocab_embedding.weight", None),
    "norm.weight": Rule("transformer.ln_f.weight", None),
    "lm_head.weight": Rule("lm_head.weight", 0),  # vocab rows, padded to a multiple of tp
}
LAYER_RULES = {
    "layers.{}.input_layernorm.weight": Rule("transformer.layers.{}.input_layernorm.weight", None),
    "layers.{}.post_attention_layernorm.weight": Rule("transformer.layers.{}.post_layernorm.weight", None),
    "layers.{}.self_attn.o_proj.weight": Rule("transformer.layers.{}.attention.dense.weight", 1),
    "layers.{}.self_attn.q_norm.weight": Rule("transformer.layers.{}.attention.q_layernorm.weight", None),
    "layers.{}.self_attn.k_norm.weight": Rule("transformer.layers.{}.attention.k_layernorm.weight", None),
    "layers.{}.mlp.up_proj.weight": Rule("transformer.layers.{}.mlp.gate.weight", 0),
    "layers.{}.mlp.gate_proj.weight": Rule("transformer.layers.{}.mlp.fc.weight", 0),
    "layers.{}.mlp.down_proj.weight": Rule("transformer.layers.{}.mlp.proj.weight", 1),
}
QKV = "transformer.layers.{}.attention.qkv.{}"  # weight | bias
# The surrogate: linear -> kvzap.proj only; MLP -> kvzap.fc (replicated) then kvzap.proj.
KVZAP_FC = "transformer.layers.{}.attention.kvzap.fc.{}"
KVZAP_PROJ = "transformer.layers.{}.attention.kvzap.proj.{}"
# family -> TensorRT-LLM's architecture name (its MODEL_MAP: Mistral runs LLaMAForCausalLM,
# Qwen2 and Qwen3 QWenForCausalLM with `qwen_type`); every one takes the names above.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


def check_tp(tp: int, num_heads: int, num_kv_heads: int) -> None:
    if tp < 1 or num_heads % tp:
        raise KvzapError(f"tp {tp} does not divide the model's {num_heads} attention heads")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise KvzapError(f"tp {tp} neither divides nor is a multiple of the model's {num_kv_heads} kv heads")


def shard(t: torch.Tensor, dim: int | None, tp: int, rank: int) -> torch.Tensor:
    return t if dim is None else t.chunk(tp, dim)[rank]


def kv_shard(t: torch.Tensor, num_kv_heads: int, tp: int, rank: int) -> torch.Tensor:
    """Rows grouped by kv head ([Hkv * rows_per_head, ...]) -> this rank's heads."""
    heads = t.reshape(num_kv_heads, -1, *t.shape[1:])
    if tp <= num_kv_heads:
        return heads.chunk(tp, 0)[rank].reshape(-1, *t.shape[1:])
    return heads[rank // (tp // num_kv_heads)]


def kv_merge(parts: list[torch.Tensor], num_kv_heads: int) -> torch.Tensor:
    """Inverse of kv_shard over all ranks (replicas dropped)."""
    tp = len(parts)
    return torch.cat(parts if tp <= num_kv_heads else parts[:: tp // num_kv_heads], 0)


def merge(parts: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    return parts[0] if dim is None else torch.cat(parts, dim)


def padded_vocab(vocab: int, tp: int) -> int:
    return -(-vocab // tp) * tp
