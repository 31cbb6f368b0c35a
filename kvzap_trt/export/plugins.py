"""The two TensorRT plugins as ONNX nodes: op type, inputs, outputs and fields.

The C++ twin is plugins/trt/common/kvzapPluginConstants.h (names, version, namespace, field
names) and the I/O tables of plugins/trt/*/README.md: these must match them
(tests/test_onnx_export.py reads the READMEs and checks every exported node against them).
TensorRT's ONNX parser maps a node of an unknown op type to the plugin of that name; the
attributes `plugin_namespace` and `plugin_version` select it, the others fill its fields.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "kvzap_trt"  # the nodes' ONNX domain (registered in the model's opset_import)
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "kvzap_trt"  # must match kPLUGIN_NAMESPACE in plugins/trt/common/kvzapPluginConstants.h
PLUGIN_VERSION = "1"  # must match kPLUGIN_VERSION there


@dataclass(frozen=True)
class PluginSpec:
    """name: op type = plugin name.  fields: (name, "int32" | "float32"), each one value.
    aliased: output index -> the input index it hands on (same memory in TensorRT)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fields: tuple[tuple[str, str], ...]
    aliased: dict[int, int]


_ATTN_IN = ("q", "k_new", "v_new", "cu_seqlens", "seq_slots", "ctx_lens", "k_pool", "v_pool", "block_table",
            "kept_len", "ring_table", "error")
ATTENTION = PluginSpec(
    name="KvzapVarlenPagedAttention",  # kATTENTION_NAME
    inputs=_ATTN_IN,
    outputs=("out",) + tuple(f"{n}_out" for n in _ATTN_IN[6:]),
    fields=(("layer", "int32"), ("window", "int32"), ("scale", "float32")),
    aliased={1 + i: 6 + i for i in range(len(_ATTN_IN) - 6)},
)

_EVICT_IN = ("k_new", "v_new", "scores", "cu_seqlens", "seq_slots", "ctx_lens", "k_pool", "v_pool", "pos_pool",
             "score_pool", "block_table", "kept_len", "ring_table", "free_stack", "num_free", "error")
EVICT = PluginSpec(
    name="KvzapEvict",  # kEVICT_NAME
    inputs=_EVICT_IN,
    outputs=tuple(f"{n}_out" for n in _EVICT_IN[6:]),
    fields=(("layer", "int32"), ("window", "int32"), ("threshold", "float32")),
    aliased={i: 6 + i for i in range(len(_EVICT_IN) - 6)},
)

PLUGINS = {p.name: p for p in (ATTENTION, EVICT)}

# The cache as graph inputs (updated copies as outputs named `<name>_out`), in this order.
CACHE_TENSORS = ("k_pool", "v_pool", "pos_pool", "score_pool", "block_table", "kept_len", "ring_table",
                 "free_stack", "num_free", "error")
BATCH_TENSORS = ("cu_seqlens", "seq_slots", "ctx_lens")


def cache_tensors(cache) -> dict:
    """A PagedKVCache's tensors under their graph input names (all of CACHE_TENSORS but `error`,
    the flag each executor owns)."""
    t = {n: getattr(cache, n) for n in CACHE_TENSORS[:7]}
    t.update(free_stack=cache.allocator.free_stack, num_free=cache.allocator.num_free_t)
    return t
