#!/usr/bin/env bash
# Build a TensorRT engine for a preset and the Triton repository that serves it:
# `kvzap-trt build --engine tensorrt` (checkpoint -> ONNX -> engine -> OUT/triton; README
# "Building a TensorRT engine"). Without TensorRT, a GPU or the plugin library it stops after the
# ONNX with exit code 2 and prints the `docker run` command that finishes in the container.
# usage: scripts/build_engine.sh [PRESET] [kvzap-trt build flags: --out DIR --dry-run --resume ...]
set -euo pipefail
model=${1:-qwen3-8b}
[ $# -gt 0 ] && shift
exec "${PYTHON:-python3}" -m kvzap_trt.cli build --model "$model" --engine tensorrt "$@"
