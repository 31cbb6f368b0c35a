"""The CUDA kernels of plugins/ as torch ops, with the references' signatures.

`load()` compiles plugins/src/*.cu and plugins/torch/torch_ops.cpp with
torch.utils.cpp_extension on first use (cached under ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR) for the current GPU's architecture, which registers
`torch.ops.kvzap_trt.evict_append` and `torch.ops.kvzap_trt.paged_attention`. A library built by
CMake (`-DKVZAP_TORCH_OPS=ON`) is loaded instead when $KVZAP_TRT_TORCH_OPS names it.

`evict_append` and `paged_attention` below take exactly the arguments of the references in
evict_append.py and paged_attention.py (host-readable cu_seqlens, seq_slots, ctx_lens), and the
step's plan (interface.py: the batch description's device copies, the attention's split and
workspace, made once per step), so the dispatch can swap them. Differences a caller can see:
  - block ids: heads pop blocks from the free stack concurrently, so which id a head gets
    differs from the reference; what each head keeps, in which order, and how many blocks the
    pool loses are the same;
  - errors: the kernels cannot raise; they OR a flag, which is read back and turned into the
    reference's CacheFullError (or KernelBoundError when a host bound was wrong): after each call
    (one device sync), or once at the end of a `deferred_errors()` block, which the torch
    executor wraps around a whole forward step. The cache is invalid after it; the runtime's exact block bounds
    make it unreachable in serving.
Streams: every buffer an op writes (workspace, error flag) and the plan's device copies are
made on the stream the op runs on, the current one; the plan keeps its copies and workspace per
stream (its routing rows are made once: a plan serves the one stream of its step's forward).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvzap_trt.device_reads import to_host
from kvzap_trt.errors import CacheFullError, KvzapError
from kvzap_trt.ops.cached_chunks import cached_chunk_attention
from kvzap_trt.ops.fresh_prompts import attend_routing_fresh_prompts
from kvzap_trt.ops.interface import StepPlan, indexed

# The CUDA sources: beside the package in a source checkout, or where $KVZAP_TRT_PLUGINS says.
PLUGINS = Path(os.environ.get("KVZAP_TRT_PLUGINS") or Path(__file__).resolve().parents[2] / "plugins")
KERNEL_SOURCES = ("src/evict_append.cu", "src/paged_attention.cu", "src/index_abi.cu")
TORCH_OPS_SOURCE = "torch/torch_ops.cpp"
ERR_POOL_EXHAUSTED, ERR_BLOCK_TABLE_FULL, ERR_BOUND_EXCEEDED = 1, 2, 4  # must match KVZAP_ERR_* in kvzap_kernels.h


def gencode_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc flags for one device: sm_90a on Hopper (its own instructions), sm_XY elsewhere."""
    major, minor = capability
    arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def load() -> None:
    """Register torch.ops.kvzap_trt.* (compiling on first use); KvzapError says why it cannot.
    One attempt per process: a failure is remembered and raised again (a failing nvcc build takes
    minutes, and every GPU test and op call asks)."""
    error = _load_once()
    if error is not None:
        raise error.with_traceback(None)  # the first attempt's frames only, not every caller's since


@functools.cache
def _load_once() -> Exception | None:
    try:
        _register()
    except Exception as e:  # a compiler or CUDA error as much as a KvzapError
        return e
    return None


def _register() -> None:
    if not torch.cuda.is_available() or torch.version.cuda is None:
        raise KvzapError("the kvzap-trt CUDA kernels need a CUDA build of PyTorch and a CUDA device")
    prebuilt = os.environ.get("KVZAP_TRT_TORCH_OPS")
    if prebuilt:
        torch.ops.load_library(prebuilt)
        return
    missing = [s for s in (*KERNEL_SOURCES, TORCH_OPS_SOURCE) if not (PLUGINS / s).is_file()]
    if missing:
        raise KvzapError(f"kernel sources not found under {PLUGINS}: {missing} (set KVZAP_TRT_PLUGINS to the "
                         "repository's plugins/ folder, or install kvzap-trt from a source checkout)")
    from torch.utils.cpp_extension import load as build

    flags = gencode_flags(torch.cuda.get_device_capability())
    build(
        name="kvzap_trt_ops",
        sources=[str(PLUGINS / s) for s in (*KERNEL_SOURCES, TORCH_OPS_SOURCE)],
        extra_include_paths=[str(PLUGINS / "include")],
        extra_cflags=["-O3", "-std=c++20"],
        extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *flags],
        is_python_module=False,
        verbose=bool(os.environ.get("KVZAP_TRT_VERBOSE_BUILD")),
    )


@dataclass(frozen=True)
class DeviceBatch:
    """A plan's cu_seqlens, seq_slots, ctx_lens copied to its device (int32)."""

    cu_seqlens: torch.Tensor
    seq_slots: torch.Tensor
    ctx_lens: torch.Tensor


def device_batch(plan: StepPlan) -> DeviceBatch:
    """The plan's batch description on its device, copied once per step (3 small copies, not 3 per
    op per layer), on the current stream: a copy queued on one stream is not safe to read on
    another before that stream reaches it, so another stream gets its own."""
    stream = torch.cuda.current_stream(plan.device).cuda_stream if plan.device.type == "cuda" else 0
    return plan.memo(("device_batch", stream), lambda: DeviceBatch(*(
        torch.tensor(h, dtype=torch.int32).to(plan.device, non_blocking=True) for h in (plan.cu, plan.slots, plan.ctx))))


# device -> (error flag, stream) of the open deferred_errors() block
_deferred: dict[torch.device, tuple[torch.Tensor, int]] = {}


def raise_kernel_error(flag: int) -> None:
    """The exception for a kernel error flag (bits ERR_*), if any."""
    if flag & ERR_POOL_EXHAUSTED:
        raise CacheFullError("KV block pool exhausted in kvzapEvict (the cache is no longer valid)")
    if flag & ERR_BLOCK_TABLE_FULL:
        raise CacheFullError("a head needs more blocks than its block table holds (kvzapEvict)")
    if flag & ERR_BOUND_EXCEEDED:
        raise KernelBoundError("a kernel saw more tokens than the bound the host passed (max_new_tokens or max_keys): "
                               "the cache or the attention output is not valid")


class KernelBoundError(KvzapError):
    """A host-side bound passed to a kernel was below the real value (a bug in the caller)."""


@contextlib.contextmanager
def deferred_errors(device: torch.device | str):
    """Within the block, the ops on `device` do not sync to check their error flag; the flag of
    all their calls is read once on leaving (CacheFullError, KernelBoundError)."""
    if torch.device(device).type != "cuda" or indexed(device) in _deferred:
        yield
        return
    device = indexed(device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    _deferred[device] = (flag, torch.cuda.current_stream(device).cuda_stream)
    try:
        yield
    finally:
        del _deferred[device]
    raise_kernel_error(int(to_host(flag)[0]))


def _error_flag(device: torch.device) -> tuple[torch.Tensor, bool]:
    """(flag to pass, whether the caller reads it now): the open deferred block's when the op runs
    on the stream the block was opened on (the flag was zeroed, and is read, on that stream), else
    a new one read after the call."""
    key = indexed(device)
    flag, stream = _deferred.get(key, (None, None))
    if flag is not None and stream == torch.cuda.current_stream(key).cuda_stream:
        return flag, False
    return torch.zeros(1, dtype=torch.int32, device=device), True


def evict_append(
    k_new, v_new, scores, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, pos_pool, score_pool, block_table, kept_len,
    ring_table, free_stack, num_free, window: int, threshold: float, *, plan: StepPlan | None = None,
) -> None:
    """In place; arguments and shapes as kvzap_trt.ops.evict_append.evict_append (one layer, or
    every layer with [L, ...] tensors). plan: the step's (interface.py), or None."""
    load()
    dev = k_pool.device
    plan = StepPlan.of(plan, cu_seqlens, seq_slots, ctx_lens, window, dev)
    layered = block_table.dim() == 4
    plan.validate(block_table.shape[int(layered)], k_new.shape[int(layered)])
    batch = device_batch(plan)
    error, check_now = _error_flag(dev)
    with torch.cuda.device(dev):
        torch.ops.kvzap_trt.evict_append(
            k_new.contiguous(), v_new.contiguous(), scores.float().contiguous(), batch.cu_seqlens, batch.seq_slots,
            batch.ctx_lens, k_pool, v_pool, pos_pool, score_pool, block_table, kept_len, ring_table, free_stack,
            num_free, error, int(window), float(threshold), plan.max_chunk, torch.cuda.current_stream(dev).cuda_stream,
        )
    if check_now:
        raise_kernel_error(int(to_host(error)[0]))


def paged_attention(
    q, k_new, v_new, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, block_table, kept_len, ring_table, window: int,
    scale: float, max_kept: int | None = None, split_size: int = 0, out: torch.Tensor | None = None,
    kernel_only: bool = False, *, plan: StepPlan | None = None,
) -> torch.Tensor:
    """-> [N, Hq, D]; arguments as kvzap_trt.ops.paged_attention.paged_attention.

    Fresh prompts (nothing cached yet, several new tokens) see only their own tokens: they go to
    PyTorch's fused causal attention (flash on GPUs). Chunks over a cache (several new tokens,
    ctx > 0) go to cached_chunks.py (the sequence's cache gathered once, fused attention with a
    mask). Decode rows go to kvzapVarlenPagedAttention, whose splits are sized from the plan's
    `key_bound` (max_kept: a bound on kept_len over the batch, which the engine's scheduler reads
    anyway; None: the uncompressed context). kernel_only: every row through the kernel, as a
    TensorRT engine runs them (bf16 / fp16: its packed launch, up to 16 / G tokens of a sequence
    per block; the GPU tests cover both routes). split_size: keys per thread block (0: the
    launcher's choice). out: written in place if given. plan: the step's (interface.py), or None;
    the routing, device copies, split and workspace are made once per plan.
    """
    plan = StepPlan.of(plan, cu_seqlens, seq_slots, ctx_lens, window, q.device, max_kept)
    plan.validate(block_table.shape[0], q.shape[0])
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out

    def kernel(q, k_new, v_new, sub: StepPlan, out):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
        launch_paged_attention(q, k_new, v_new, sub, k_pool, v_pool, block_table, kept_len, ring_table, scale,
                               split_size, out)
        return out

    def chunk(q, k_new, v_new, slot: int, ctx: int) -> torch.Tensor:
        return cached_chunk_attention(q, k_new, v_new, slot, ctx, k_pool, v_pool, block_table, kept_len, ring_table,
                                      window, scale)

    if kernel_only:
        return kernel(q, k_new, v_new, plan, out)
    return attend_routing_fresh_prompts(q, k_new, v_new, plan, scale, out, kernel, chunk)


def launch_paged_attention(q, k_new, v_new, plan: StepPlan, k_pool, v_pool, block_table, kept_len, ring_table,
                           scale: float, split_size: int, out: torch.Tensor) -> None:
    """torch.ops.kvzap_trt.paged_attention over the batch of `plan` (its rows are q's), into `out`;
    splits sized from the plan's key_bound, split and workspace made once per plan (every layer of
    a step launches the same shapes on the same stream, which orders the workspace's reuse)."""
    load()
    dev = q.device
    plan.validate(block_table.shape[0], q.shape[0])
    batch = device_batch(plan)
    error, check_now = _error_flag(dev)
    max_keys = plan.key_bound
    stream = torch.cuda.current_stream(dev).cuda_stream
    with torch.cuda.device(dev):
        split, workspace = plan.memo(
            ("attention", q.dtype, *q.shape, k_new.shape[1], split_size, stream),
            lambda: split_and_workspace(q.dtype, q.shape[0], len(plan.slots), q.shape[1], k_new.shape[1], q.shape[2],
                                        max_keys, dev, split_size))
        torch.ops.kvzap_trt.paged_attention(
            q.contiguous(), k_new.contiguous(), v_new.contiguous(), batch.cu_seqlens, batch.seq_slots, batch.ctx_lens,
            k_pool, v_pool, block_table, kept_len, ring_table, plan.window, float(scale), max_keys, split, out,
            workspace, error, stream,
        )
    if check_now:
        raise_kernel_error(int(to_host(error)[0]))


def split_and_workspace(dtype: torch.dtype, num_rows: int, batch: int, num_q_heads: int, num_kv_heads: int,
                        head_dim: int, max_keys: int, device: torch.device,
                        split_size: int = 0) -> tuple[int, torch.Tensor]:
    """(keys per split, float32 workspace) for one kvzapVarlenPagedAttention launch over `dtype`
    K/V, num_rows rows of `batch` sequences, on `device`, the workspace allocated on the current
    stream. split_size 0: the launcher's heuristic (it counts the launch's blocks: rows, or row
    groups of the packed launch; the resident blocks per SM differ between the fp32 and the
    tensor-core kernel)."""
    if split_size <= 0:
        sms, sm = _device_shape(indexed(device))
        split_size = torch.ops.kvzap_trt.attention_split(dtype, num_rows, batch, num_q_heads, num_kv_heads, max_keys,
                                                         sms, sm)
    floats = torch.ops.kvzap_trt.attention_workspace_floats(num_rows, num_q_heads, head_dim, max_keys, split_size)
    return split_size, torch.empty(floats, dtype=torch.float32, device=device)


@functools.cache
def _device_shape(device: torch.device) -> tuple[int, int]:
    """(SM count, compute capability as XY) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.major * 10 + props.minor
