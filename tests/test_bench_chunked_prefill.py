"""scripts/bench_chunked_prefill.py on a short prompt: runs end to end, writes the JSON and PNG it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_chunked_prefill.py"


@pytest.mark.slow  # loads SmolLM2 and prefills a 384-token prompt three times: ~15 s on 2 cores
def test_bench_chunked_prefill_small(smollm2_dir, tmp_path):
    args = ["--long-tokens", "384", "--chunks", "128", "192", "--decoder-new-tokens", "10", "--long-new-tokens", "4"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("chunked-prefill-*.json")
    assert path.with_suffix(".png").stat().st_size > 0
    res = json.loads(path.read_text())
    assert res["long_tokens"] == 384 and res["decoders"] == 4 and res["config"]["preset"] == "smollm2-135m"
    assert [r["chunk"] for r in res["rows"]] == [None, 128, 192]
    whole, c128, c192 = res["rows"]
    assert whole["first_token_differing_from_whole"] is None and whole["stall_vs_whole"] == 1.0
    for r in res["rows"]:
        assert r["all_finished"] and len(r["long_token_ids"]) == 4
        assert 0 < r["decoder_gap_median_ms"] <= r["decoder_gap_max_ms"] and r["long_ttft_s"] > 0
        assert 0 < r["long_compression"] < 1  # 384 tokens, a 128-token window: the preset's tau evicts some
    assert "whole" in proc.stdout and "gap max ms" in proc.stdout


def test_bench_chunked_prefill_refuses_decoders_that_end_before_the_prefill(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--long-tokens", "4096", "--chunks", "256",
                           "--decoder-new-tokens", "8", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--decoder-new-tokens must outlast" in proc.stderr
    assert not list(tmp_path.iterdir())
