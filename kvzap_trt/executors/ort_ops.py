"""The plugin nodes on ONNX Runtime: onnxruntime-extensions Python ops bound to the PyTorch references.

onnxruntime-extensions runs a Python function for every node of a registered op type in its
domain `ai.onnx.contrib`; the ONNX executor moves the exported nodes there at load time (the file
keeps `kvzap_trt`, TensorRT's domain). The functions check the node's plugin namespace, version
and fields as the TensorRT creators do, slice layer `layer` of the [L, ...] tables, call the
reference through `ops.dispatch.REFERENCE` and return the cache tensors they updated (the inputs
arrive as fresh NumPy copies, so updating them in place touches nothing of the caller's).
Where the plugin ORs `KVZAP_ERR_*` into its error flag, the evict binding does the same for the
reference's CacheFullError, so a full pool surfaces as it does from the kernels: after the step.
"""

from __future__ import annotations

import functools

import torch

from kvzap_trt.errors import CacheFullError, KvzapError
from kvzap_trt.export.plugins import ATTENTION, EVICT, PLUGIN_NAMESPACE, PLUGIN_VERSION, PluginSpec
from kvzap_trt.ops.cuda_kernels import ERR_BLOCK_TABLE_FULL, ERR_BOUND_EXCEEDED, ERR_POOL_EXHAUSTED
from kvzap_trt.ops.dispatch import REFERENCE

ORT_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' domain for Python ops

# Tensors of the plugins' type T; every other input is int32, scores and score_pool float32.
_FLOAT_TENSORS = {"q", "k_new", "v_new", "k_pool", "v_pool", "scores", "score_pool", "out"}


def import_ort():
    """onnxruntime and onnxruntime_extensions, imported on first use, with a clear error if absent."""
    try:
        import onnxruntime
        import onnxruntime_extensions
    except ImportError as e:
        raise KvzapError(f"the ONNX executor needs onnxruntime and onnxruntime-extensions ({e.name} is missing): "
                         "pip install onnxruntime onnxruntime-extensions") from None
    return onnxruntime, onnxruntime_extensions


def _types(names) -> list[int]:
    from onnxruntime_extensions import PyCustomOpDef as P

    return [P.dt_float if n.removesuffix("_out") in _FLOAT_TENSORS else P.dt_int32 for n in names]


def _fields(spec: PluginSpec, attrs: dict) -> dict:
    """The node's fields, checked as the plugin's creator checks them."""
    if attrs.get("plugin_namespace") != PLUGIN_NAMESPACE or attrs.get("plugin_version") != PLUGIN_VERSION:
        raise ValueError(f"{spec.name}: plugin_namespace {attrs.get('plugin_namespace')!r} / plugin_version "
                         f"{attrs.get('plugin_version')!r}, expected {PLUGIN_NAMESPACE!r} / {PLUGIN_VERSION!r}")
    if attrs["window"] < 0:
        raise ValueError(f"{spec.name}: window {attrs['window']} < 0")
    return attrs


def _layer(spec: PluginSpec, layer: int, num_layers: int) -> int:
    if not 0 <= layer < num_layers:  # layer -1 (every layer at once) is the kernels' decode shortcut, never exported
        raise ValueError(f"{spec.name}: layer {layer} outside [0, {num_layers})")
    return layer


def attention(q, k_new, v_new, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, block_table, kept_len, ring_table,
              error, max_keys, **attrs):
    """KvzapVarlenPagedAttention: out, then the cache tensors handed on unchanged. ORs
    ERR_BOUND_EXCEEDED into the flag when a row has more keys than max_keys' length, the
    contract's bound (stricter than the kernel, which flags only when its whole splits, of at
    least 256 keys, miss some of a row's keys)."""
    f = _fields(ATTENTION, attrs)
    i = _layer(ATTENTION, f["layer"], block_table.shape[0])
    t = torch.from_numpy
    out = REFERENCE.paged_attention(t(q), t(k_new), t(v_new), t(cu_seqlens), t(seq_slots), t(ctx_lens), t(k_pool),
                                    t(v_pool), t(block_table)[i], t(kept_len)[i], t(ring_table)[i], f["window"],
                                    f["scale"])
    if most_keys(cu_seqlens, seq_slots, ctx_lens, kept_len[i], f["window"]) > len(max_keys):
        error |= ERR_BOUND_EXCEEDED
    return out.numpy(), k_pool, v_pool, block_table, kept_len, ring_table, error


def most_keys(cu_seqlens, seq_slots, ctx_lens, kept_len, window: int) -> int:
    """The most keys any row of a batch sees: its head's kept tokens + min(ctx, W) + its
    sequence's new tokens (the last row). cu_seqlens [B+1], seq_slots, ctx_lens [B], kept_len [S, H]."""
    new = cu_seqlens[1:] - cu_seqlens[:-1]
    if not len(new):
        return 0
    return int((kept_len[seq_slots].max(axis=1) + ctx_lens.clip(max=window) + new).max())


def evict(k_new, v_new, scores, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, pos_pool, score_pool, block_table,
          kept_len, ring_table, free_stack, num_free, error, **attrs):
    """KvzapEvict: the cache tensors, updated in place (they are this call's own copies)."""
    f = _fields(EVICT, attrs)
    i = _layer(EVICT, f["layer"], block_table.shape[0])
    t = torch.from_numpy
    try:
        REFERENCE.evict_append(t(k_new), t(v_new), t(scores), t(cu_seqlens), t(seq_slots), t(ctx_lens), t(k_pool),
                               t(v_pool), t(pos_pool), t(score_pool), t(block_table)[i], t(kept_len)[i],
                               t(ring_table)[i], t(free_stack), t(num_free), f["window"], f["threshold"])
    except CacheFullError as e:  # the kernel's flag bits: the pool ran dry, or a head's table row is full
        error |= ERR_POOL_EXHAUSTED if "exhausted" in str(e) else ERR_BLOCK_TABLE_FULL
    return k_pool, v_pool, pos_pool, score_pool, block_table, kept_len, ring_table, free_stack, num_free, error


@functools.cache
def register() -> str:
    """Register both ops with onnxruntime-extensions (once per process) -> its custom-op library path."""
    _, ortx = import_ort()
    from onnxruntime_extensions import PyCustomOpDef as P

    for spec, fn in ((ATTENTION, attention), (EVICT, evict)):
        attrs = {name: P.dt_int64 if ftype == "int32" else P.dt_float for name, ftype in spec.fields}
        attrs.update(plugin_namespace=P.dt_string, plugin_version=P.dt_string)
        ortx.onnx_op(op_type=spec.name, inputs=_types(spec.inputs), outputs=_types(spec.outputs), attrs=attrs)(fn)
    return ortx.get_library_path()

