"""The two TensorRT plugins as ONNX nodes: op type, inputs, outputs and fields.

The C++ twin is plugins/trt/common/kvzapPluginConstants.h (names, version, namespace, field
names) and the I/O tables of plugins/trt/*/README.md: these must match them
(tests/test_onnx_export.py reads the READMEs and checks every exported node against them).
TensorRT's ONNX parser maps a node of an unknown op type to the plugin of that name; the
attributes `plugin_namespace` and `plugin_version` select it, the others fill its fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvzap_trt.ops.interface import key_bound

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

    @property
    def handed_on(self) -> tuple[str, ...]:
        """The inputs the plugin hands on as aliased outputs (the cache tensors), in output order."""
        return tuple(self.inputs[self.aliased[o]] for o in sorted(self.aliased))


_ATTN_CACHE = ("k_pool", "v_pool", "block_table", "kept_len", "ring_table", "error")
ATTENTION = PluginSpec(
    name="KvzapVarlenPagedAttention",  # kATTENTION_NAME
    # max_keys: int32 [K], a number carried in a shape (the step's key bound), contents never read
    inputs=("q", "k_new", "v_new", "cu_seqlens", "seq_slots", "ctx_lens", *_ATTN_CACHE, "max_keys"),
    outputs=("out",) + tuple(f"{n}_out" for n in _ATTN_CACHE),
    fields=(("layer", "int32"), ("window", "int32"), ("scale", "float32")),
    aliased={1 + i: 6 + i for i in range(len(_ATTN_CACHE))},
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
KEY_BOUND_QUANTUM = 256  # max_keys lengths are rounded up to a multiple of this: the shape changes rarely


def max_keys_length(cu: tuple[int, ...], ctx: tuple[int, ...], window: int, max_kept: int | None,
                    max_blocks_per_head: int, block_size: int) -> int:
    """The length of the attention plugin's `max_keys` input for one step (cu: [B+1], ctx: [B] as
    ints): the step's key bound (`ops.interface.key_bound`: kept + window + new tokens, from the
    scheduler's max_kept) rounded up to KEY_BOUND_QUANTUM, at most the plugin's own capacity bound
    M * block_size + W + N; at least 1."""
    capacity = max_blocks_per_head * block_size + window + cu[-1]
    bound = key_bound(cu, ctx, window, max_kept)
    return max(1, min(capacity, -(-bound // KEY_BOUND_QUANTUM) * KEY_BOUND_QUANTUM))


def cache_tensors(cache) -> dict:
    """A PagedKVCache's tensors under their graph input names (all of CACHE_TENSORS but `error`,
    the flag each executor owns)."""
    t = {n: getattr(cache, n) for n in CACHE_TENSORS[:7]}
    t.update(free_stack=cache.allocator.free_stack, num_free=cache.allocator.num_free_t)
    return t


def step_max_keys(step, cache) -> int:
    """max_keys_length of an executor's step (`StepInputs`) over a `PagedKVCache`."""
    return max_keys_length(tuple(step.cu_seqlens.tolist()), tuple(step.ctx_lens.tolist()), cache.spec.window,
                           step.max_kept, cache.block_table.shape[-1], cache.spec.block_size)
