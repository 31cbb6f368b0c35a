"""The attention kernel's hot loop, read from its sm_90a SASS in CI (no GPU): found where the
source says it is (its FFMA count is the loop's arithmetic), and under the committed budget of
SASS instructions per KiB of K/V moved. Issue 13's goal is at most half of the ~269 the first
kernel had for bf16, D = 128, G = 4: lower BUDGET as the kernel gets there, never raise it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "kernel_static_report.py"
BUDGET = {"attention.bf16_d128_g4": 255.0}  # instructions per KiB; 277.0, then 251.8 with the window in the pool
UNROLL = 4  # kUnroll in plugins/src/paged_attention.cu


@pytest.fixture(scope="module")
def static_report(cmake_build, tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    run = subprocess.run([sys.executable, str(SCRIPT), "--lib", str(cmake_build[0] / "libkvzap_kernels.so"),
                          "--out", str(out)], capture_output=True, text=True)
    if "not found: pip install" in run.stderr:
        pytest.skip("cuobjdump / nvdisasm not installed")
    assert run.returncode == 0, run.stderr[-3000:]
    (report,) = out.glob("kernel-static-*.json")
    return json.loads(report.read_text())["kernels"], run.stdout


def test_every_attention_instance_is_reported_with_its_hot_loop(static_report):
    kernels, table = static_report
    assert len(kernels) == 3 * 2 * 4 and "instr/KiB" in table  # dtypes x head dims x groups
    for key, k in kernels.items():
        dtype, dim, group = key.split(".")[1].split("_")
        vec = 16 // (4 if dtype == "fp32" else 2)
        # q.k and p.v: one FFMA per element of a lane's vector, per query head, per unrolled key
        assert k["ffma"] == 2 * UNROLL * int(group[1:]) * vec, key
        assert k["kib_per_trip"] == 4.0 and k["stack_bytes"] == 0, key


def test_hot_loop_stays_within_its_instruction_budget(static_report):
    kernels, _ = static_report
    for key, budget in BUDGET.items():
        assert kernels[key]["instructions_per_kib"] <= budget, (key, kernels[key])
