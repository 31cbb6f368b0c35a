"""Load a model + surrogate from a resolved `RunConfig` and generate for several prompts at once."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.config import RunConfig
from kvzap_trt.errors import KvzapError
from kvzap_trt.executors import EXECUTORS, Executor
from kvzap_trt.kvcoe.embedding import KVEmbedding
from kvzap_trt.kvcoe.reasoning import FastSlow, Reasoning
from kvzap_trt.models.loading import TORCH_DTYPES, LoadedModel, load_model, resolve_model_dir
from kvzap_trt.runtime.engine import Engine, EvictionPolicy
from kvzap_trt.runtime.sampler import SamplingParams
from kvzap_trt.runtime.scheduler import Request
from kvzap_trt.surrogate import Surrogate, load_surrogate


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    prompt_tokens: int
    finish_reason: str
    kv: dict[str, Any]
    kv_coe: dict[str, float | None] | None = None  # KV-CoE features when asked (kvzap_trt/kvcoe/coe.py)
    reasoning: str | None = None  # "fast" | "slow" when the request asked for a reasoning mode
    reasoning_p_slow: float | None = None  # the probe's P(slow), with reasoning "auto"


class Runtime:
    """A loaded model, its surrogate and tokenizer, ready to generate under `cfg`.

    executor: "torch" (our PyTorch forward) or "onnx" (the exported graph on ONNX Runtime, CPU);
    onnx_model: the `model.onnx` (or its directory) of `kvzap-trt export` for the ONNX executor;
    None exports this runtime's model once, into a temporary directory.
    engine_file, plugin_lib: the TensorRT executor's engine (model.plan or its directory, from
    `kvzap-trt build --engine tensorrt`) and plugin library (default: $KVZAP_TRT_PLUGIN_LIB).
    """

    def __init__(self, cfg: RunConfig, loaded: LoadedModel, surrogate: Surrogate | None, executor: str = "torch",
                 onnx_model: Path | None = None, engine_file: Path | None = None, plugin_lib: Path | None = None):
        if executor not in EXECUTORS:
            raise KvzapError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        if onnx_model is not None and executor != "onnx":
            raise KvzapError("an ONNX model was given but the executor is not onnx")
        if engine_file is not None and executor != "tensorrt":
            raise KvzapError("a TensorRT engine was given but the executor is not tensorrt")
        if executor == "tensorrt" and engine_file is None:
            raise KvzapError("the TensorRT executor needs an engine (--engine-file, from `kvzap-trt build --engine tensorrt`)")
        self.engine_file, self.plugin_lib = engine_file, plugin_lib
        self.cfg, self.loaded, self.surrogate = cfg, loaded, surrogate
        self.executor_name, self.onnx_model = executor, onnx_model
        self._executor: Executor | None = None
        self._export_dir: tempfile.TemporaryDirectory | None = None
        self._fast_slow: FastSlow | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, executor: str = "torch", onnx_model: Path | None = None,
                    engine_file: Path | None = None, plugin_lib: Path | None = None) -> "Runtime":
        if executor == "tensorrt":  # say so before loading a model it cannot run
            from kvzap_trt.trt import import_tensorrt

            import_tensorrt()
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise KvzapError("--device cuda was asked for but PyTorch sees no CUDA device")
        model_dir = resolve_model_dir(cfg.model)
        loaded = load_model(model_dir, cfg.dtype, cfg.device)
        surrogate = loaded.surrogate  # a converted checkpoint carries its own
        if cfg.surrogate is not None:
            surrogate = load_surrogate(cfg.surrogate, loaded.config, f"model {cfg.preset or cfg.model}")
            if cfg.surrogate_kind is not None and surrogate.kind != cfg.surrogate_kind:
                raise KvzapError(f"surrogate {cfg.surrogate} is {surrogate.kind}, the config says {cfg.surrogate_kind}")
        if surrogate is not None:
            surrogate = surrogate.to(cfg.device)
        return cls(cfg, loaded, surrogate, executor, onnx_model, engine_file, plugin_lib)

    def export_onnx(self, out: Path, external_data: bool | None = None) -> Path:
        """This runtime's model, surrogate, window and threshold as an ONNX graph in `out` -> model.onnx."""
        from kvzap_trt.export import export_onnx

        source = {"model": self.cfg.preset or self.cfg.model, "config": self.cfg.to_dict()}
        return export_onnx(self.loaded.model, self.surrogate, self.cfg.window, self.cfg.threshold, out,
                           external_data, source)

    def executor(self) -> Executor | None:
        """The executor engines of this runtime run (None: the engine's default, PyTorch); the ONNX
        one is built once (export and ONNX Runtime session) and shared by every engine."""
        if self.executor_name == "torch":
            return None
        if self._executor is None and self.executor_name == "tensorrt":
            from kvzap_trt.executors.trt_executor import TrtExecutor

            self._executor = TrtExecutor(self.engine_file, self.plugin_lib, self.cfg.window, self.cfg.threshold,
                                         self.surrogate, self.cfg.device)
        if self._executor is None:
            from kvzap_trt.executors.onnx_executor import OnnxExecutor

            if self.cfg.dtype != "float32":
                raise KvzapError(f"the ONNX executor runs float32 graphs, not {self.cfg.dtype}: run with --dtype float32")
            path = self.onnx_model
            if path is None:
                # Weights in model.onnx.data: the executor then re-serialises only the graph.
                self._export_dir = tempfile.TemporaryDirectory(prefix="kvzap-onnx-")
                path = self.export_onnx(Path(self._export_dir.name) / "export", external_data=True)
            elif Path(path).is_dir():
                path = Path(path) / "model.onnx"
            self._executor = OnnxExecutor(path, self.cfg.window, self.cfg.threshold, self.surrogate)
        return self._executor

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def stop_token_ids(self) -> tuple[int, ...]:
        ids = set(self.loaded.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def sampling(self, **overrides: Any) -> SamplingParams:
        c = self.cfg
        p = dict(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                 seed=c.seed, stop_token_ids=self.stop_token_ids())
        p.update(overrides)
        return SamplingParams(**p)

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise KvzapError(f"model {self.loaded.model_dir} has no tokenizer: pass --prompt-ids-file")
        if chat:
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                           add_generation_prompt=True, tokenize=True, return_dict=False))
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def reasoning(self, mode: str | None) -> Reasoning | None:
        """The request option `reasoning` ("auto" | "fast" | "slow" | None: off) as the engine applies
        it; the probe (config `probe`) and the think block are read once (kvzap_trt/kvcoe/reasoning.py)."""
        if mode is None:
            return None
        if self._fast_slow is None:
            self._fast_slow = FastSlow.from_runtime(self)
        return self._fast_slow.plan(mode)

    def context_limit(self) -> tuple[int, str]:
        """(the longest sequence, prompt and output, this runtime serves; why, for messages): the
        model's context, or a TensorRT engine's where it was built for less (`--max-seq-len`)."""
        m = self.loaded.config
        bounds = getattr(self.executor(), "cache_bounds", None)
        if bounds is not None and bounds.max_seq_len < m.max_position_embeddings:
            return bounds.max_seq_len, f" (the engine's: its block tables hold {bounds.max_seq_len} tokens)"
        return m.max_position_embeddings, m.context_note

    def make_cache(self, max_seq_len: int, max_seqs: int, num_blocks: int) -> PagedKVCache:
        m = self.loaded.config
        spec = CacheSpec(m.num_layers, m.num_kv_heads, m.head_dim, self.cfg.window, self.cfg.block_size,
                         num_blocks, max_seqs, max_seq_len, TORCH_DTYPES[self.cfg.dtype])
        return PagedKVCache(spec, self.cfg.device)

    def start(self, prompts: list[list[int]], sampling: SamplingParams | None = None,
              positions: bool = False, embedding: bool | KVEmbedding = False,
              kv_coe: bool = False, reasoning: str | None = None,
              evict: list[bool] | None = None) -> tuple[Engine, list[Request]]:
        """An engine holding `prompts`, not yet stepped, in a pool that holds them all uncompressed.
        evict: per prompt, False keeps every token of it (`Request.evict`); default all True.

        `generate` runs it to the end; a caller that times steps (scripts/bench_cpu.py: time to
        first token) calls `engine.step()` itself, then `result(r)` for each request.
        """
        if evict is not None and len(evict) != len(prompts):
            raise KvzapError(f"evict has {len(evict)} entries for {len(prompts)} prompts")
        sampling = sampling or self.sampling()
        m = self.loaded.config
        max_seq_len, why = self.context_limit()
        for p in prompts:
            if len(p) > max_seq_len:
                raise KvzapError(f"prompt has {len(p)} tokens, the maximum is {max_seq_len}{why}")
        lens = [min(len(p) + sampling.max_new_tokens, max_seq_len) for p in prompts]
        heads = m.num_layers * m.num_kv_heads
        num_blocks = sum(heads * (math.ceil(n / self.cfg.block_size) + 1) for n in lens)
        max_seqs, executor = len(prompts), self.executor()
        bounds = getattr(executor, "cache_bounds", None)
        if bounds is not None:  # an engine's pool and slots: eviction or queueing handles the rest
            num_blocks, max_seqs = min(num_blocks, bounds.num_blocks), min(max_seqs, bounds.max_seqs)
        cache = self.make_cache(max(lens), max_seqs, num_blocks)
        policy = EvictionPolicy(self.surrogate, self.cfg.threshold, self.cfg.compress_decoding)
        engine = Engine(self.loaded.model, cache, policy, max_seq_len, record_positions=positions,
                        executor=executor, record_embedding=embedding, record_kv_coe=kv_coe,
                        max_num_tokens=self.cfg.max_num_tokens)
        plan = self.reasoning(reasoning)
        return engine, [engine.submit(p, sampling, reasoning=plan, evict=True if evict is None else evict[i])
                        for i, p in enumerate(prompts)]

    def result(self, r: Request) -> GenerationResult:
        return GenerationResult(r.output_ids, self.decode(r.output_ids), len(r.prompt_ids), r.finish_reason, r.kv,
                                r.kv_coe_features, r.reasoning_choice, r.reasoning_p_slow)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | None = None,
                 positions: bool = False, kv_coe: bool = False, reasoning: str | None = None) -> list[GenerationResult]:
        """Generate for all prompts in one continuous batch; the pool holds them all uncompressed.
        kv_coe: score each answer with KV-CoE (`GenerationResult.kv_coe`).
        reasoning: "auto" | "fast" | "slow" per request (`Runtime.reasoning`); the choice is in the result."""
        engine, reqs = self.start(prompts, sampling, positions, kv_coe=kv_coe, reasoning=reasoning)
        engine.run()
        return [self.result(r) for r in reqs]

    def embed(self, prompts: list[list[int]], embedding: KVEmbedding | None = None,
              batch: int = 16) -> list[Request]:
        """KV embeddings of `prompts` (prefill only, no token generated), `batch` prompts per
        continuous batch; the requests in input order, each with `embedding` ([E] host) and `kv`."""
        if batch < 1:
            raise KvzapError(f"batch must be >= 1, got {batch}")
        out: list[Request] = []
        for i in range(0, len(prompts), batch):
            engine, reqs = self.start(prompts[i:i + batch], self.sampling(max_new_tokens=0),
                                      embedding=embedding or True)
            engine.run()
            out += reqs
        return out
