"""The Llama / Qwen3 forward with KVzap as one ONNX graph, built node by node from the weights.

It computes what `models/transformer.py` + `executors/torch_executor.py` compute, op for op:
embedding, RMSNorm (in float32, as the model casts), q/k/v projections, Qwen3's per-head q/k
norms, RoPE from the `positions` input, the surrogate (MatMul + Add; the MLP with an exact erf
Gelu as `F.gelu`), scores of `never_evict` rows set to +inf, then per layer one
KvzapVarlenPagedAttention node and one KvzapEvict node on the cache tensors, o_proj, the SiLU MLP,
and the final norm and lm_head at the rows `logits_at`.

Graph inputs (N packed tokens, B sequences; names of symbolic dims in quotes):
  tokens [N] int64   positions [N] int64   never_evict [N] bool   logits_at [B] int64
  cu_seqlens [B+1] int32   seq_slots [B] int32   ctx_lens [B] int32
  max_keys ["max_keys"] int32: its length is the step's key bound (export/plugins.py), never read
  k_pool, v_pool [num_blocks, block_size, D] T   pos_pool [num_blocks, block_size] int32
  score_pool [num_blocks, block_size] float32   block_table [L, S, Hkv, M] int32
  kept_len [L, S, Hkv] int32   ring_table [L, S, Hkv, R] int32   free_stack [num_blocks] int32
  num_free [1] int32   error [1] int32
Graph outputs: logits [B, vocab] float32, and `<name>_out` for each cache tensor: the last evict
node's outputs (the cache tensors are chained attention(l) -> evict(l) -> attention(l + 1)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from kvzap_trt.export.plugins import (
    ATTENTION,
    BATCH_TENSORS,
    CACHE_TENSORS,
    DOMAIN,
    DOMAIN_VERSION,
    EVICT,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    PluginSpec,
)

if TYPE_CHECKING:
    import onnx

    from kvzap_trt.models.transformer import Transformer
    from kvzap_trt.surrogate import Surrogate

OPSET = 20  # Gelu (approximate="none") is an opset-20 op; TensorRT parses opset 20 from 10.1 on (export/trt_support.py)


def onnx_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    table = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
             torch.bfloat16: TensorProto.BFLOAT16, torch.int32: TensorProto.INT32, torch.int64: TensorProto.INT64}
    if dtype not in table:
        raise ValueError(f"no ONNX type for {dtype}")
    return table[dtype]


def tensor_proto(name: str, t: torch.Tensor) -> "onnx.TensorProto":
    """A TensorProto holding `t`'s bytes (bfloat16 too, which NumPy lacks)."""
    from onnx import TensorProto

    t = t.detach().cpu().contiguous()
    p = TensorProto(name=name, data_type=onnx_dtype(t.dtype), dims=list(t.shape))
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    p.raw_data = raw.numpy().tobytes()
    return p


class GraphBuilder:
    """Nodes, initializers and unique value names of one graph."""

    def __init__(self, dtype: torch.dtype):
        self.nodes: list = []
        self.initializers: list = []
        self.dtype = dtype
        self.T = onnx_dtype(dtype)
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           outputs: list[str] | None = None, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        outs = outputs or [self.fresh(f"{(name or op_type).lower()}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name or self.fresh(op_type), domain=domain,
                                           **attrs))
        return outs

    def op1(self, op_type: str, *inputs: str, **attrs) -> str:
        return self.op(op_type, list(inputs), **attrs)[0]

    def weight(self, name: str, t: torch.Tensor) -> str:
        self.initializers.append(tensor_proto(name, t))
        return name

    def const(self, values, dtype: torch.dtype) -> str:
        key = (str(dtype), tuple(np.asarray(values).flatten().tolist()), np.asarray(values).shape)
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("const"), torch.tensor(values, dtype=dtype))
        return self._consts[key]

    def cast(self, x: str, src: torch.dtype, dst: torch.dtype) -> str:
        return x if src == dst else self.op1("Cast", x, to=onnx_dtype(dst))

    # -- the model's pieces -----------------------------------------------------------------
    def linear(self, x: str, name: str, w: torch.Tensor, b: torch.Tensor | None = None) -> str:
        """x @ w.T (+ b): MatMul with w.T stored as the initializer `<name>.weight.T`."""
        y = self.op1("MatMul", x, self.weight(f"{name}.weight.T", w.to(self.dtype).T))
        return y if b is None else self.op1("Add", y, self.weight(f"{name}.bias", b.to(self.dtype)))

    def rms_norm(self, x: str, name: str, weight: torch.Tensor, eps: float) -> str:
        """RMSNorm over the last axis as models.transformer.RMSNorm: float32 math, gain in T."""
        xf = self.cast(x, self.dtype, torch.float32)
        ms = self.op1("ReduceMean", self.op1("Mul", xf, xf), self.const([-1], torch.int64), keepdims=1)
        inv = self.op1("Reciprocal", self.op1("Sqrt", self.op1("Add", ms, self.const(eps, torch.float32))))
        y = self.cast(self.op1("Mul", xf, inv), torch.float32, self.dtype)
        return self.op1("Mul", self.weight(f"{name}.weight", weight.to(self.dtype)), y)

    def rope(self, x: str, cos: str, sin: str) -> str:
        """x * cos + rotate_half(x) * sin; x [N, H, D], cos/sin [N, 1, D]."""
        x1, x2 = self.op("Split", [x], n_out=2, axis=-1, num_outputs=2)
        rot = self.op1("Concat", self.op1("Neg", x2), x1, axis=-1)
        return self.op1("Add", self.op1("Mul", x, cos), self.op1("Mul", rot, sin))

    def plugin(self, spec: PluginSpec, inputs: dict[str, str], outputs: list[str], layer: int,
               fields: dict[str, float | int]) -> list[str]:
        """One plugin node: inputs in the plugin's order, plugin_namespace/version and its fields."""
        attrs = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
        for fname, ftype in spec.fields:
            v = layer if fname == "layer" else fields[fname]
            attrs[fname] = int(v) if ftype == "int32" else float(v)
        return self.op(spec.name, [inputs[n] for n in spec.inputs], outputs=outputs, domain=DOMAIN,
                       name=f"{spec.name}_{layer}", **attrs)


def build_graph(model: "Transformer", surrogate: "Surrogate | None", window: int, threshold: float,
                metadata: dict[str, str] | None = None) -> "onnx.ModelProto":
    """The whole forward as a ModelProto (weights inside; `save` moves them out when large)."""
    from onnx import TensorProto, helper

    cfg = model.cfg
    dtype = model.embed_tokens.weight.dtype
    g = GraphBuilder(dtype)
    L, H, Hq, D, V = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, cfg.vocab_size
    sd = {k: v for k, v in model.state_dict().items()}
    i32, f32 = TensorProto.INT32, TensorProto.FLOAT

    vi = helper.make_tensor_value_info
    cache_shapes = {
        "k_pool": (g.T, ["num_blocks", "block_size", D]), "v_pool": (g.T, ["num_blocks", "block_size", D]),
        "pos_pool": (i32, ["num_blocks", "block_size"]), "score_pool": (f32, ["num_blocks", "block_size"]),
        "block_table": (i32, [L, "max_seqs", H, "max_blocks_per_head"]), "kept_len": (i32, [L, "max_seqs", H]),
        "ring_table": (i32, [L, "max_seqs", H, "ring_pages"]), "free_stack": (i32, ["num_blocks"]),
        "num_free": (i32, [1]), "error": (i32, [1]),
    }
    inputs = [vi("tokens", TensorProto.INT64, ["num_tokens"]), vi("positions", TensorProto.INT64, ["num_tokens"]),
              vi("never_evict", TensorProto.BOOL, ["num_tokens"]), vi("logits_at", TensorProto.INT64, ["batch"]),
              vi("cu_seqlens", i32, ["batch_plus_1"]), vi("seq_slots", i32, ["batch"]), vi("ctx_lens", i32, ["batch"]),
              vi("max_keys", i32, ["max_keys"])]  # a number in a shape: export/plugins.py max_keys_length
    inputs += [vi(n, *cache_shapes[n]) for n in CACHE_TENSORS]

    # Embedding and RoPE tables: cos, sin [N, 1, D] in T, from float32 angles as the model computes them.
    h = g.op1("Gather", g.weight("embed_tokens.weight", sd["embed_tokens.weight"]), "tokens", axis=0)  # [N, d]
    angles = g.op1("Mul", g.op1("Unsqueeze", g.op1("Cast", "positions", to=f32), g.const([1], torch.int64)),
                   g.weight("rope.inv_freq", model.inv_freq.float()[None, :]))  # [N, D/2]
    emb = g.op1("Unsqueeze", g.op1("Concat", angles, angles, axis=-1), g.const([1], torch.int64))  # [N, 1, D]
    cos = g.cast(g.op1("Cos", emb), torch.float32, dtype)
    sin = g.cast(g.op1("Sin", emb), torch.float32, dtype)
    never = g.op1("Unsqueeze", "never_evict", g.const([1], torch.int64))  # [N, 1]
    inf = g.const(float("inf"), torch.float32)

    cache = {n: n for n in CACHE_TENSORS}  # current value name of each cache tensor
    # Types and shapes of the plugins' outputs, which ONNX shape inference cannot know (each has
    # those of the input it follows, as the plugins' getOutputDataTypes): so the types downstream
    # are inferred too (export/trt_support.py reads them).
    typed = []
    batch = {n: n for n in BATCH_TENSORS}
    scale = D**-0.5
    for i in range(L):
        p = f"layers.{i}"
        x = g.rms_norm(h, f"{p}.input_layernorm", sd[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)  # [N, d]
        proj = {}
        for name, heads in (("q", Hq), ("k", H), ("v", H)):
            y = g.linear(x, f"{p}.self_attn.{name}_proj", sd[f"{p}.self_attn.{name}_proj.weight"],
                         sd.get(f"{p}.self_attn.{name}_proj.bias"))
            proj[name] = g.op1("Reshape", y, g.const([-1, heads, D], torch.int64))  # [N, heads, D]
        q, k, v = proj["q"], proj["k"], proj["v"]
        if cfg.qk_norm:
            q = g.rms_norm(q, f"{p}.self_attn.q_norm", sd[f"{p}.self_attn.q_norm.weight"], cfg.rms_norm_eps)
            k = g.rms_norm(k, f"{p}.self_attn.k_norm", sd[f"{p}.self_attn.k_norm.weight"], cfg.rms_norm_eps)
        q, k = g.rope(q, cos, sin), g.rope(k, cos, sin)

        # KVzap scores [N, H] float32 of the hidden state entering self_attn; never-evicted rows +inf.
        if surrogate is None:
            shape = g.op1("Concat", g.op1("Shape", "tokens"), g.const([H], torch.int64), axis=0)
            scores = g.op1("Expand", inf, shape)
        else:
            s = g.linear(x, f"{p}.kvzap.fc", surrogate.w1[i], surrogate.b1[i])
            if surrogate.w2 is not None:
                s = g.linear(g.op1("Gelu", s, approximate="none"), f"{p}.kvzap.proj", surrogate.w2[i],
                             surrogate.b2[i])
            scores = g.op1("Where", never, inf, g.cast(s, dtype, torch.float32))

        attn_out = [f"attn_{i}"] + [f"{n}.attn_{i}" for n in ATTENTION.handed_on]
        ins = {"q": q, "k_new": k, "v_new": v, "scores": scores, "max_keys": "max_keys", **batch, **cache}
        outs = g.plugin(ATTENTION, ins, attn_out, i, {"window": window, "scale": scale})
        cache.update(zip(ATTENTION.handed_on, outs[1:]))
        last = i == L - 1
        evict_out = [f"{n}_out" if last else f"{n}.evict_{i}" for n in EVICT.handed_on]
        outs_e = g.plugin(EVICT, {**ins, **cache}, evict_out, i, {"window": window, "threshold": threshold})
        cache.update(zip(EVICT.handed_on, outs_e))
        typed += [vi(attn_out[0], g.T, ["num_tokens", Hq, D])]
        typed += [vi(o, *cache_shapes[n]) for n, o in (*zip(ATTENTION.handed_on, outs[1:]),
                                                        *zip(EVICT.handed_on, [] if last else outs_e))]

        o = g.op1("Reshape", attn_out[0], g.const([-1, Hq * D], torch.int64))
        h = g.op1("Add", h, g.linear(o, f"{p}.self_attn.o_proj", sd[f"{p}.self_attn.o_proj.weight"]))
        x = g.rms_norm(h, f"{p}.post_attention_layernorm", sd[f"{p}.post_attention_layernorm.weight"],
                       cfg.rms_norm_eps)
        gate = g.linear(x, f"{p}.mlp.gate_proj", sd[f"{p}.mlp.gate_proj.weight"])
        up = g.linear(x, f"{p}.mlp.up_proj", sd[f"{p}.mlp.up_proj.weight"])
        act = g.op1("Mul", g.op1("Mul", gate, g.op1("Sigmoid", gate)), up)  # silu(gate) * up
        h = g.op1("Add", h, g.linear(act, f"{p}.mlp.down_proj", sd[f"{p}.mlp.down_proj.weight"]))

    rows = g.rms_norm(g.op1("Gather", h, "logits_at", axis=0), "norm", sd["norm.weight"], cfg.rms_norm_eps)  # [B, d]
    if cfg.tie_word_embeddings:  # lm_head is the embedding: no second copy of the table
        logits = g.op1("MatMul", rows, g.op1("Transpose", "embed_tokens.weight", perm=[1, 0]))
    else:
        logits = g.linear(rows, "lm_head", sd["lm_head.weight"])
    g.op("Identity" if dtype == torch.float32 else "Cast", [logits], outputs=["logits"],
         **({} if dtype == torch.float32 else {"to": f32}))

    outputs = [vi("logits", f32, ["batch", V])] + [vi(f"{n}_out", *cache_shapes[n]) for n in CACHE_TENSORS]
    graph = helper.make_graph(g.nodes, "kvzap_forward", inputs, outputs, initializer=g.initializers,
                              value_info=typed)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                          producer_name="kvzap-trt")
    m.ir_version = 10  # what onnxruntime >= 1.20 and TensorRT 10.x's parser read
    for key, value in (metadata or {}).items():
        m.metadata_props.add(key=key, value=value)
    return m
