"""The CUDA kernels build on any machine with nvcc (CI has no GPU): CMake for sm_80 and sm_90a,
no register spills, the C ABI exported; the torch ops source compiles against the installed
torch headers. Their numerics are tested on a GPU beside the references (test_evict_append.py,
test_paged_attention.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kvzap_trt.errors import KvzapError
from kvzap_trt.ops import cuda_kernels
from kvzap_trt.ops.dispatch import REFERENCE, ops

PLUGINS = cuda_kernels.PLUGINS
LAUNCHERS = {"kvzapEvict", "kvzapVarlenPagedAttention", "kvzapAttentionSplitSize", "kvzapAttentionWorkspaceBytes"}


def nvcc() -> str:
    found = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if found is None:
        pytest.skip("nvcc not installed")
    return found


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """(build dir, compiler output) of the plugins' CMake build with ptxas statistics."""
    compiler = nvcc()
    build = tmp_path_factory.mktemp("plugins")
    env = dict(os.environ, CUDACXX=compiler)
    configure = subprocess.run(
        ["cmake", "-S", str(PLUGINS), "-B", str(build), "-DCMAKE_CUDA_FLAGS=-Xptxas -v"],
        capture_output=True, text=True, env=env,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    made = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    return build, made.stdout + made.stderr


def test_kernels_build_for_sm80_and_sm90a_without_spills(cmake_build):
    build, log = cmake_build
    archs = re.findall(r"Compiling entry function '(\w+)' for '(sm_\w+)'", log)
    kernels = {name for name, _ in archs}
    for name in ("evict_fused_kernel", "evict_plan_kernel", "evict_copy_kernel", "evict_commit_kernel",
                 "attention_kernel", "merge_kernel"):
        assert any(name in k for k in kernels), name
    for kernel in kernels:
        assert {a for n, a in archs if n == kernel} == {"sm_80", "sm_90a"}, kernel
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert spills and all(int(s) == 0 for s in spills), "a kernel spills registers"
    assert "warning" not in log.lower()


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


def test_gencode_targets_hopper_with_its_own_instructions():
    assert cuda_kernels.gencode_flags((9, 0)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert cuda_kernels.gencode_flags((8, 0)) == ["-gencode=arch=compute_80,code=sm_80"]
    assert cuda_kernels.gencode_flags((12, 0)) == ["-gencode=arch=compute_120,code=sm_120"]


def test_batch_args_bound_every_row_and_are_reused_within_a_step():
    cu, slots, ctx = torch.tensor([0, 1, 301, 302]), torch.tensor([2, 0, 1]), torch.tensor([40000, 9, 0])
    args = cuda_kernels.batch_args(cu, slots, ctx, "cpu")
    assert (args.max_chunk, args.max_keys) == (300, 40000 + 300)
    assert args.cu_seqlens.dtype == torch.int32 and args.seq_slots.tolist() == [2, 0, 1]
    # Every layer of a step passes equal tensors: one conversion serves them all.
    assert cuda_kernels.batch_args(cu.clone(), slots.clone(), ctx.clone(), "cpu") is args
    assert cuda_kernels.batch_args(cu, slots, ctx + 1, "cpu").max_keys == 40001 + 300


def test_dispatch_uses_the_reference_on_cpu_and_rejects_bad_choices(monkeypatch):
    assert ops("cpu") is REFERENCE
    monkeypatch.setenv("KVZAP_TRT_OPS", "reference")
    assert ops("cuda") is REFERENCE
    monkeypatch.setenv("KVZAP_TRT_OPS", "triton")
    with pytest.raises(KvzapError, match="KVZAP_TRT_OPS='triton'"):
        ops("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no CUDA exists")
def test_kernels_without_cuda_fail_clearly(monkeypatch):
    monkeypatch.setenv("KVZAP_TRT_OPS", "cuda")
    with pytest.raises(KvzapError, match="CUDA build of PyTorch and a CUDA device"):
        ops("cuda")


def test_split_heuristic_fills_one_wave(cmake_build):
    """The launcher's host logic, called through the C ABI (libcudart loads without a GPU)."""
    import ctypes

    lib = ctypes.CDLL(str(cmake_build[0] / "libkvzap_kernels.so"))
    lib.kvzapAttentionWorkspaceBytes.restype = ctypes.c_size_t
    sms = 132  # H100 SXM
    for rows, max_keys in [(1, 32769), (8, 16385), (32, 32769), (64, 4097), (8, 100), (300, 2000)]:
        split = lib.kvzapAttentionSplitSize(rows, 8, max_keys, sms)
        splits = -(-max_keys // split)
        assert 256 <= split <= 4096 and split % 64 == 0
        # One wave (4 blocks per SM) unless even one split per pair, or the largest split, is more.
        assert rows * 8 * splits <= sms * 4 or splits == 1 or split == 4096, (rows, max_keys, split)
        ws = lib.kvzapAttentionWorkspaceBytes(rows, 32, 128, max_keys, split)
        assert ws == (0 if splits == 1 else 4 * rows * 32 * splits * 129)
    # Long single sequences are cut into many splits; short ones into none.
    assert -(-32769 // lib.kvzapAttentionSplitSize(1, 8, 32769, sms)) >= 32
    assert lib.kvzapAttentionSplitSize(8, 8, 100, sms) >= 100
