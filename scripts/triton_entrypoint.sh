#!/usr/bin/env bash
# Container entry point: write the model repository for $KVZAP_MODEL (a preset, default the
# embedded smollm2-135m) and hand it to the image's own tritonserver (Python backend).
# Extra arguments go to `kvzap-trt build` (e.g. --threshold -4 --kv-cache-mb 4096 --device cuda).
set -euo pipefail
repo=${KVZAP_REPOSITORY:-/opt/kvzap-trt/models}
kvzap-trt build --model "${KVZAP_MODEL:-smollm2-135m}" --out "$repo" "$@"
exec tritonserver --model-repository "$repo" --http-port 8000 --grpc-port 8001 --metrics-port 8002
