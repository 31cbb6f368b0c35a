"""The CUDA kernels build on any machine with nvcc (CI has no GPU): CMake for sm_80 and sm_90a,
no register spills, occupancy pinned as the split heuristic assumes, the C ABI exported; the
torch ops library builds against the installed torch (the CPU wheel in CI), loads, and its
int-only planning ops run. Their numerics are tested on a GPU beside the references
(test_evict_append.py, test_paged_attention.py); their index arithmetic on the host here
(test_cache_index.py)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kvzap_trt.errors import KvzapError
from kvzap_trt.ops import cuda_kernels
from kvzap_trt.ops.dispatch import CPU, REFERENCE, ops
from tests.plugin_build import nvcc

PLUGINS = cuda_kernels.PLUGINS
LAUNCHERS = {"kvzapEvict", "kvzapVarlenPagedAttention", "kvzapAttentionSplitSize", "kvzapAttentionWorkspaceBytes",
             "kvzapAttentionBlocksPerSm", "kvzapAttentionBlocks"}
FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2  # kvzapDtype in plugins/include/kvzap_kernels.h


def test_kernels_build_for_sm80_and_sm90a_without_spills(cmake_build):
    build, log = cmake_build
    archs = re.findall(r"Compiling entry function '(\w+)' for '(sm_\w+)'", log)
    kernels = {name for name, _ in archs}
    for name in ("evict_decode_kernel", "evict_fused_kernel", "evict_plan_kernel", "evict_copy_kernel", "evict_commit_kernel",
                 "attention_kernel", "attention_mma_kernel", "merge_kernel"):
        assert any(name in k for k in kernels), name
    for kernel in kernels:
        assert {a for n, a in archs if n == kernel} == {"sm_80", "sm_90a"}, kernel
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert spills and all(int(s) == 0 for s in spills), "a kernel spills registers"
    assert "warning" not in log.lower()


def test_attention_occupancy_is_pinned_as_the_split_heuristic_assumes(cmake_build):
    """Every attention kernel instance (attention_kernel<float, D, G>, attention_mma_kernel<T, D, packed>)
    fits the resident blocks per SM that kvzapAttentionBlocksPerSm reports (and the split
    heuristic uses) on its architecture."""
    import ctypes

    build, log = cmake_build
    lib = ctypes.CDLL(str(build / "libkvzap_kernels.so"))
    entries = re.findall(r"Compiling entry function '(\w*attention_(?:mma_)?kernel\w*)' for 'sm_(\d+)a?'\n"
                         r"(?:.*\n)*?ptxas info\s+: Used (\d+) registers", log)
    # archs x (fp32: head dims x groups + bf16/fp16: head dims x (decode, packed))
    assert len(entries) == 2 * (2 * 4 + 2 * 2 * 2), len(entries)
    for name, arch, regs in entries:
        if "mma_kernel" in name:
            dtype, group = (BFLOAT16 if "bfloat16" in name else FLOAT16), 8  # one instance serves every group
        else:
            dtype, group = FLOAT32, int(re.search(r"Li(\d+)ELi(\d+)E", name).group(2))
        blocks = lib.kvzapAttentionBlocksPerSm(dtype, group, int(arch))
        assert int(regs) * 128 * blocks <= 65536, (name, arch, regs, blocks)
    assert (lib.kvzapAttentionBlocksPerSm(FLOAT32, 4, 90), lib.kvzapAttentionBlocksPerSm(FLOAT32, 8, 90)) == (4, 2)
    assert lib.kvzapAttentionBlocksPerSm(BFLOAT16, 4, 90) == lib.kvzapAttentionBlocksPerSm(FLOAT16, 1, 80) == 2


def test_kernels_library_exports_the_c_abi(cmake_build):
    build, _ = cmake_build
    lib = build / "libkvzap_kernels.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    assert LAUNCHERS <= set(re.findall(r"\b(kvzap\w+)\b", symbols))


def cuda_includes(compiler: str) -> list[str]:
    """-I flags nvcc itself uses (it may be a wrapper script far from its toolkit)."""
    dry = subprocess.run([compiler, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True)
    found = re.findall(r'INCLUDES="([^"]*)"', dry.stdout + dry.stderr)
    assert found, "cannot find nvcc's include directories"
    return [f.strip('"') for f in found[0].split()]


def test_torch_ops_source_compiles_against_installed_torch():
    torch_include = Path(torch.__file__).parent / "include"
    cxx = shutil.which("g++") or pytest.skip("no C++ compiler")
    result = subprocess.run(
        [cxx, "-std=c++20", "-fsyntax-only", "-Wall", f"-I{torch_include}", f"-I{torch_include}/torch/csrc/api/include",
         *cuda_includes(nvcc()), f"-I{PLUGINS / 'include'}",
         str(PLUGINS / cuda_kernels.TORCH_OPS_SOURCE)],
        capture_output=True, text=True,
    )
    ours = [line for line in result.stderr.splitlines() if "torch_ops.cpp:" in line and ("error" in line or "warning" in line)]
    assert result.returncode == 0 and not ours, result.stderr[-4000:]


def test_torch_ops_library_loads_and_plans_attention_without_a_gpu(cmake_build):
    """The CMake-built torch.ops library registers every op with the schema the wrappers call;
    the int-only planning ops run anywhere and agree with the C ABI."""
    import ctypes

    build, _ = cmake_build
    torch.ops.load_library(str(build / "libkvzap_trt_torch_ops.so"))
    ops = torch.ops.kvzap_trt
    schema = str(ops.paged_attention.default._schema)
    assert "Tensor(b!) workspace, Tensor(c!) error, int stream" in schema
    assert "Tensor(j!) error, int window, float threshold, int max_new_tokens, int stream" in str(
        ops.evict_append.default._schema)
    lib = ctypes.CDLL(str(build / "libkvzap_kernels.so"))
    lib.kvzapAttentionWorkspaceBytes.restype = ctypes.c_size_t
    for rows, batch, hq, h, keys in [(1, 1, 32, 8, 32769), (8, 8, 32, 8, 16385), (64, 1, 9, 3, 4097), (3, 2, 6, 6, 100)]:
        for dtype, code in [(torch.float32, FLOAT32), (torch.bfloat16, BFLOAT16)]:
            split = ops.attention_split(dtype, rows, batch, hq, h, keys, 132, 90)
            assert split == lib.kvzapAttentionSplitSize(code, rows, batch, hq, h, keys, 132, 90)
        assert ops.attention_workspace_floats(rows, hq, 128, keys, split) * 4 == \
            lib.kvzapAttentionWorkspaceBytes(rows, hq, 128, keys, split)
    with pytest.raises(RuntimeError, match="split_size must be > 0"):
        ops.attention_workspace_floats(1, 8, 128, 100, 0)


def test_gencode_targets_hopper_with_its_own_instructions():
    assert cuda_kernels.gencode_flags((9, 0)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert cuda_kernels.gencode_flags((8, 0)) == ["-gencode=arch=compute_80,code=sm_80"]
    assert cuda_kernels.gencode_flags((12, 0)) == ["-gencode=arch=compute_120,code=sm_120"]


def test_dispatch_uses_the_fast_path_on_cpu_and_rejects_bad_choices(monkeypatch):
    assert ops("cpu") is CPU
    monkeypatch.setenv("KVZAP_TRT_OPS", "reference")
    assert ops("cuda") is REFERENCE and ops("cpu") is REFERENCE
    monkeypatch.setenv("KVZAP_TRT_OPS", "triton")
    with pytest.raises(KvzapError, match="KVZAP_TRT_OPS='triton'"):
        ops("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no CUDA exists")
def test_kernels_without_cuda_fail_clearly(monkeypatch):
    monkeypatch.setenv("KVZAP_TRT_OPS", "cuda")
    with pytest.raises(KvzapError, match="CUDA build of PyTorch and a CUDA device"):
        ops("cuda")


def test_a_failed_load_is_remembered(monkeypatch):
    """One build attempt per process: the second call raises the first call's error without
    trying again (a failing nvcc build takes minutes, and every GPU test asks)."""
    attempts = []

    def failing_build():
        attempts.append(1)
        raise RuntimeError("Error building extension 'kvzap_trt_ops'")

    cuda_kernels._load_once.cache_clear()
    monkeypatch.setattr(cuda_kernels, "_register", failing_build)
    try:
        for _ in range(3):
            with pytest.raises(RuntimeError, match="Error building extension"):
                cuda_kernels.load()
        assert len(attempts) == 1
    finally:
        cuda_kernels._load_once.cache_clear()


def test_split_heuristic_fills_one_wave(cmake_build):
    """The launcher's host logic, called through the C ABI (libcudart loads without a GPU)."""
    import ctypes

    lib = ctypes.CDLL(str(cmake_build[0] / "libkvzap_kernels.so"))
    lib.kvzapAttentionWorkspaceBytes.restype = ctypes.c_size_t
    sms = 132  # H100 SXM
    # fp32 (CUDA cores): Qwen3-8B's G = 4 (4 blocks per SM), G = 8 (2); bf16 (tensor cores): 2
    for dtype, group, resident in [(FLOAT32, 4, 4), (FLOAT32, 8, 2), (BFLOAT16, 4, 2), (BFLOAT16, 1, 2)]:
        for rows, batch, max_keys in [(1, 1, 32769), (8, 8, 16385), (32, 32, 32769), (64, 64, 4097), (8, 8, 100),
                                      (300, 300, 2000), (64, 1, 4097), (300, 7, 2000), (16, 1, 32769)]:
            blocks = lib.kvzapAttentionBlocks(dtype, rows, batch, 8 * group, 8)
            # The launch's blocks: a row each, or (bf16 / fp16, N > B) its row groups of 16 / G tokens.
            packed = dtype != FLOAT32 and rows > batch
            assert blocks == (lib.kvzapIndexRowGroups(rows, batch, 16 // group) if packed else rows)
            split = lib.kvzapAttentionSplitSize(dtype, rows, batch, 8 * group, 8, max_keys, sms, 90)
            splits = -(-max_keys // split)
            assert 256 <= split <= 4096 and split % 64 == 0
            # One wave of the launch's blocks unless even one split per pair, or the largest split,
            # is more.
            assert blocks * 8 * splits <= sms * resident or splits == 1 or split == 4096, (rows, batch, max_keys, split)
            ws = lib.kvzapAttentionWorkspaceBytes(rows, 32, 128, max_keys, split)
            assert ws == (0 if splits == 1 else 4 * rows * 32 * splits * 129)
    # Long single sequences are cut into many splits; short ones into none.
    assert -(-32769 // lib.kvzapAttentionSplitSize(BFLOAT16, 1, 1, 32, 8, 32769, sms, 90)) >= 32
    assert lib.kvzapAttentionSplitSize(BFLOAT16, 8, 8, 32, 8, 100, sms, 90) >= 100
    # A 32-token chunk of one sequence at G = 4 runs 9 row groups, not 32 blocks: it is cut into
    # splits, where 32 decode rows over as many keys fill a wave with one each.
    chunk = lib.kvzapAttentionSplitSize(BFLOAT16, 32, 1, 32, 8, 4096, sms, 90)
    decode = lib.kvzapAttentionSplitSize(BFLOAT16, 32, 32, 32, 8, 4096, sms, 90)
    assert -(-4096 // chunk) >= 3 and decode == 4096
    # A group no kernel takes (32 heads per kv head) gets a split, not a division by zero on the host.
    assert lib.kvzapAttentionBlocks(BFLOAT16, 64, 1, 64, 2) == 64
    assert 256 <= lib.kvzapAttentionSplitSize(BFLOAT16, 64, 1, 64, 2, 4096, sms, 90) <= 4096
    # The CUDA-core kernel never packs: the batch does not change its split.
    assert lib.kvzapAttentionSplitSize(FLOAT32, 64, 1, 32, 8, 4097, sms, 90) == \
        lib.kvzapAttentionSplitSize(FLOAT32, 64, 64, 32, 8, 4097, sms, 90)
    # Fewer resident blocks (G = 8, or sm_80 at G = 4, or the tensor-core kernel) -> fewer, longer
    # splits for the same wave.
    split = functools.partial(lib.kvzapAttentionSplitSize, FLOAT32)
    assert split(8, 8, 64, 8, 16385, sms, 90) > split(8, 8, 32, 8, 16385, sms, 90)
    assert split(8, 8, 32, 8, 16385, 108, 80) > split(8, 8, 32, 8, 16385, 108, 90)
    assert lib.kvzapAttentionSplitSize(BFLOAT16, 8, 8, 32, 8, 16385, sms, 90) > split(8, 8, 32, 8, 16385, sms, 90)
