"""scripts/bench_memory.py's page-size sweep on short prompts: bytes the pool really holds per page size."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"
TOKEN_BYTES = 2 * 64 * 4 + 8  # SmolLM2-135M in float32: K and V of head_dim 64, a position and a score


@pytest.mark.slow  # loads SmolLM2; 8 short generations: ~10 s on 2 cores
def test_page_size_sweep(smollm2_dir, tmp_path):
    args = ["--tokens", "40", "300", "--block-sizes", "16", "64", "--thresholds", "0", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("memory-pages-*.json")
    assert path.with_suffix(".png").stat().st_size > 0
    res = json.loads(path.read_text())
    assert res["block_sizes"] == [16, 64] and res["prompt_tokens"] == [40, 300]
    rows = {(r["prompt_tokens"], r["block_size"], r["threshold"]): r for r in res["rows"]}
    assert set(rows) == {(n, bs, tau) for n in (40, 300) for bs in (16, 64) for tau in (None, 0.0)}
    assert all(r["within_bound"] and r["same_decisions"] for r in rows.values())
    assert rows[(300, 16, 0.0)]["compression_ratio"] > 0.1  # 300 tokens leave 172 past the window to evict
    for n in (40, 300):
        for tau in (None, 0.0):
            small, big = rows[(n, 16, tau)], rows[(n, 64, tau)]
            # A multiple of 64 tokens covering a head is a multiple of 16 covering it: never fewer bytes.
            assert big["bytes_allocated"] >= small["bytes_allocated"] and big["page_waste"] >= small["page_waste"]

    # The allocation recounted from the positions each head holds: its kept pages and window pages.
    from kvzap_trt.config import resolve_config
    from kvzap_trt.runtime.generate import Runtime

    cfg = resolve_config("smollm2-135m", max_new_tokens=4, surrogate="random:linear:0", threshold=0.0, block_size=64)
    rt = Runtime.from_config(cfg)
    kv = rt.generate([rt.encode(long_text())[:300]], rt.sampling(stop_token_ids=()), positions=True)[0].kv
    window = min(kv["tokens"], cfg.window)
    pages = sum(math.ceil((len(head) - window) / 64) + math.ceil(window / 64) for layer in kv["positions"] for head in layer)
    assert rows[(300, 64, 0.0)]["bytes_allocated"] == kv["bytes_allocated"] == pages * 64 * TOKEN_BYTES


def long_text() -> str:
    """The script's prompt text (scripts/bench_text.py, imported as the script imports it)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from bench_text import long_text as text
    finally:
        sys.path.pop(0)
    return text()
