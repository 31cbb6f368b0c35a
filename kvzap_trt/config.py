"""Run configuration in three layers: dataclass defaults -> preset YAML -> explicit CLI flags.

A preset is `build_configs/<name>.yaml`; its keys are the fields of `RunConfig`. The resolved
config (every field, after all layers) is what outputs record next to themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvzap_trt.errors import KvzapError

# The request option `reasoning` (kvzap_trt/kvcoe/reasoning.py): the values every front accepts.
REASONING_MODES = ("auto", "fast", "slow")

DTYPES = ("float32", "bfloat16", "float16")
SURROGATE_KINDS = ("linear", "mlp")


def flag(default: Any, help: str, **how: Any) -> Any:
    """A RunConfig field that is also a command-line flag: `help`, and how kvzap_trt/cli/flags.py
    makes the flag (`choices`; `switch`: the flag that sets a default-on bool off; `path`: a
    file name, resolved to an absolute path)."""
    return dataclasses.field(default=default, metadata={"help": help, **how})


@dataclass
class RunConfig:
    """Everything a generation run depends on, apart from the prompt.

    model:      preset name, HF model directory, .gguf file, `pkg://DIST/FILE` (a file shipped
                by an installed Python distribution) or a Hugging Face model id.
    surrogate:  surrogate directory, Hugging Face id, `random:KIND:SEED` (random weights, for
                tests and placeholders) or None for no eviction at all (dense).
    threshold:  tau; a KV pair whose log-score is < tau is evicted once it leaves the window.
    window:     the most recent `window` tokens are never evicted.
    compress_decoding: also evict tokens generated while decoding (kvpress `decoding=True`).
    block_size: tokens per cache block; one block belongs to one (layer, seq, kv_head).
    max_seqs, kv_cache_mb: what a server holds at once: sequence slots and the block pool.
    max_num_tokens: prompts longer than this are prefilled in chunks of this many tokens, and a
                step packs at most this many prompt tokens (decodes come on top); None: every
                prompt is prefilled whole (kvpress's decisions exactly). A TensorRT engine's own
                limit (`build --max-num-tokens`, default 8192) applies too.
    probe:      a difficulty probe (`kvzap-trt probe train`) for requests with reasoning "auto".
    fast_max_new_tokens: the generation budget of reasoning "fast" (None: the request's own).
    """

    preset: str | None = None
    model: str = flag("smollm2-135m", "preset name, HF model directory, .gguf file or HF id (default: smollm2-135m)")
    surrogate: str | None = flag(None, "surrogate directory, HF id or random:KIND:SEED (default: the preset's)")
    surrogate_kind: str | None = None
    threshold: float = flag(-4.0, "tau: evict KV pairs with log-score < tau (default: the preset's)")
    window: int = flag(128, "most recent tokens never evicted (default: 128)")
    compress_decoding: bool = flag(True, "evict only during prefill, as kvpress decoding=False",
                                   switch="--no-compress-decoding")
    dtype: str = flag("float32", "weights and KV cache (default: the preset's, else float32)", choices=DTYPES)
    device: str = flag("cpu", "where the model runs (default: the preset's, else cpu)", choices=("cpu", "cuda"))
    tp: int = flag(1, "tensor-parallel ranks (default: the preset's, else 1)")
    block_size: int = flag(16, "tokens per KV block (default: 16)")
    max_new_tokens: int = flag(64, "tokens to generate at most (default: 64)")
    temperature: float = flag(0.0, "0 (default): greedy")
    top_p: float = flag(1.0, "nucleus sampling mass (default: 1, off)")
    top_k: int = flag(0, "sample among the k likeliest tokens (default: 0, off)")
    seed: int = flag(0, "sampling seed (default: 0)")
    # serving: sequence slots, and the KV block pool's size (the whole KV budget: kept and window pages)
    max_seqs: int = flag(32, "sequences served at once (default: 32)")
    kv_cache_mb: float = flag(256.0, "KV block pool size in MiB (default: 256)")
    max_num_tokens: int | None = flag(
        None, "prefill prompts in chunks of this many tokens, at most this many prompt tokens per step (decodes "
        "come on top; later chunks attend to the compressed cache of earlier ones); default: prompts prefilled "
        "whole; with build --engine tensorrt also the engine's limit (default 8192)")
    # fast/slow reasoning (kvzap_trt/kvcoe/reasoning.py)
    probe: str | None = flag(None, "difficulty probe for reasoning auto (from `kvzap-trt probe train`)", path=True)
    fast_max_new_tokens: int | None = flag(None, "generation budget of reasoning fast (default: the request's own)")

    def validate(self) -> "RunConfig":
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold):
            raise KvzapError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.window < 0:
            raise KvzapError(f"window must be >= 0, got {self.window}")
        if self.block_size < 1:
            raise KvzapError(f"block_size must be >= 1, got {self.block_size}")
        if self.dtype not in DTYPES:
            raise KvzapError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.surrogate_kind is not None and self.surrogate_kind not in SURROGATE_KINDS:
            raise KvzapError(f"surrogate_kind must be linear or mlp, got {self.surrogate_kind!r}")
        if self.max_new_tokens < 0:
            raise KvzapError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise KvzapError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KvzapError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise KvzapError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_seqs < 1:
            raise KvzapError(f"max_seqs must be >= 1, got {self.max_seqs}")
        if self.max_num_tokens is not None and self.max_num_tokens < 1:
            raise KvzapError(f"max_num_tokens must be >= 1, got {self.max_num_tokens}")
        if not self.kv_cache_mb > 0:
            raise KvzapError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")
        if self.fast_max_new_tokens is not None and self.fast_max_new_tokens < 1:
            raise KvzapError(f"fast_max_new_tokens must be >= 1, got {self.fast_max_new_tokens}")
        if self.tp < 1:
            raise KvzapError(f"tp must be >= 1, got {self.tp}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_configs_dir() -> Path:
    """`build_configs/` of this checkout, or $KVZAP_TRT_BUILD_CONFIGS."""
    env = os.environ.get("KVZAP_TRT_BUILD_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "build_configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in build_configs_dir().glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The YAML of preset `name` as a dict of RunConfig fields (unknown keys are an error)."""
    path = build_configs_dir() / f"{name}.yaml"
    if not path.is_file():
        raise KvzapError(f"unknown preset {name!r}; presets: {', '.join(preset_names()) or 'none'}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise KvzapError(f"preset {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise KvzapError(f"preset {path} has unknown keys: {', '.join(unknown)}")
    for key in ("model", "surrogate"):  # ./relative paths are relative to the preset file
        if isinstance(data.get(key), str) and data[key].startswith("./"):
            data[key] = str((path.parent / data[key]).resolve())
    return data


def is_preset(model: str) -> bool:
    return "/" not in model and not model.endswith(".gguf") and (build_configs_dir() / f"{model}.yaml").is_file()


def checkpoint_layer(path: Path) -> dict[str, Any]:
    """The eviction settings a `kvzap-trt convert` checkpoint records: its preset layer."""
    try:
        section = json.loads((path / "config.json").read_text()).get("kvzap") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: section[k] for k in ("threshold", "window", "compress_decoding") if k in section}


def resolve_config(model: str | None = None, **overrides: Any) -> RunConfig:
    """Defaults, then the preset named by `model` (if it is one), then the non-None overrides."""
    cfg: dict[str, Any] = dataclasses.asdict(RunConfig())
    model = model or cfg["model"]
    if is_preset(model):
        cfg.update(load_preset(model))
        cfg["preset"] = model
    else:
        cfg["model"] = model
        # A bare name that is neither a path nor a Hub id (owner/name) can only mean a preset.
        if "/" not in model and not Path(model).exists():
            raise KvzapError(f"unknown preset {model!r}; presets: {', '.join(preset_names())}")
        cfg.update(checkpoint_layer(Path(model)))
    given = {k: v for k, v in overrides.items() if v is not None}
    if "surrogate" in given and "surrogate_kind" not in given:
        cfg["surrogate_kind"] = None  # the preset's kind describes the preset's surrogate only
    cfg.update(given)
    return RunConfig(**cfg).validate()
