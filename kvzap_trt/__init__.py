"""kvzap-trt: KVzap KV-cache pruning with real memory savings.

Layers (DESIGN.md in the repository root has the full picture):
  config      dataclass defaults -> build_configs/*.yaml presets -> CLI flags
  surrogate   the per-layer KVzap scorer (released Hugging Face format)
  models      compact Llama / Qwen3 forward, HF safetensors and GGUF loading
  cache       block allocator and the per-(layer, seq, kv_head) paged cache with a window ring
  ops         PyTorch reference ops (the CUDA kernels' specification), the kernels as torch ops, dispatch
  runtime     sampler, scheduler and generation loop over the cache
  cli         the `kvzap-trt` command
"""

__version__ = "0.1.0"
