"""The TensorRT executor: what can be checked without TensorRT (the binding plan, the profiles, the
clear errors) against a real exported graph and real engine steps; the rest is marked `tensorrt`
(skipped where the tensorrt package or a GPU is absent: nothing here fakes either)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from kvzap_trt.cli import main
from kvzap_trt.config import RunConfig
from kvzap_trt.errors import KvzapError
from kvzap_trt.executors.trt_executor import (
    binding_plan,
    cache_state,
    check_bindings,
    check_cache,
    step_feeds,
)
from kvzap_trt.export import check_policy, load_exported
from kvzap_trt.export.plugins import CACHE_TENSORS, step_max_keys
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.trt.profiles import (
    CacheBounds,
    EngineLimits,
    cache_bounds,
    dim_ranges,
    engine_profiles,
    graph_inputs,
    profile_shapes,
    prompt_tokens_per_step,
    select_profile,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
ONNX_TO_TORCH = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 6: torch.int32, 7: torch.int64, 9: torch.bool}


@pytest.fixture(autouse=True)
def _skip_tensorrt_tests_without_it(request):
    if request.node.get_closest_marker("tensorrt") and not (HAS_TENSORRT and torch.cuda.is_available()):
        pytest.skip("needs the tensorrt package and a CUDA device")


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory):
    """(runtime, model.onnx, [StepInputs of a real run], the cache they ran on): a tiny Qwen3 with
    an MLP surrogate, window 6, block 4, two prompts and decode steps."""
    cfg = RunConfig(model=str(tiny_dirs["qwen3"]), surrogate="random:mlp:3", threshold=0.25, window=6, block_size=4,
                    max_new_tokens=4)
    rt = Runtime.from_config(cfg)
    path = rt.export_onnx(tmp_path_factory.mktemp("trt") / "onnx")
    engine, _ = rt.start([[3, 5, 7, 11, 13, 17, 19, 23, 29], [2, 4, 6]])
    steps, inner = [], engine.executor

    class Recorder:  # runs the PyTorch executor, keeps each step's inputs
        name = "recorder"

        def forward(self, step, cache):
            steps.append(step)
            return inner.forward(step, cache)

    engine.executor = Recorder()
    engine.run()
    return rt, path, steps, engine.cache


def graph_io(path):
    m, meta = load_exported(path)
    types = {v.name: ONNX_TO_TORCH[v.type.tensor_type.elem_type] for v in [*m.graph.input, *m.graph.output]}
    return [i.name for i in m.graph.input], [o.name for o in m.graph.output], types, meta


def test_binding_plan_binds_every_graph_name_and_aliases_the_cache(exported):
    rt, path, steps, cache = exported
    ins, outs, types, meta = graph_io(path)
    error = torch.zeros(1, dtype=torch.int32)
    assert len(steps) >= 4 and steps[0].tokens.numel() == 12 and steps[1].tokens.numel() == 2  # prefill, then decode
    for step in steps:
        B = step.seq_slots.numel()
        logits = torch.empty(B, meta["model"]["vocab_size"])
        inputs, outputs = binding_plan(ins, outs, {**step_feeds(step, "cpu", step_max_keys(step, cache)), **cache_state(cache, error)}, logits)
        assert list(inputs) == ins and list(outputs) == outs
        for name in CACHE_TENSORS:  # same tensor, same address: what the aliased plugin outputs need
            assert outputs[f"{name}_out"] is inputs[name]
            if hasattr(cache, name):
                assert inputs[name] is getattr(cache, name)
        assert inputs["free_stack"] is cache.allocator.free_stack and inputs["num_free"] is cache.allocator.num_free_t
        assert inputs["error"] is error and outputs["logits"] is logits
        check_bindings(types, {**inputs, **outputs})  # the graph's types, contiguous
        assert inputs["cu_seqlens"].shape == (B + 1,) and inputs["tokens"].shape == (int(step.cu_seqlens[-1]),)


def test_binding_plan_refuses_what_does_not_match(exported):
    rt, path, steps, cache = exported
    ins, outs, types, _ = graph_io(path)
    tensors = {**step_feeds(steps[1], "cpu", step_max_keys(steps[1], cache)), **cache_state(cache, torch.zeros(1, dtype=torch.int32))}
    logits = torch.empty(2, 160)
    with pytest.raises(KvzapError, match="does not provide: never_evict"):
        binding_plan(ins, outs, {k: v for k, v in tensors.items() if k != "never_evict"}, logits)
    with pytest.raises(KvzapError, match="lacks inputs the executor provides: stray"):
        binding_plan(ins, outs, {**tensors, "stray": logits}, logits)
    with pytest.raises(KvzapError, match="output 'hidden'"):
        binding_plan(ins, [*outs, "hidden"], tensors, logits)
    with pytest.raises(KvzapError, match="lacks outputs: kept_len_out"):
        binding_plan(ins, [o for o in outs if o != "kept_len_out"], tensors, logits)
    inputs, outputs = binding_plan(ins, outs, tensors, logits)
    with pytest.raises(KvzapError, match="tokens is int32, the engine takes int64"):
        check_bindings(types, {**inputs, "tokens": inputs["tokens"].int()})
    with pytest.raises(KvzapError, match="k_pool is not contiguous"):
        check_bindings(types, {**inputs, "k_pool": inputs["k_pool"].transpose(1, 2)})


def test_profiles_cover_the_graph_and_pick_decode_or_prefill(exported):
    rt, path, steps, cache = exported
    spec = cache.spec
    limits = EngineLimits(max_seqs=4, max_num_tokens=64, max_seq_len=spec.max_seq_len, block_size=spec.block_size,
                          window=spec.window, num_blocks=spec.num_blocks)
    inputs = graph_inputs(path)
    profiles = engine_profiles(inputs, limits)
    assert [n for n, _ in profiles] == ["decode", "prefill"]
    for _, shapes in profiles:
        assert set(shapes) == set(inputs)
        for name, (lo, opt, hi) in shapes.items():
            assert len(lo) == len(inputs[name])
            assert all(a <= o <= b for a, o, b in zip(lo, opt, hi)), name
            assert all(a == b == d for a, b, d in zip(lo, hi, inputs[name]) if isinstance(d, int)), name
    decode, prefill = (s for _, s in profiles)
    assert decode["tokens"][2] == (4,) and prefill["tokens"][2] == (64 + 4,)  # a 64-token chunk and 4 decodes
    assert decode["ring_table"][0][3] == decode["ring_table"][2][3] == spec.ring_pages  # fixed: W and bs are build settings
    assert decode["block_table"][2] == (3, 4, 4, spec.max_blocks_per_head)
    capacity = spec.max_blocks_per_head * spec.block_size + spec.window  # + N: the plugin's own bound
    assert decode["max_keys"][0] == (1,) and decode["max_keys"][2] == (capacity + 4,)
    assert prefill["max_keys"][2] == (capacity + 64 + 4,)
    # The scheduler's chunk, read back from the profiles: T; T - S for an engine whose prefill
    # profile stops at T; none for one that cannot hold a chunk beside a full batch.
    assert prompt_tokens_per_step([decode, prefill]) == 64
    short = {**prefill, "tokens": (prefill["tokens"][0], prefill["tokens"][1], (64,))}
    assert prompt_tokens_per_step([decode, short]) == 60
    with pytest.raises(KvzapError, match="no prompt token beside a full batch"):
        prompt_tokens_per_step([decode])
    error = torch.zeros(1, dtype=torch.int32)
    ins, outs, *_ = graph_io(path)
    picked = []
    for step in steps:
        feeds = step_feeds(step, "cpu", step_max_keys(step, cache))
        inputs_, _ = binding_plan(ins, outs, {**feeds, **cache_state(cache, error)}, torch.empty(step.seq_slots.numel(), 160))
        picked.append(select_profile([decode, prefill], {n: tuple(t.shape) for n, t in inputs_.items()}))
    assert picked[0] == 1 and set(picked[1:]) == {0}  # the 12-token prefill step, then decode steps
    feeds = step_feeds(steps[1], "cpu", step_max_keys(steps[1], cache))
    inputs_, _ = binding_plan(ins, outs, {**feeds, **cache_state(cache, error)}, torch.empty(2, 160))
    shapes = {n: tuple(t.shape) for n, t in inputs_.items()}  # a decode step of 2 sequences
    one_seq = profile_shapes(inputs, dim_ranges(EngineLimits(1, 8, spec.max_seq_len, spec.block_size, spec.window,
                                                             spec.num_blocks))["decode"])
    with pytest.raises(KvzapError, match=r"tokens dim 0 is 2, outside the engine's range \[1, 1\]"):
        select_profile([one_seq], shapes)
    with pytest.raises(KvzapError, match=r"tokens dim 0 is 69, outside the engine's range \[1, 68\]"):
        select_profile([decode, prefill], {**shapes, "tokens": (69,)})
    with pytest.raises(KvzapError, match="dimension 'mystery'"):
        profile_shapes({"x": ["mystery"]}, {})


def test_cache_bounds_read_back_from_the_profiles_are_the_build_limits(exported):
    rt, path, steps, cache = exported
    limits = EngineLimits(max_seqs=3, max_num_tokens=64, max_seq_len=30, block_size=4, window=6, num_blocks=500)
    bounds = cache_bounds([s for _, s in engine_profiles(graph_inputs(path), limits)])
    assert bounds == CacheBounds(num_blocks=500, max_seqs=3, max_blocks_per_head=8, block_size=4)
    assert bounds.max_seq_len == 32  # 30 rounded up to whole blocks: what the block table holds
    # opt of the pool and the block table is small (the builder may allocate inputs at opt)
    big = EngineLimits(max_seqs=3, max_num_tokens=64, max_seq_len=40960, block_size=16, window=128, num_blocks=90000)
    for _, shapes in engine_profiles(graph_inputs(path), big):
        assert shapes["k_pool"][1][0] == 256 and shapes["k_pool"][2][0] == 90000
        assert shapes["block_table"][1][3] == 256 and shapes["block_table"][2][3] == 2560


def test_runtimes_size_their_cache_within_an_engines_bounds(exported):
    """What `generate --executor tensorrt` and serving do with an engine's bounds (`cache_bounds`,
    a TrtExecutor attribute), shown with the PyTorch executor carrying bounds: a pool sized for
    every prompt uncompressed is cut to the engine's, prompts beyond its slots wait their turn,
    sequences past its context are refused saying why, and a server asking for more than the
    engine holds is refused at start."""
    from kvzap_trt.executors.torch_executor import TorchExecutor
    from kvzap_trt.serve.engine_loop import EngineLoop

    rt = Runtime.from_config(exported[0].cfg)
    prompts = [[3, 5, 7, 11, 13, 17, 19, 23, 29], [2, 4, 6], [8, 9, 10, 11]]
    want = [r.token_ids for r in rt.generate(prompts)]
    spec = rt.start(prompts)[0].cache.spec
    ex = TorchExecutor(rt.loaded.model, rt.surrogate, rt.cfg.threshold, "cpu")
    ex.cache_bounds = CacheBounds(num_blocks=spec.num_blocks // 2, max_seqs=2, max_blocks_per_head=4, block_size=4)
    rt.executor = lambda: ex
    engine, reqs = rt.start(prompts)
    assert (engine.cache.spec.num_blocks, engine.cache.spec.max_seqs) == (spec.num_blocks // 2, 2)
    engine.run()
    assert [r.output_ids for r in reqs] == want  # the same tokens, two slots and half the pool
    assert rt.context_limit()[0] == 16
    with pytest.raises(KvzapError, match=r"prompt has 17 tokens, the maximum is 16 \(the engine's: its block tables "
                                         r"hold 16 tokens\)"):
        rt.start([[1] * 17])
    rt.cfg = dataclasses.replace(rt.cfg, max_seqs=4)
    with pytest.raises(KvzapError, match=r"--max-seqs 4 exceed the engine's \d+ blocks and 2 slots"):
        EngineLoop.from_runtime(rt)


def test_check_cache_and_policy(exported):
    rt, path, steps, cache = exported
    _, _, _, meta = graph_io(path)
    with pytest.raises(KvzapError, match="runs on CUDA"):
        check_cache(meta, cache.spec, cache.device)
    with pytest.raises(KvzapError, match="engine is bfloat16, the cache float32"):
        check_cache({**meta, "dtype": "bfloat16"}, cache.spec, torch.device("cuda"))
    with pytest.raises(KvzapError, match=r"does not fit the engine's \(3, 4, 16, 7\)"):
        check_cache({**meta, "window": 7}, cache.spec, torch.device("cuda"))
    check_cache(meta, cache.spec, torch.device("cuda"))  # the device type alone: no GPU touched
    check_policy(meta, path, 6, 0.25, rt.surrogate)
    with pytest.raises(KvzapError, match="exported with window 6 .engine: 8."):
        check_policy(meta, path, 8, 0.25, rt.surrogate)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the error below is for machines without it")
def test_generate_with_tensorrt_executor_says_what_is_missing(tiny_dirs, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text("[1, 2, 3]")
    base = ["generate", "--model", str(tiny_dirs["qwen3"]), "--prompt-ids-file", str(ids)]
    assert main([*base, "--executor", "tensorrt", "--engine-file", str(tmp_path / "engine")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TensorRT is not available: `import tensorrt` failed" in err[0]
    assert main([*base, "--executor", "tensorrt"]) == 2
    assert "--executor tensorrt needs --engine-file" in capsys.readouterr().err
    assert main([*base, "--engine-file", str(tmp_path)]) == 2
    assert "--engine-file and --plugin-lib need --executor tensorrt" in capsys.readouterr().err
    from kvzap_trt.executors.trt_executor import TrtExecutor

    with pytest.raises(KvzapError, match="import tensorrt"):
        TrtExecutor(tmp_path, None, 6, 0.25, None)


@pytest.mark.tensorrt
def test_tensorrt_engine_gives_the_torch_executors_tokens(tiny_dirs, tmp_path):
    """Build an engine from the tiny export with the plugin library and generate with it: the
    greedy tokens and kept positions equal the PyTorch executor's (float32, on the GPU)."""
    from kvzap_trt.trt import default_plugin_lib
    from kvzap_trt.trt.build import build_engine

    lib = default_plugin_lib()
    if not lib.is_file():
        pytest.skip(f"no plugin library at {lib} (cmake -DKVZAP_TRT_PLUGINS=ON, plugins/README.md)")
    cfg = RunConfig(model=str(tiny_dirs["qwen3"]), surrogate="random:mlp:3", threshold=0.25, window=6, block_size=4,
                    max_new_tokens=6, device="cuda")
    torch_rt = Runtime.from_config(cfg)
    path = torch_rt.export_onnx(tmp_path / "onnx")
    from kvzap_trt.export import read_metadata

    limits = EngineLimits(max_seqs=4, max_num_tokens=256, max_seq_len=1024, block_size=4, window=6, num_blocks=4096)
    plan = build_engine(path, lib, tmp_path / "engine", limits, read_metadata(path))
    trt_rt = Runtime.from_config(cfg, executor="tensorrt", engine_file=plan)
    prompts = [[3, 5, 7, 11, 13, 17, 19, 23, 29], [2, 4, 6]]
    want = torch_rt.generate(prompts, positions=True)
    got = trt_rt.generate(prompts, positions=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.kv["positions"] for r in got] == [r.kv["positions"] for r in want]


def test_step_feeds_refuse_a_sequence_without_new_tokens(exported):
    """The evict plugin bounds a sequence's new tokens by N - B + 1 (1 at decode, its warp-per-head
    kernel): a sequence with none would make another's count exceed it, so it is refused here."""
    from dataclasses import replace

    decode = exported[2][1]
    assert decode.cu_seqlens.tolist() == [0, 1, 2]
    idle = replace(decode, cu_seqlens=torch.tensor([0, 0, 2], dtype=torch.int32))  # same rows, one sequence idle
    with pytest.raises(KvzapError, match=r"sequences \[0\] of the step have no new token"):
        step_feeds(idle, "cpu", 1)
    assert step_feeds(decode, "cpu", 1)["cu_seqlens"].tolist() == [0, 1, 2]
