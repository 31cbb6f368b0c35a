"""scripts/gpu_check.sh and its helpers, on a machine without a GPU: the dry run prints the whole
plan, bad input is refused, the sanitizer driver's checks fail on wrong output, and the summary's
figures are read from each step's outputs."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvzap_trt.ops.dispatch import REFERENCE

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=300)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_every_step_in_order_and_writes_nothing(tmp_path):
    results = tmp_path / "results"
    r = run("bash", "scripts/gpu_check.sh", str(results), "--dry-run")
    assert r.returncode == 0, r.stderr
    plan = [line for line in r.stdout.splitlines() if line.startswith("[")]
    wanted = [  # (phase, a piece of the exact command), in the order they must run
        ("build", f"> {results}/env.txt"),
        ("build", "scripts/gpu_wheels.sh install"),
        ("build", "cuda_kernels.load()"),
        ("build", "cmake -S plugins -B build/gpu_check/plugins -DCMAKE_CUDA_ARCHITECTURES="),
        ("build", "-DKVZAP_TORCH_OPS=ON"),
        ("test", "-m pytest -m gpu"),
        ("sanitize", "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 86 --print-limit 20 "
                     "--kernel-name kns=kvzap --tool memcheck"),
        ("sanitize", "--kernel-name kns=kvzap --tool racecheck"),
        ("sanitize", "--kernel-name kns=kvzap --tool initcheck"),
        ("sanitize", "--kernel-name kns=kvzap --tool synccheck"),
        ("bench", f"scripts/bench_kernels.py --out {results}"),
        ("bench", f"scripts/bench_e2e.py --out {results}"),
    ]
    at = 0
    for phase, piece in wanted:
        at = next((i for i in range(at, len(plan)) if plan[i].startswith(f"[{phase}]") and piece in plan[i]), None)
        assert at is not None, f"[{phase}] ... {piece} missing or out of order in:\n" + "\n".join(plan)
    assert f"--junitxml={results}/junit-gpu.xml" in r.stdout
    # pytest imports only the files with GPU tests (the others need packages the GPU machine lacks)
    pytest_line = next(line for line in plan if "-m pytest -m gpu" in line)
    assert "tests/test_engine_cuda.py" in pytest_line and "tests/test_openai_api.py" not in pytest_line
    assert " -x " not in r.stdout  # every failure, not the first
    assert re.search(r"-DCMAKE_CUDA_ARCHITECTURES=\d+a? ", r.stdout)
    assert r.stdout.count("scripts/sanitize_kernels.py") == 4
    assert not results.exists()


def test_dry_run_of_one_phase_prints_only_that_phase(tmp_path):
    r = run("bash", "scripts/gpu_check.sh", str(tmp_path), "--phase", "sanitize", "--dry-run")
    assert r.returncode == 0, r.stderr
    phases = {line.split("]")[0][1:] for line in r.stdout.splitlines() if line.startswith("[")}
    assert phases == {"sanitize"}


@pytest.mark.parametrize("args,message", [
    (["--phase", "nope"], "unknown phase 'nope'"),
    ([], "RESULTS_DIR is required"),
    (["--bogus"], "unknown option '--bogus'"),
])
def test_bad_arguments_are_refused_clearly(tmp_path, args, message):
    r = run("bash", "scripts/gpu_check.sh", *([str(tmp_path)] if args != [] else []), *args, "--dry-run")
    assert r.returncode == 2
    assert message in r.stderr


def test_help():
    r = run("bash", "scripts/gpu_check.sh", "--help")
    assert r.returncode == 0
    assert "--phase build|test|sanitize|bench|all" in r.stdout and "--dry-run" in r.stdout


def test_sanitize_driver_help_needs_no_gpu():
    r = run(sys.executable, "scripts/sanitize_kernels.py", "--help")
    assert r.returncode == 0
    assert "compute-sanitizer" in r.stdout and "--device" in r.stdout


def test_sanitize_driver_with_the_reference_on_both_sides():
    r = run(sys.executable, "scripts/sanitize_kernels.py", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sanitize_kernels: 8 of 8 runs match the reference" in r.stdout


def test_sanitize_driver_fails_on_wrong_output():
    """What a sanitizer run checks besides memory: a kernel that keeps the wrong tokens or
    attends wrongly makes the driver fail."""
    driver = load_script("sanitize_kernels")
    g = torch.Generator().manual_seed(0)
    keeps_too_much = SimpleNamespace(evict_append=lambda *a: REFERENCE.evict_append(*a[:-1], a[-1] - 0.5))
    with pytest.raises(AssertionError, match="differ"):
        driver.evict_check([[300, 1]], "cpu", keeps_too_much, torch.float32, g)
    off_by_one_percent = SimpleNamespace(paged_attention=lambda *a: 1.01 * REFERENCE.paged_attention(*a))
    with pytest.raises(AssertionError, match="max abs error"):
        driver.attention_check([[129, 40]], [24], "cpu", off_by_one_percent, torch.float32, g)


def test_summary_figures(tmp_path):
    figures = load_script("gpu_check_figures")
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite tests="10" failures="2" errors="1" skipped="3"/></testsuites>')
    assert figures.junit(junit) == "4 passed, 2 failed, 1 errors, 3 skipped of 10"
    log = tmp_path / "memcheck.log"
    log.write_text("ok    x\nsanitize_kernels: 6 of 6 runs match the reference (cuda on cuda)\n"
                   "========= ERROR SUMMARY: 3 errors\n")
    assert figures.sanitizer(log) == "sanitizer: 3 errors; 6 of 6 runs match the reference"
    log.write_text("sanitize_kernels: 6 of 6 runs match the reference (cuda on cuda)\n"  # racecheck's own summary
                   "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n")
    assert figures.sanitizer(log) == "sanitizer: 1 errors; 6 of 6 runs match the reference"
    (tmp_path / "kernels-h100-2026-11-24.json").write_text(json.dumps({
        "device": "NVIDIA H100", "copy_GBps": 3000.0, "shapes": {"block_size": 16},
        "cases": [{"kernel": "varlenPagedAttention", "batch": 8, "kv_len": 4096, "kept_fraction": 0.5, "block_size": 16,
                   "page_runs": False, "time_us": 10.0, "GBps": 1500.0, "speedup_vs_dense": 1.8},
                  # the sweep's rows (another page size, pages in runs) are not the engine's layout
                  {"kernel": "varlenPagedAttention", "batch": 8, "kv_len": 4096, "kept_fraction": 0.5, "block_size": 64,
                   "page_runs": False, "time_us": 5.0, "GBps": 2900.0, "speedup_vs_dense": 3.6},
                  {"kernel": "varlenPagedAttention", "batch": 8, "kv_len": 4096, "kept_fraction": 0.5, "block_size": 16,
                   "page_runs": True, "time_us": 6.0, "GBps": 2500.0, "speedup_vs_dense": 3.0},
                  {"kernel": "evict_decode", "time_us": 4.25}]}))
    assert figures.kernels(tmp_path) == ("NVIDIA H100: copy 3000 GB/s; decode attention best 1500 GB/s (50% of copy; "
                                         "batch 8, kv 4096, kept 0.50); max speed-up vs dense 1.80x; "
                                         "evict_decode 4.2 us")
    # bench_kernels' prompt-row cases add the packed launch's time over PyTorch's
    run = json.loads((tmp_path / "kernels-h100-2026-11-24.json").read_text())
    run["cases"] += [{"kernel": "chunk_attention", "chunk": 512, "kept_fraction": 0.25, "time_us": 30.0,
                      "packed_kernel_vs_gather_fused": 0.75},
                     {"kernel": "fresh_prompt_attention", "prompt": 8192, "time_us": 900.0,
                      "packed_kernel_vs_fused_causal": 3.125}]
    (tmp_path / "kernels-h100-2026-11-24.json").write_text(json.dumps(run))
    assert figures.kernels(tmp_path).endswith(
        "evict_decode 4.2 us; packed kernel / PyTorch: prompt 8192 3.12x, chunk 512 kept 0.25 0.75x")
    (tmp_path / "e2e-h100-2026-11-24.json").write_text(json.dumps({
        "ops": "cuda", "kvzap_over_dense": {"peak_seqs": 3.5, "decode_tokens_per_s": 2.0},
        "rows": [{"config": "dense", "compression_ratio": 0.0}, {"config": "kvzap", "compression_ratio": 0.72}]}))
    assert figures.e2e(tmp_path) == "ops cuda; compression 72.0%; kvzap/dense peak seqs 3.50x, decode tokens/s 2.00x"
    assert figures.main(["e2e", str(tmp_path / "absent")]) == 0  # a failed step still gets a row


def test_a_phase_whose_ops_do_not_load_skips_its_steps_and_packs_what_ran(tmp_path):
    """A real run (no GPU needed: the interpreter is `false`, so the torch ops cannot load): the
    test phase's pytest step is skipped, not run against a failed build, and --tar holds the
    summary as it stood after each step."""
    import os
    import tarfile

    import shutil

    # The scripts in a tree of their own: nothing is written under this checkout's build/.
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_wheels.sh", "gpu_check_figures.py"):
        shutil.copy(SCRIPTS / name, tree / "scripts" / name)
    results, tar = tmp_path / "results", tmp_path / "results.tar.gz"
    r = subprocess.run(["bash", "scripts/gpu_check.sh", str(results), "--phase", "test", "--tar", str(tar)],
                       cwd=tree, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": "false"})
    assert r.returncode == 1
    summary = (results / "summary.md").read_text()
    assert re.search(r"\| test \| load \| .* \| 1 \|", summary)
    assert "| test | pytest-gpu | - | skipped | 0 | the torch ops did not load |" in summary
    assert not (results / "test-pytest-gpu.log").exists()
    with tarfile.open(tar) as t:
        packed = t.extractfile("results/summary.md").read().decode()
    assert packed == summary
