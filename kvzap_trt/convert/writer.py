"""`kvzap-trt convert`: HF model + KVzap surrogate -> TensorRT-LLM 1.x checkpoint with tp shards.

    <out>/config.json          TensorRT-LLM's fields for the architecture, plus a `kvzap` section
    <out>/rank{N}.safetensors  each rank's slices (names and layout: layout.py)
    <out>/manifest.json        SHA-256 and size of every file
    <out>/tokenizer/           the model's tokenizer with its HF config.json, when it has one
                               (a subdirectory: AutoTokenizer reads config.json too)

Tensor by tensor: every source tensor is read once from the memory-mapped safetensors, cut into
its tp slices, and each slice streamed to its rank file, so peak memory is about one tensor
whatever the model's size. Written to a temporary directory and renamed when complete.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from kvzap_trt.atomic import atomic_dir
from kvzap_trt.config import RunConfig
from kvzap_trt.convert import layout as L
from kvzap_trt.convert.safetensors_stream import StreamingSafetensorsWriter
from kvzap_trt.errors import KvzapError
from kvzap_trt.models.config import ModelConfig
from kvzap_trt.models.loading import TORCH_DTYPES, model_weight_files, refuse_unplaced, resolve_model_dir
from kvzap_trt.surrogate import Surrogate, load_surrogate
from kvzap_trt.tensor_files import safetensors_files


class SourceTensors:
    """Lazy access to a HF directory's tensors by our names (`model.` prefix removed), from the
    files transformers would read (`model_weight_files`). Remembers which names were asked for, so
    the converter can refuse tensors it has no place for."""

    def __init__(self, model_dir: Path):
        from safetensors import SafetensorError, safe_open

        self.handles, self.where, self.asked = [], {}, set()
        for f in safetensors_files(model_dir, "model", model_weight_files(model_dir)):
            try:
                h = safe_open(f, framework="pt")
            except (SafetensorError, OSError) as e:
                raise KvzapError(f"cannot read model weights {f}: {e}") from None
            self.handles.append(h)
            for k in h.keys():
                self.where[k.removeprefix("model.")] = (h, k)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.where:
            raise KvzapError(f"model lacks tensor {name}")
        self.asked.add(name)
        h, k = self.where[name]
        return tuple(h.get_slice(k).get_shape())

    def check(self, name: str, expected: tuple[int, ...]) -> None:
        if self.shape(name) != tuple(expected):
            raise KvzapError(f"model tensor {name} has shape {self.shape(name)}, its config implies {tuple(expected)}")

    def get(self, name: str, expected: tuple[int, ...]) -> torch.Tensor:
        self.check(name, expected)
        h, k = self.where[name]
        return h.get_tensor(k)


@dataclass
class Item:
    """One checkpoint tensor: its per-rank shape and how to make all ranks' slices."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], list[torch.Tensor]]


def plan_items(m: ModelConfig, src: SourceTensors, s: Surrogate, tp: int) -> list[Item]:
    d, D, Hq, Hkv, I = m.hidden_size, m.head_dim, m.num_heads, m.num_kv_heads, m.intermediate_size
    kv_r = Hkv // tp if tp <= Hkv else 1  # kv heads per rank
    ranks = range(tp)
    items: list[Item] = []

    def split_item(hf: str, trt: str, full: tuple[int, ...], dim: int | None):
        src.check(hf, full)  # every source tensor is checked before anything is written
        shape = tuple(n // tp if i == dim else n for i, n in enumerate(full))
        items.append(Item(trt, shape, lambda: [L.shard(src.get(hf, full), dim, tp, r) for r in ranks]))

    split_item("embed_tokens.weight", L.GLOBAL_RULES["embed_tokens.weight"].trt, (m.vocab_size, d), None)
    for i in range(m.num_layers):
        def qkv(i=i, part="weight"):
            q, k, v = (src.get(f"layers.{i}.self_attn.{p}_proj.{part}", (n * D,) + ((d,) if part == "weight" else ()))
                       for p, n in (("q", Hq), ("k", Hkv), ("v", Hkv)))
            return [torch.cat([L.shard(q, 0, tp, r), L.kv_shard(k, Hkv, tp, r), L.kv_shard(v, Hkv, tp, r)]) for r in ranks]

        for part in ("weight", "bias") if m.attention_bias else ("weight",):
            for p, n in (("q", Hq), ("k", Hkv), ("v", Hkv)):
                src.check(f"layers.{i}.self_attn.{p}_proj.{part}", (n * D,) + ((d,) if part == "weight" else ()))
        rows = (Hq // tp + 2 * kv_r) * D
        items.append(Item(L.QKV.format(i, "weight"), (rows, d), qkv))
        if m.attention_bias:
            items.append(Item(L.QKV.format(i, "bias"), (rows,), lambda i=i: qkv(i, "bias")))
        full_shapes = {
            "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.o_proj.weight": (d, Hq * D), "mlp.up_proj.weight": (I, d), "mlp.gate_proj.weight": (I, d),
            "mlp.down_proj.weight": (d, I),
        }
        if m.qk_norm:
            full_shapes.update({"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})
        for suffix, full in full_shapes.items():
            rule = L.LAYER_RULES["layers.{}." + suffix]
            split_item(f"layers.{i}.{suffix}", rule.trt.format(i), full, rule.split)
        # The surrogate: its output rows are per kv head, sharded like k and v.
        if s.kind == "mlp":
            items.append(Item(L.KVZAP_FC.format(i, "weight"), tuple(s.w1[i].shape), lambda i=i: [s.w1[i]] * tp))
            items.append(Item(L.KVZAP_FC.format(i, "bias"), tuple(s.b1[i].shape), lambda i=i: [s.b1[i]] * tp))
        for part, t in zip(("weight", "bias"), (s.w1, s.b1) if s.kind == "linear" else (s.w2, s.b2)):
            items.append(Item(L.KVZAP_PROJ.format(i, part), (kv_r,) + tuple(t.shape[2:]),
                              lambda i=i, t=t: [L.kv_shard(t[i], Hkv, tp, r) for r in ranks]))
    split_item("norm.weight", L.GLOBAL_RULES["norm.weight"].trt, (d,), None)

    vocab_p = L.padded_vocab(m.vocab_size, tp)
    head_src = "embed_tokens.weight" if m.tie_word_embeddings else "lm_head.weight"
    src.check(head_src, (m.vocab_size, d))

    def lm_head():
        w = src.get(head_src, (m.vocab_size, d))
        w = torch.cat([w, w.new_zeros(vocab_p - m.vocab_size, d)]) if vocab_p > m.vocab_size else w
        return [L.shard(w, 0, tp, r) for r in ranks]

    items.append(Item(L.GLOBAL_RULES["lm_head.weight"].trt, (vocab_p // tp, d), lm_head))
    refuse_unplaced("model", src.where, src.asked, m, "checkpoint")  # as loading refuses them
    return items


def checkpoint_config(m: ModelConfig, s: Surrogate, cfg: RunConfig, tp: int, dtype: str, items: list[Item]) -> dict:
    rotary_scaling = None if m.rope_llama3 is None else {"rope_type": "llama3", **m.rope_llama3}
    c = {
        "architecture": L.ARCHITECTURES[m.family],
        "dtype": dtype,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_size": m.head_dim,
        "intermediate_size": m.intermediate_size,
        "hidden_act": "silu",
        "norm_epsilon": m.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": m.max_position_embeddings,
        "rotary_base": m.rope_theta,
        "rotary_scaling": rotary_scaling,
        "attn_bias": m.attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_word_embeddings,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    if m.family in ("qwen2", "qwen3"):
        c["qwen_type"] = m.family
    c["kvzap"] = {
        "kind": s.kind,
        "hidden_dim": s.hidden_dim,
        "n_modules": s.n_modules,
        "output_dim": s.output_dim,
        "threshold": cfg.threshold,
        "window": cfg.window,
        "compress_decoding": cfg.compress_decoding,
        "score_space": "log",  # evict when surrogate(h) < threshold
        "input": "output of input_layernorm (the hidden state entering attention)",
        "tensors": {"fc": L.KVZAP_FC, "proj": L.KVZAP_PROJ},
        "eos_token_ids": m.eos_token_ids,
        # The model's sliding window (Mistral's, or Qwen's with use_sliding_window), which capped
        # max_position_embeddings above: kept so a reader can say why the context stops there.
        "sliding_window": m.sliding_window,
        "source_model": cfg.model,
        "source_surrogate": cfg.surrogate,
    }
    return c


def convert(cfg: RunConfig, out: Path, tp: int = 1, dtype: str | None = None) -> Path:
    """Write the checkpoint for `cfg.model` + `cfg.surrogate`; returns `out`."""
    dtype = dtype or cfg.dtype
    if dtype not in TORCH_DTYPES:
        raise KvzapError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    if cfg.surrogate is None:
        raise KvzapError("convert needs a surrogate: pass --surrogate DIR|HUB_ID")
    model_dir = resolve_model_dir(cfg.model)
    m = ModelConfig.from_dir(model_dir)
    if m.family not in L.ARCHITECTURES:
        raise KvzapError(f"cannot write a TensorRT-LLM checkpoint for {m.family!r}; supported: {', '.join(L.ARCHITECTURES)}")
    L.check_tp(tp, m.num_heads, m.num_kv_heads)
    s = load_surrogate(cfg.surrogate, m, f"model {cfg.preset or cfg.model}")
    src = SourceTensors(model_dir)
    items = plan_items(m, src, s, tp)
    torch_dtype = TORCH_DTYPES[dtype]
    plan = {it.name: (torch_dtype, it.shape) for it in items}
    try:
        with atomic_dir(Path(out)) as tmp:
            (tmp / "config.json").write_text(json.dumps(checkpoint_config(m, s, cfg, tp, dtype, items), indent=2) + "\n")
            writers = [StreamingSafetensorsWriter(tmp / f"rank{r}.safetensors", plan, {"format": "pt"}) for r in range(tp)]
            for it in tqdm(items, desc=f"convert tp={tp}", unit="tensor"):
                for w, t in zip(writers, it.make()):
                    w.write(it.name, t.to(torch_dtype))
            files = {f"rank{r}.safetensors": w.close() for r, w in enumerate(writers)}
            copy_tokenizer(model_dir, tmp / "tokenizer")
            files.update({p.relative_to(tmp).as_posix(): None for p in sorted(tmp.rglob("*"))
                          if p.is_file() and p.name not in files})
            manifest = {name: {"sha256": sha or _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                        for name, sha in sorted(files.items())}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise KvzapError(f"no space left on the device writing {out}; nothing was written") from None
        raise
    return Path(out)


TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template*", "config.json", "generation_config.json")


def copy_tokenizer(model_dir: Path, dest: Path) -> None:
    if not any(model_dir.glob("tokenizer*")):
        return
    dest.mkdir()
    for pattern in TOKENIZER_FILES:
        for f in model_dir.glob(pattern):
            shutil.copy2(f, dest / f.name)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
