#!/usr/bin/env bash
# Serve a repository of `kvzap-trt build` (OUT/triton with --engine tensorrt) with tritonserver's
# Python backend; kvzap_trt must import in tritonserver's Python (the Dockerfile's image).
# usage: scripts/launch_triton.sh REPOSITORY [more tritonserver flags]
# Ports: $HTTP_PORT (8000), $GRPC_PORT (8001), $METRICS_PORT (8002); $TRITONSERVER names the binary.
set -euo pipefail
repo=${1:?usage: launch_triton.sh REPOSITORY [tritonserver flags]}
shift
if [ ! -d "$repo" ] || ! compgen -G "$repo/*/config.pbtxt" > /dev/null; then
  echo "launch_triton.sh: $repo is not a model repository (no */config.pbtxt): write one with kvzap-trt build" >&2
  exit 2
fi
exec "${TRITONSERVER:-tritonserver}" --model-repository "$repo" --http-port "${HTTP_PORT:-8000}" \
  --grpc-port "${GRPC_PORT:-8001}" --metrics-port "${METRICS_PORT:-8002}" "$@"
