"""Building plugins/ with CMake in a test session (nvcc compiles without a GPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kvzap_trt.ops.cuda_kernels import PLUGINS


def nvcc() -> str:
    found = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if found is None:
        pytest.skip("nvcc not installed")
    return found


def cmake_build_plugins(build: Path) -> str:
    """Build plugins/ into `build` with ptxas statistics, the torch ops library included (against
    the installed torch, the CPU wheel in CI) -> the build's compiler output."""
    env = dict(os.environ, CUDACXX=nvcc())
    configure = subprocess.run(
        ["cmake", "-S", str(PLUGINS), "-B", str(build), "-DCMAKE_CUDA_FLAGS=-Xptxas -v", "-DKVZAP_TORCH_OPS=ON",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        capture_output=True, text=True, env=env,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    made = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    return made.stdout + made.stderr
