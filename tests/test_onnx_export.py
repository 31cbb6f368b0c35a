"""The exported ONNX graph on ONNX Runtime computes what the PyTorch executor computes: identical
greedy tokens and kept positions under the same engine; its plugin nodes are the TensorRT
plugins' (inputs, outputs, fields as plugins/trt/*/README.md state them)."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch

from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.config import RunConfig
from kvzap_trt.errors import CacheFullError, KvzapError
from kvzap_trt.executors import StepInputs
from kvzap_trt.export.plugins import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, PLUGINS
from kvzap_trt.export.trt_support import element_types, parser_problems
from kvzap_trt.runtime.generate import Runtime
from tests.tiny_models import random_prompts

REPO = Path(__file__).resolve().parents[1]
READMES = {"KvzapVarlenPagedAttention": REPO / "plugins/trt/kvzapVarlenPagedAttentionPlugin/README.md",
           "KvzapEvict": REPO / "plugins/trt/kvzapEvictPlugin/README.md"}

# family, surrogate, window, block size, prompt lengths, new tokens, tau, compress decoding:
# windows below and above the prompts, eviction in prefill and in decoding, batches of 1 to 3.
CASES = [
    ("llama", "linear", 4, 4, (19, 7, 12), 8, 0.0, True),  # window < prompts: prefill and decode evict
    ("qwen3", "mlp", 6, 2, (16, 9), 8, 0.0, True),
    ("llama", "mlp", 8, 4, (5, 7), 12, 0.0, True),  # window > prompts: only decoding evicts
    ("qwen3", "linear", 40, 16, (13,), 6, 0.0, True),  # nothing leaves the window
    ("qwen3", "mlp", 5, 4, (14, 11), 6, 0.0, False),  # kvpress decoding=False
    ("llama", None, 4, 4, (12, 6), 5, 0.0, True),  # dense: no surrogate, nothing evicted
    ("qwen2", "linear", 4, 4, (15, 9), 6, 0.0, True),  # q/k/v biases
]


def runtimes(tiny_dirs, family, surrogate, window, block, tau, compress, executor="onnx"):
    cfg = RunConfig(model=str(tiny_dirs[family]), surrogate=None if surrogate is None else f"random:{surrogate}:3",
                    threshold=tau, window=window, block_size=block, compress_decoding=compress).validate()
    onnx_rt = Runtime.from_config(cfg, executor=executor)
    torch_rt = Runtime(cfg, onnx_rt.loaded, onnx_rt.surrogate)  # the same weights in memory
    return torch_rt, onnx_rt


def prompts(lengths, seed=0):
    return random_prompts(lengths, seed)


@pytest.mark.parametrize("family,surrogate,window,block,lengths,new,tau,compress", CASES,
                         ids=[f"{c[0]}-{c[1]}-w{c[2]}-b{len(c[4])}{'' if c[7] else '-nodecode'}" for c in CASES])
def test_onnx_executor_equals_torch_executor(tiny_dirs, family, surrogate, window, block, lengths, new, tau,
                                             compress):
    torch_rt, onnx_rt = runtimes(tiny_dirs, family, surrogate, window, block, tau, compress)
    ps = prompts(lengths)
    sampling = torch_rt.sampling(max_new_tokens=new, stop_token_ids=())
    want = torch_rt.generate(ps, sampling, positions=True)
    got = onnx_rt.generate(ps, sampling, positions=True)
    for p, w, g in zip(ps, want, got):
        assert g.token_ids == w.token_ids
        assert g.kv == w.kv  # kept positions per (layer, head), counts, bytes held, compression
        tokens = g.kv["tokens"]
        evicted_in_prefill = any(q not in heads for layer in g.kv["positions"] for heads in layer
                                 for q in range(max(0, len(p) - window)))
        evicted_later = any(q not in heads for layer in g.kv["positions"] for heads in layer
                            for q in range(len(p), max(len(p), tokens - window)))
        assert evicted_in_prefill == (surrogate is not None and len(p) > window)
        assert evicted_later == (surrogate is not None and compress and tokens - window > len(p))


def test_onnx_executor_keeps_every_token_of_a_request_that_opts_out(tiny_dirs):
    # evict=False reaches the graph as its never_evict input: the same kv reports as the torch executor's.
    torch_rt, onnx_rt = runtimes(tiny_dirs, "llama", "mlp", 8, 4, 0.0, True)
    ps, sampling = prompts((60, 45, 30), seed=5), torch_rt.sampling(max_new_tokens=12, stop_token_ids=())
    got = []
    for rt in (torch_rt, onnx_rt):
        engine, reqs = rt.start(ps, sampling, positions=True, evict=[True, False, True])
        engine.run()
        got.append([rt.result(r) for r in reqs])
    assert [(g.token_ids, g.kv) for g in got[1]] == [(g.token_ids, g.kv) for g in got[0]]
    assert [g.kv["compression_ratio"] > 0 for g in got[1]] == [True, False, True]


def test_onnx_executor_equals_torch_executor_in_chunks(tiny_dirs):
    # Prompts prefilled in 5-token chunks (max_num_tokens): rows of several new tokens over a
    # compressed cache, beside decode rows, through the graph a TensorRT engine is built from.
    torch_rt, onnx_rt = runtimes(tiny_dirs, "llama", "linear", 4, 4, 0.0, True)
    torch_rt, onnx_rt = (Runtime(replace(rt.cfg, max_num_tokens=5), rt.loaded, rt.surrogate, rt.executor_name)
                         for rt in (torch_rt, onnx_rt))
    ps = prompts((19, 7, 12), seed=1)
    sampling = torch_rt.sampling(max_new_tokens=6, stop_token_ids=())
    want = torch_rt.generate(ps, sampling, positions=True)
    got = onnx_rt.generate(ps, sampling, positions=True)
    assert [(g.token_ids, g.kv) for g in got] == [(w.token_ids, w.kv) for w in want]
    whole = Runtime(replace(torch_rt.cfg, max_num_tokens=None), torch_rt.loaded, torch_rt.surrogate).generate(
        ps, sampling, positions=True)
    assert [w.kv for w in want] != [w.kv for w in whole]  # the chunks really changed what was kept


def test_executor_refuses_other_settings_and_the_cli_runs_an_export(tiny_dirs, tmp_path, capsys):
    import json

    from kvzap_trt.cli import main

    def flags(window):
        return ["--model", str(tiny_dirs["qwen3"]), "--surrogate", "random:linear:3", "--window", str(window),
                "--threshold", "0.1", "--block-size", "4"]

    args = flags(6)
    assert main(["export", *args, "--out", str(tmp_path / "x"), "--external-data"]) == 0
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["export.json", "model.onnx", "model.onnx.data"]
    (tmp_path / "ids.json").write_text("[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]")
    run = ["generate", "--prompt-ids-file", str(tmp_path / "ids.json"), "--max-new-tokens", "5", "--json",
           "--positions"]
    outs = []
    for extra in ([], ["--executor", "onnx", "--onnx", str(tmp_path / "x")]):
        capsys.readouterr()
        assert main([*run, *args, *extra]) == 0
        outs.append(capsys.readouterr().out)
    a, b = (json.loads(o) for o in outs)
    assert (a["token_ids"], a["kv"], a["executor"]) == (b["token_ids"], b["kv"], "torch") and b["executor"] == "onnx"
    assert a["kv"]["compression_ratio"] > 0
    capsys.readouterr()
    assert main([*run, *flags(7), "--executor", "onnx", "--onnx", str(tmp_path / "x")]) == 2
    assert "exported with window 6 (engine: 7)" in capsys.readouterr().err
    assert main([*run, *args, "--onnx", str(tmp_path / "x")]) == 2  # --onnx without --executor onnx
    assert capsys.readouterr().err == "kvzap-trt: error: --onnx needs --executor onnx\n"
    assert main([*run, *args, "--executor", "onnx", "--onnx", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvzap-trt: error: cannot read ONNX model ") and str(tmp_path / "nothing") in err
    assert err.count("\n") == 1, err


def readme_table(text: str, section: str) -> list[list[str]]:
    """Rows (cells) of the first table under `## section`."""
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("|")]
    return [r for r in rows[2:]]  # header and rule dropped


def readme_io(name: str) -> tuple[list[str], list[str], dict[str, str]]:
    """(input names, output names, {field: int32|float32}) from a plugin's README."""
    text = READMES[name].read_text()
    inputs = [r[1] for r in readme_table(text, "Inputs")]
    assert [int(r[0]) for r in readme_table(text, "Inputs")] == list(range(len(inputs)))
    m = re.search(r"Output i \(0\.\.(\d+)\) is input (\d+) \+ i", text)
    if m:  # evict: every output is an aliased input
        n, first = int(m.group(1)) + 1, int(m.group(2))
        outputs = [f"{x}_out" for x in inputs[first:first + n]]
    else:
        outputs = [r[1] for r in readme_table(text, "Outputs")]
    fields = {r[0]: r[1].split()[0] for r in readme_table(text, "Fields (ONNX attributes)")}
    return inputs, outputs, fields


def test_nodes_carry_the_plugins_inputs_outputs_and_fields(tiny_dirs, tmp_path):
    from onnx import AttributeProto

    _, rt = runtimes(tiny_dirs, "qwen3", "mlp", 6, 4, 0.25, True, executor="torch")
    path = rt.export_onnx(tmp_path / "x")
    onnx.checker.check_model(str(path), full_check=True)  # strict shape inference over the standard ops
    m = onnx.load(str(path))
    assert {(o.domain, o.version) for o in m.opset_import} >= {(DOMAIN, 1)}
    graph_inputs = {i.name for i in m.graph.input}
    nodes = [n for n in m.graph.node if n.domain == DOMAIN]
    L = rt.loaded.config.num_layers
    assert [n.op_type for n in nodes] == ["KvzapVarlenPagedAttention", "KvzapEvict"] * L
    for i, node in enumerate(nodes):
        inputs, outputs, fields = readme_io(node.op_type)
        spec = PLUGINS[node.op_type]
        assert (list(spec.inputs), list(spec.outputs)) == (inputs, outputs)
        assert (len(node.input), len(node.output)) == (len(inputs), len(outputs))
        # Inputs that are graph inputs sit at the README's position (cache tensors: at layer 0).
        for pos, name in enumerate(inputs):
            if name in graph_inputs and (i == 0 or name in ("cu_seqlens", "seq_slots", "ctx_lens")):
                assert node.input[pos] == name, (node.name, pos, name)
        attrs = {a.name: a for a in node.attribute}
        assert set(attrs) == {"plugin_namespace", "plugin_version", *fields}
        assert (attrs["plugin_namespace"].s.decode(), attrs["plugin_version"].s.decode()) == (PLUGIN_NAMESPACE,
                                                                                          PLUGIN_VERSION)
        for fname, ftype in fields.items():
            assert attrs[fname].type == {"int32": AttributeProto.INT, "float32": AttributeProto.FLOAT}[ftype]
        assert attrs["layer"].i == i // 2 and attrs["window"].i == 6
        assert attrs.get("threshold", attrs.get("scale")).f == pytest.approx(
            0.25 if node.op_type == "KvzapEvict" else 16**-0.5)
    # The MLP surrogate's GELU is the exact (erf) one, as F.gelu in ops/surrogate_score.py: a tanh
    # GELU moves scores by ~1e-4, below what the decision tests above can see with random weights.
    gelus = [n for n in m.graph.node if n.op_type == "Gelu"]
    assert len(gelus) == L and all(a.s == b"none" for n in gelus for a in n.attribute if a.name == "approximate")
    # The cache is a chain: every aliased output is the next node's input at the aliased position,
    # and the last evict node's outputs are the graph's cache outputs.
    for a, b in zip(nodes, nodes[1:]):
        spec_a, spec_b = PLUGINS[a.op_type], PLUGINS[b.op_type]
        for out_idx, in_idx in spec_a.aliased.items():
            name = spec_a.inputs[in_idx]
            if name in spec_b.inputs:
                assert b.input[spec_b.inputs.index(name)] == a.output[out_idx]
    assert [o.name for o in m.graph.output][1:] == list(nodes[-1].output)


@pytest.mark.parametrize("family,surrogate,dtype", [("qwen3", "mlp", "bfloat16"), ("llama", "linear", "float16"),
                                                    ("qwen2", "linear", "float32"), ("llama", None, "bfloat16")])
def test_exported_graph_stays_within_tensorrts_onnx_parser_support(tiny_dirs, tmp_path, family, surrogate, dtype):
    cfg = RunConfig(model=str(tiny_dirs[family]), surrogate=surrogate and f"random:{surrogate}:3", threshold=0.25,
                    window=6, block_size=4, dtype=dtype).validate()
    rt = Runtime.from_config(cfg)
    assert rt.loaded.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    m = onnx.load(str(rt.export_onnx(tmp_path / "x")))
    assert parser_problems(m) == []
    types = element_types(m)
    assert all(o in types for n in m.graph.node for o in n.output)  # past the plugins too (their value_info)
    T = {"bfloat16": "BFLOAT16", "float16": "FLOAT16", "float32": "FLOAT"}[dtype]
    want = {"T": T, "int32": "INT32", "float32": "FLOAT"}
    for node in (n for n in m.graph.node if n.domain == DOMAIN):
        rows = readme_table(READMES[node.op_type].read_text(), "Inputs")
        # The dtypes each plugin's README states for its inputs (T: the model's), as the export feeds them.
        assert [types[x] for x in node.input] == [want[r[3].split()[0]] for r in rows], node.name
        spec = PLUGINS[node.op_type]
        assert [types[x] for x in node.output] == [types[node.input[spec.aliased.get(o, 0)]] for o in
                                                   range(len(node.output))]


def test_parser_problems_name_what_tensorrt_would_refuse():
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Add", ["d", "d"], ["d2"], name="add_double"),  # DOUBLE: not a parser type
             helper.make_node("Shape", ["x"], ["axes"], name="shape"),
             helper.make_node("ReduceMean", ["x", "axes"], ["m"], name="mean_axes_computed"),
             helper.make_node("BitShift", ["u", "u"], ["u2"], name="shift", direction="LEFT"),  # not supported
             helper.make_node("FusedMatMul", ["x", "x"], ["y"], name="ms", domain="com.microsoft"),  # not ONNX's
             helper.make_node("ConstantOfShape", ["axes"], ["z"], name="zeros_double",
                              value=helper.make_tensor("v", TensorProto.DOUBLE, [1], [0.0])),
             helper.make_node("Mul", ["x", "x"], ["x2"], name="fine")]
    graph = helper.make_graph(nodes, "g", [vi("d", TensorProto.DOUBLE, [2]), vi("x", TensorProto.FLOAT, [2]),
                                           vi("u", TensorProto.UINT32, [2])],
                              [vi(n, t, None) for n, t in (("d2", TensorProto.DOUBLE), ("m", TensorProto.FLOAT),
                                                          ("u2", TensorProto.UINT32), ("y", TensorProto.FLOAT),
                                                          ("z", TensorProto.DOUBLE), ("x2", TensorProto.FLOAT))])
    problems = parser_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                                        helper.make_opsetid("com.microsoft", 1)]))
    assert len(problems) == 5, problems  # one line for the Add's input used twice
    assert problems[0] == "add_double (Add): 'd' is DOUBLE; the parser takes BFLOAT16, FLOAT, FLOAT16, INT32, INT64"
    assert problems[1] == "mean_axes_computed (ReduceMean): input 1 ('axes') must be a constant for TensorRT's parser"
    assert problems[2].startswith("shift (BitShift): op not in TensorRT's ONNX parser support table")
    assert problems[3] == "ms (FusedMatMul): domain 'com.microsoft' is not ONNX's: TensorRT's parser would need a " \
        "plugin named FusedMatMul"
    assert problems[4].startswith("zeros_double (ConstantOfShape): 'z' is DOUBLE")
    later = helper.make_model(helper.make_graph(nodes[-1:], "g", [vi("x", TensorProto.FLOAT, [2])],
                                                [vi("x2", TensorProto.FLOAT, [2])]),
                              opset_imports=[helper.make_opsetid("", 23)])
    assert parser_problems(later) == ["opset 23: TensorRT's parser reads opsets 9-20"]


def test_full_pool_raises_after_the_step(tiny_dirs):
    """The evict binding ORs the kernel's error bit; the executor raises CacheFullError as the kernels' wrapper does."""
    _, rt = runtimes(tiny_dirs, "llama", "linear", 2, 2, -1e9, True)  # every leaver kept
    ex = rt.executor()
    cfg = rt.loaded.config
    spec = CacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, window=2, block_size=2, num_blocks=6, max_seqs=1,
                     max_seq_len=64)
    cache = PagedKVCache(spec)
    slot = cache.add_sequence()
    n = 9
    step = StepInputs(tokens=torch.arange(n), positions=torch.arange(n), never_evict=torch.zeros(n, dtype=torch.bool),
                      never_all=False, cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                      seq_slots=torch.tensor([slot], dtype=torch.int32), ctx_lens=torch.tensor([0], dtype=torch.int32),
                      logits_at=torch.tensor([n - 1]))
    with pytest.raises(CacheFullError, match="pool exhausted"):
        ex.forward(step, cache)


def test_attention_flags_a_max_keys_input_shorter_than_a_rows_keys(tiny_dirs, monkeypatch):
    """The attention binding checks the contract of the bound carried in max_keys' length: a
    fresh 9-token prompt's last row sees 9 keys, so a length of 8 raises KernelBoundError after the
    step, 9 does not. The executors pass export.plugins.step_max_keys (>= 9 here)."""
    from kvzap_trt.executors import onnx_executor
    from kvzap_trt.ops.cuda_kernels import KernelBoundError

    _, rt = runtimes(tiny_dirs, "llama", "linear", 4, 4, 0.0, True)
    ex = rt.executor()
    cfg = rt.loaded.config
    n = 9

    def step_on_fresh_cache():
        spec = CacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, window=4, block_size=4, num_blocks=64,
                         max_seqs=1, max_seq_len=64)
        cache = PagedKVCache(spec)
        slot = cache.add_sequence()
        return cache, StepInputs(
            tokens=torch.arange(n), positions=torch.arange(n), never_evict=torch.zeros(n, dtype=torch.bool),
            never_all=False, cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            seq_slots=torch.tensor([slot], dtype=torch.int32), ctx_lens=torch.tensor([0], dtype=torch.int32),
            logits_at=torch.tensor([n - 1]))

    cache, step = step_on_fresh_cache()
    assert onnx_executor.step_max_keys(step, cache) >= n
    for length, fails in ((n - 1, True), (n, False)):
        monkeypatch.setattr(onnx_executor, "step_max_keys", lambda step, cache, length=length: length)
        cache, step = step_on_fresh_cache()
        if fails:
            with pytest.raises(KernelBoundError):
                ex.forward(step, cache)
        else:
            assert ex.forward(step, cache).shape == (1, cfg.vocab_size)


def test_clear_error_without_onnxruntime(monkeypatch):
    from kvzap_trt.executors.ort_ops import import_ort

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it shows
    with pytest.raises(KvzapError, match="needs onnxruntime"):
        import_ort()


@pytest.mark.slow
def test_smollm2_onnx_equals_torch(smollm2_dir):
    t0 = time.monotonic()
    cfg = RunConfig(model=str(smollm2_dir), surrogate="random:mlp:7", threshold=0.0, window=4).validate()
    onnx_rt = Runtime.from_config(cfg, executor="onnx")
    torch_rt = Runtime(cfg, onnx_rt.loaded, onnx_rt.surrogate)
    prompt = onnx_rt.encode("The capital of France is")
    sampling = torch_rt.sampling(max_new_tokens=3, stop_token_ids=())
    want, got = (rt.generate([prompt], sampling, positions=True)[0] for rt in (torch_rt, onnx_rt))
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.kv == want.kv and got.kv["compression_ratio"] > 0
    assert time.monotonic() - t0 < 120  # ~40 s here on 2 busy cores; the bound catches a runaway


def test_the_serving_loop_runs_the_runtimes_executor(tiny_dirs):
    """EngineLoop.from_runtime (the Triton core model's and the OpenAI front's engine) takes the
    runtime's executor: the exported graph when the runtime names onnx, PyTorch otherwise."""
    from kvzap_trt.serve.engine_loop import EngineLoop

    torch_rt, onnx_rt = runtimes(tiny_dirs, "qwen3", "linear", 8, 4, 0.0, True)
    assert EngineLoop.from_runtime(onnx_rt).engine.executor is onnx_rt.executor()
    assert EngineLoop.from_runtime(onnx_rt).engine.executor.name == "onnx"
    assert EngineLoop.from_runtime(torch_rt).engine.executor.name == "torch"
