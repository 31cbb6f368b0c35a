"""The TensorRT executor: the engine of `kvzap-trt build --engine tensorrt` run with TensorRT's
Python runtime, the cache bound by address.

Per step (`forward`):
  1. the step's inputs go to the device in the graph's types (`step_feeds`);
  2. `binding_plan` pairs every engine input with a tensor and every output with one: each cache
     output `<name>_out` gets the very tensor of input `<name>` (the plugins update the pools in
     place, plugins/README.md "aliased I/O"), `logits` a fresh [B, vocab] float32 tensor;
  3. `select_profile` picks the first optimisation profile holding every input shape (decode,
     then prefill: trt/profiles.py); each profile has its own execution context, whose device
     memory is sized for that profile alone;
  4. input shapes and addresses are set, `execute_async_v3` runs on the executor's own CUDA
     stream, ordered after the caller's and before the caller's next work;
  5. the error flag (zeroed before the step, OR-ed by every plugin) is read once:
     CacheFullError / KernelBoundError as `cuda_kernels.raise_kernel_error` raises them.
The engine, its scheduler and its `PagedKVCache` are those of the other executors.

Steps 1-3 are pure functions, tested on CPU against the exported graph's names
(tests/test_trt_executor.py); 4-5 need TensorRT and a GPU and have not run anywhere yet.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvzap_trt.device_reads import to_host
from kvzap_trt.errors import KvzapError
from kvzap_trt.executors import StepInputs
from kvzap_trt.export import check_cache_shape, check_policy
from kvzap_trt.export.plugins import CACHE_TENSORS, cache_tensors, step_max_keys
from kvzap_trt.ops.cuda_kernels import raise_kernel_error
from kvzap_trt.trt import ENGINE_FILE, ENGINE_META, default_plugin_lib, import_tensorrt, load_plugin_library, trt_logger
from kvzap_trt.trt.profiles import cache_bounds, prompt_tokens_per_step, select_profile

if TYPE_CHECKING:
    from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
    from kvzap_trt.surrogate import Surrogate

log = logging.getLogger(__name__)

# The step's own inputs and their types in the graph (export/graph.py); the rest are CACHE_TENSORS.
STEP_INPUTS = {"tokens": torch.int64, "positions": torch.int64, "never_evict": torch.bool, "logits_at": torch.int64,
               "cu_seqlens": torch.int32, "seq_slots": torch.int32, "ctx_lens": torch.int32}  # and max_keys, int32
TORCH_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                     "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "int8": torch.int8,
                     "uint8": torch.uint8}


def step_feeds(step: StepInputs, device: torch.device | str, max_keys: int) -> dict[str, torch.Tensor]:
    """The step's inputs on `device` in the graph's types (cu_seqlens, seq_slots, ctx_lens are
    host tensors in StepInputs; logits_at may be int32), and `max_keys`, an int32 tensor of that
    length whose contents are never read (`export.plugins.step_max_keys`: the step's key bound,
    which the attention plugin reads from the shape). KvzapError if a sequence brings no new
    token: the evict plugin bounds a sequence's new tokens by N - B + 1 (its README)."""
    idle = [b for b, n in enumerate((step.cu_seqlens[1:] - step.cu_seqlens[:-1]).tolist()) if n < 1]
    if idle:
        raise KvzapError(f"sequences {idle} of the step have no new token; a TensorRT step needs one or more each")
    raw = {"tokens": step.tokens, "positions": step.positions, "never_evict": step.never_evict,
           "logits_at": step.logits_at, "cu_seqlens": step.cu_seqlens, "seq_slots": step.seq_slots,
           "ctx_lens": step.ctx_lens}
    feeds = {n: t.to(device=device, dtype=STEP_INPUTS[n]).contiguous() for n, t in raw.items()}
    return {**feeds, "max_keys": torch.empty(max_keys, dtype=torch.int32, device=device)}


def cache_state(cache: "PagedKVCache", error: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cache's tensors under the graph's input names, the error flag included."""
    return {**cache_tensors(cache), "error": error}


def binding_plan(input_names: list[str], output_names: list[str], tensors: dict[str, torch.Tensor],
                 logits: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(inputs, outputs): the tensor each engine I/O name is bound to.

    tensors: every input by name (step_feeds + cache_state). Output `<name>_out` of a cache
    tensor is bound to the input `<name>` itself (same address: the plugins write in place),
    `logits` to `logits`. A name the engine has and `tensors` lacks, a tensor the engine does not
    take, or an output that is neither is a KvzapError naming it.
    """
    missing = [n for n in input_names if n not in tensors]
    if missing:
        raise KvzapError(f"the engine takes inputs this executor does not provide: {', '.join(missing)}")
    extra = sorted(set(tensors) - set(input_names))
    if extra:
        raise KvzapError(f"the engine lacks inputs the executor provides: {', '.join(extra)} "
                         "(an engine from another export?)")
    inputs = {n: tensors[n] for n in input_names}
    outputs = {}
    for name in output_names:
        if name == "logits":
            outputs[name] = logits
        elif name.endswith("_out") and name.removesuffix("_out") in CACHE_TENSORS:
            outputs[name] = inputs[name.removesuffix("_out")]
        else:
            raise KvzapError(f"the engine has an output {name!r} that is neither logits nor a cache tensor")
    unbound = [n for n in CACHE_TENSORS if f"{n}_out" not in outputs]
    if unbound or "logits" not in outputs:
        raise KvzapError(f"the engine lacks outputs: {', '.join([f'{n}_out' for n in unbound] + (['logits'] if 'logits' not in outputs else []))}")
    return inputs, outputs


def check_bindings(dtypes: dict[str, torch.dtype], bound: dict[str, torch.Tensor]) -> None:
    """Each bound tensor has the engine's type for its name and is contiguous (TensorRT reads
    linear memory from the address alone)."""
    for name, t in bound.items():
        if t.dtype != dtypes[name]:
            raise KvzapError(f"{name} is {str(t.dtype).removeprefix('torch.')}, the engine takes "
                             f"{str(dtypes[name]).removeprefix('torch.')}")
        if not t.is_contiguous():
            raise KvzapError(f"{name} is not contiguous")


def check_cache(meta: dict, spec: "CacheSpec", device: torch.device) -> None:
    """The cache fits the engine: on CUDA, the engine's dtype, its layers, kv heads, head dim, window."""
    if device.type != "cuda":
        raise KvzapError(f"the TensorRT executor runs on CUDA; the cache is on {device}: pass --device cuda")
    dtype = str(spec.dtype).removeprefix("torch.")
    if dtype != meta["dtype"]:
        raise KvzapError(f"the engine is {meta['dtype']}, the cache {dtype}: pass --dtype {meta['dtype']}")
    check_cache_shape(meta, spec, "engine")


def read_engine_meta(engine: Path) -> tuple[Path, dict]:
    """(model.plan, engine.json's content) of an engine directory or file."""
    engine = Path(engine)
    plan = engine / ENGINE_FILE if engine.is_dir() else engine
    meta_path = plan.parent / ENGINE_META
    if not plan.is_file():
        raise KvzapError(f"no TensorRT engine at {plan}: build one with `kvzap-trt build --engine tensorrt`")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise KvzapError(f"cannot read {meta_path} (written beside the engine by `kvzap-trt build`): {e}") from None
    return plan, meta


def _create_context(trt, engine) -> tuple[object, object]:
    """(an execution context whose device memory follows its own profile, not the largest one;
    the runtime config it was made from, or None). Keep the config as long as the context: the
    binding hands the config's ownership to Python, and the context may still point at it."""
    strategy = trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
    if hasattr(engine, "create_runtime_config"):  # TensorRT >= 10.11
        rc = engine.create_runtime_config()
        rc.set_execution_context_allocation_strategy(strategy)
        return engine.create_execution_context(rc), rc
    return engine.create_execution_context(strategy), None


class TrtExecutor:
    name = "tensorrt"

    def __init__(self, engine: Path, plugin_lib: Path | None, window: int, threshold: float,
                 surrogate: "Surrogate | None", device: str = "cuda"):
        """engine: model.plan (or its directory) of `kvzap-trt build --engine tensorrt`; plugin_lib:
        libkvzap_trt_plugins.so (default: $KVZAP_TRT_PLUGIN_LIB, else the one the engine was built
        with); window, threshold, surrogate: what the engine runs with, checked against the build."""
        self.trt = trt = import_tensorrt()
        plan, self.meta = read_engine_meta(engine)
        self.path = plan
        check_policy(self.meta, plan, window, threshold, surrogate)
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            raise KvzapError("the TensorRT executor needs a CUDA GPU and --device cuda")
        lib = Path(plugin_lib) if plugin_lib else (default_plugin_lib() if default_plugin_lib().is_file()
                                                   else Path(self.meta.get("plugin_lib") or default_plugin_lib()))
        load_plugin_library(trt, lib)
        self.logger = trt_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise KvzapError(f"TensorRT could not deserialize {plan} (another TensorRT version or GPU? see its log)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profiles = [
            {n: tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(n, p)) for n in self.input_names}
            for p in range(self.engine.num_optimization_profiles)
        ]
        self.vocab = int(self.meta["model"]["vocab_size"])
        # Prompt tokens a step may pack beside every decode, read from the engine's own profiles
        # (not from the build's settings): the scheduler prefills longer prompts in such chunks.
        self.max_num_tokens = prompt_tokens_per_step(self.profiles)
        # The largest pool, slot count and context the profiles take: runtimes size caches within it.
        self.cache_bounds = cache_bounds(self.profiles)
        self.device_memory_bytes = self._check_device_memory()
        self.device = torch.device("cuda", torch.cuda.current_device())
        # The engine's own stream: enqueueV3 on the legacy default stream costs extra device syncs.
        self.stream = torch.cuda.Stream(self.device)
        self.error = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._empty = torch.zeros(1, dtype=torch.int32, device=self.device)  # the address of 0-element tensors
        self._contexts: dict[int, tuple[object, object]] = {}  # profile: (context, its runtime config)
        self._check_aliasing()
        for profile in range(len(self.profiles)):  # each context's memory now, not in a request's step
            self._context(profile, self.stream.cuda_stream)

    def _check_device_memory(self) -> list[int] | None:
        """The engine's own device memory per profile (activations, workspaces), where TensorRT
        reports it. The cache only passes through the plugins, aliased, so this should be far
        below the pool's size; a profile reserving a pool's worth suggests TensorRT copies the
        cache at the network's ends (it may, for aliased I/O): logged, since the engine still runs."""
        per_profile = getattr(self.engine, "get_device_memory_size_for_profile_v2", None)
        if per_profile is None:
            return None
        sizes = [int(per_profile(p)) for p in range(len(self.profiles))]
        k_pool = math.prod(self.profiles[0]["k_pool"][2]) * torch.empty(0, dtype=self.dtypes["k_pool"]).element_size()
        if max(sizes) >= k_pool:
            log.warning("TensorRT reserves %.2f GiB for a profile of %s, as much as its K pool (%.2f GiB): it may "
                        "copy the cache instead of updating it in place (plugins/README.md, 'TensorRT plugins')",
                        max(sizes) / 2**30, self.path, k_pool / 2**30)
        return sizes

    def _torch_dtype(self, dt) -> torch.dtype:
        name = str(dt).rsplit(".", 1)[-1].lower()
        name = {"float": "float32", "half": "float16", "bf16": "bfloat16", "int64": "int64"}.get(name, name)
        if name not in TORCH_DTYPE_NAMES:
            raise KvzapError(f"the engine has a tensor of type {dt}, which the executor cannot bind")
        return TORCH_DTYPE_NAMES[name]

    def _check_aliasing(self) -> None:
        """Each cache output `<name>_out` should be its input `<name>` (the plugins update the
        cache in place). Where TensorRT says which input an output aliases (11.x), a cache output
        aliasing nothing suggests it copies the cache: logged, as in _check_device_memory."""
        aliased = getattr(self.engine, "get_aliased_input_tensor", None)
        if aliased is None:
            return
        for name in self.output_names:
            if name.endswith("_out") and name.removesuffix("_out") in CACHE_TENSORS and \
                    aliased(name) != name.removesuffix("_out"):
                log.warning("TensorRT does not alias %s to %s in %s: it may copy the cache each step",
                            name, name.removesuffix("_out"), self.path)

    def _context(self, profile: int, stream: int):
        if profile not in self._contexts:
            ctx, runtime_config = _create_context(self.trt, self.engine)
            try:  # the binding raises RuntimeError where the C++ call returns false
                ok = ctx is not None and ctx.set_optimization_profile_async(profile, stream)
            except RuntimeError as e:
                raise KvzapError(f"TensorRT could not select profile {profile} for an execution context: {e}") from None
            if not ok:
                raise KvzapError(f"TensorRT could not create an execution context for profile {profile}")
            self._contexts[profile] = (ctx, runtime_config)
        return self._contexts[profile][0]

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self._empty.data_ptr()

    def forward(self, step: StepInputs, cache: "PagedKVCache") -> torch.Tensor:
        check_cache(self.meta, cache.spec, cache.device)
        self.error.zero_()  # once per step, on the step's stream; every plugin ORs into it
        tensors = {**step_feeds(step, cache.device, step_max_keys(step, cache)), **cache_state(cache, self.error)}
        logits = torch.empty((step.seq_slots.numel(), self.vocab), dtype=torch.float32, device=cache.device)
        inputs, outputs = binding_plan(self.input_names, self.output_names, tensors, logits)
        check_bindings(self.dtypes, {**inputs, **outputs})
        current = torch.cuda.current_stream(cache.device)
        self.stream.wait_stream(current)  # the feeds and the zeroed flag were written on it
        stream = self.stream.cuda_stream
        ctx = self._context(select_profile(self.profiles, {n: tuple(t.shape) for n, t in inputs.items()}), stream)
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise KvzapError(f"TensorRT refused the shape {tuple(t.shape)} of {name}")
        for name, t in {**inputs, **outputs}.items():
            if not ctx.set_tensor_address(name, self._address(t)):
                raise KvzapError(f"TensorRT refused the address of {name} (not 256-byte aligned?)")
        if not ctx.execute_async_v3(stream):
            raise KvzapError("TensorRT's execute_async_v3 failed (see its log)")
        current.wait_stream(self.stream)  # logits and the cache are read on the caller's stream
        raise_kernel_error(int(to_host(self.error)[0]))  # the step's one read of the flag (a sync)
        return logits
