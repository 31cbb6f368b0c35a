"""The model's Triton interface: drop-in for clients of TensorRT-LLM's `ensemble` model.

One table (`INPUTS`, `OUTPUTS`) drives both request parsing here and `config.pbtxt`
(`repository.py`). Like TensorRT-LLM's ensemble, the model has `max_batch_size > 0`: tensors
carry a leading batch dimension ([1, 1] for a scalar; `/generate` adds it by itself). One
request holds one prompt.

TensorRT-LLM's current Triton model (the `llmapi` Python model) names its inputs otherwise
(`streaming`, `sampling_param_max_tokens`, ...): `ALIASES` accepts those too, each as the one
parameter it means; a request that gives both names with different values gets a 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kvzap_trt.config import REASONING_MODES
from kvzap_trt.errors import KvzapError

# name: (Triton data type, dims, required)
INPUTS: dict[str, tuple[str, list[int], bool]] = {
    "text_input": ("TYPE_STRING", [1], True),
    "max_tokens": ("TYPE_INT32", [1], False),  # required, under this name or sampling_param_max_tokens
    "temperature": ("TYPE_FP32", [1], False),
    "top_p": ("TYPE_FP32", [1], False),
    "top_k": ("TYPE_INT32", [1], False),
    "random_seed": ("TYPE_UINT64", [1], False),
    "stop_words": ("TYPE_STRING", [-1], False),
    "bad_words": ("TYPE_STRING", [-1], False),  # accepted for drop-in clients; must be empty
    "stream": ("TYPE_BOOL", [1], False),
    # kvzap-trt's (kvzap_trt/kvcoe): the answer's KV-CoE self-evaluation; fast/slow switching
    "kv_coe": ("TYPE_BOOL", [1], False),
    "reasoning": ("TYPE_STRING", [1], False),  # "auto" | "fast" | "slow"
    "evict": ("TYPE_BOOL", [1], False),  # false: KVzap evicts nothing of this request (default true)
    # TensorRT-LLM llmapi names (tensorrtllm_backend's `llmapi` model), see ALIASES
    "streaming": ("TYPE_BOOL", [1], False),
    "sampling_param_max_tokens": ("TYPE_INT32", [1], False),
    "sampling_param_temperature": ("TYPE_FP32", [1], False),
    "sampling_param_top_p": ("TYPE_FP32", [1], False),
    "sampling_param_top_k": ("TYPE_INT32", [1], False),
    "sampling_param_seed": ("TYPE_UINT64", [1], False),
    "sampling_param_stop": ("TYPE_STRING", [-1], False),
    "sampling_param_exclude_input_from_output": ("TYPE_BOOL", [1], False),  # the prompt is never echoed
}
ALIASES: dict[str, str] = {  # llmapi name -> the ensemble name of the same parameter
    "streaming": "stream",
    "sampling_param_max_tokens": "max_tokens",
    "sampling_param_temperature": "temperature",
    "sampling_param_top_p": "top_p",
    "sampling_param_top_k": "top_k",
    "sampling_param_seed": "random_seed",
    "sampling_param_stop": "stop_words",
}
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "text_output": ("TYPE_STRING", [1]),
    "kv_compression_ratio": ("TYPE_FP32", [1]),  # evicted / all KV pairs of this request
    "kv_bytes": ("TYPE_INT64", [1]),  # KV bytes this request held at its end
    # Only in the final response of a request that asked (kv_coe / reasoning), and for kv_coe_score
    # only where the score is defined: absent otherwise (JSON has no NaN, and a sentinel would be a lie).
    "kv_coe_score": ("TYPE_FP32", [1]),  # the answer's KV-CoE score (kvzap_trt/kvcoe/coe.py)
    "reasoning_used": ("TYPE_STRING", [1]),  # "fast" | "slow"
}



class BadRequest(KvzapError):
    """A request the server refuses (HTTP 400); `code` a machine-readable reason where OpenAI's
    API has one (context_length_exceeded, kv_pool_exhausted)."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass
class GenerationParams:
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_words: list[str] = field(default_factory=list)
    stream: bool = False
    kv_coe: bool = False  # return the answer's KV-CoE score (kvzap_trt/kvcoe/coe.py)
    reasoning: str | None = None  # fast/slow switching (kvzap_trt/kvcoe/reasoning.py); None: off
    evict: bool = True  # False: keep every token of this request (runtime/scheduler.py Request.evict)


def _words(arr: np.ndarray | None) -> list[str]:
    if arr is None:
        return []
    return [w.decode() if isinstance(w, bytes) else str(w) for w in arr.reshape(-1) if w not in (b"", "")]


def parse_request(get: Callable[[str], np.ndarray | None]) -> GenerationParams:
    """`get(name)` -> the input as a numpy array (batch dimension included) or None."""
    arrays = {name: get(name) for name in INPUTS}
    for name, (_, _, required) in INPUTS.items():
        a = arrays[name]
        if a is None:
            if required:
                raise BadRequest(f"input {name!r} is required")
            continue
        if a.ndim == 0 or a.shape[0] != 1:
            raise BadRequest(f"input {name!r}: one prompt per request (batch size 1), got shape {list(a.shape)}")
    for alias, name in ALIASES.items():
        a, b = arrays.pop(alias), arrays[name]
        if a is not None and b is not None:
            same = _words(a) == _words(b) if name == "stop_words" else a.reshape(-1).tolist() == b.reshape(-1).tolist()
            if not same:
                raise BadRequest(f"{name} and {alias} are the same parameter and disagree "
                                 f"({b.reshape(-1).tolist()} vs {a.reshape(-1).tolist()}); give one")
        arrays[name] = b if b is not None else a
    if arrays["max_tokens"] is None:
        raise BadRequest("input 'max_tokens' (or 'sampling_param_max_tokens') is required")
    exclude = arrays.pop("sampling_param_exclude_input_from_output")
    if exclude is not None and not bool(exclude.reshape(-1)[0]):
        raise BadRequest("sampling_param_exclude_input_from_output must be true: the prompt is never echoed")

    def scalar(name):
        a = arrays[name]
        return None if a is None else a.reshape(-1)[0]

    raw = scalar("text_input")
    prompt = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    if not prompt.strip():
        raise BadRequest("text_input is empty")
    p = GenerationParams(prompt=prompt, max_tokens=int(scalar("max_tokens")))
    if p.max_tokens < 1:
        raise BadRequest(f"max_tokens must be >= 1, got {p.max_tokens}")
    if scalar("temperature") is not None:
        p.temperature = float(scalar("temperature"))
        if not math.isfinite(p.temperature) or p.temperature < 0:
            raise BadRequest(f"temperature must be a finite number >= 0, got {p.temperature}")
    if scalar("top_p") is not None:
        p.top_p = float(scalar("top_p"))
        if not 0 < p.top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {p.top_p}")
    if scalar("top_k") is not None:
        p.top_k = int(scalar("top_k"))
        if p.top_k < 0:
            raise BadRequest(f"top_k must be >= 0, got {p.top_k}")
    if scalar("random_seed") is not None:
        p.seed = int(scalar("random_seed"))
    p.stop_words = _words(arrays["stop_words"])
    if _words(arrays["bad_words"]):
        raise BadRequest("bad_words is not supported")
    if scalar("stream") is not None:
        p.stream = bool(scalar("stream"))
    if scalar("kv_coe") is not None:
        p.kv_coe = bool(scalar("kv_coe"))
    if scalar("evict") is not None:
        p.evict = bool(scalar("evict"))
    if scalar("reasoning") is not None:
        raw = scalar("reasoning")
        p.reasoning = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
        if p.reasoning not in REASONING_MODES:
            raise BadRequest(f"reasoning must be one of {', '.join(REASONING_MODES)}, got {p.reasoning!r}")
    return p


def output_arrays(text: str, compression_ratio: float, kv_bytes: int, kv_coe_score: float | None = None,
                  reasoning_used: str | None = None) -> dict[str, np.ndarray]:
    """Output tensors of one response, batch dimension included; kv_coe_score and reasoning_used
    only when given (see OUTPUTS)."""
    out = {
        "text_output": np.array([[text.encode("utf-8")]], dtype=object),
        "kv_compression_ratio": np.array([[compression_ratio]], dtype=np.float32),
        "kv_bytes": np.array([[kv_bytes]], dtype=np.int64),
    }
    if kv_coe_score is not None:
        out["kv_coe_score"] = np.array([[kv_coe_score]], dtype=np.float32)
    if reasoning_used is not None:
        out["reasoning_used"] = np.array([[reasoning_used.encode()]], dtype=object)
    return out
