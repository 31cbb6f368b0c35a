"""scripts/bench_cpu.py --quick: runs end to end, prints its table, writes the JSON and PNG it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_cpu.py"
CONFIGS = ["kvzap-tau", "kvzap-dense", "hf-dense"]
RATIOS = ("prefill_s", "decode_tok_s", "total_s", "peak_rss_mib", "kv_bytes")


@pytest.mark.slow  # five processes that each load the model: about a minute on 2 cores
def test_bench_cpu_quick(smollm2_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("cpu-quick-*.json")
    assert path.with_suffix(".png").stat().st_size > 0
    res = json.loads(path.read_text())

    assert res["benchmark"] == "cpu" and res["new_tokens"] == 8 and "--quick" in res["command"]
    m = res["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["torch"] and m["transformers"] and m["threads"] == 1
    assert [(r["length"], r["config"]) for r in res["rows"]] == [(256, c) for c in CONFIGS]
    for r in res["rows"]:
        assert r["prompt_tokens"] == 256 and r["new_tokens"] == 8 and len(r["token_ids"]) == 8
        assert 0 < r["prefill_s"] < r["total_s"], r
        assert r["decode_tok_s"] > 0 and r["peak_rss_mib"] > 0 and r["kv_bytes"] > 0, r
        assert r["torch_threads"] == 1
    rows = {r["config"]: r for r in res["rows"]}
    assert rows["kvzap-dense"]["compression_ratio"] == rows["hf-dense"]["compression_ratio"] == 0.0
    assert 0 < rows["kvzap-tau"]["compression_ratio"] < 1  # the 128-token window leaves 128 to evict
    assert rows["kvzap-tau"]["kv_bytes"] < rows["kvzap-dense"]["kv_bytes"]

    (c,) = res["comparisons"]
    assert isinstance(c["tokens_match_dense"], bool)  # a mismatch is a finding, reported, not a failure
    assert all(c[f"{name}_over_hf_{k}"] > 0 for name in ("kvzap-tau", "kvzap-dense") for k in RATIOS)
    assert res["nocache"] is None  # --quick skips the no-cache runs
    wp = res["whole_process"]
    assert [r["job"] for r in wp["rows"]] == ["kvzap-trt generate", "transformers script"]
    assert all(r["wall_s"] > 0 and r["peak_rss_mib"] > 0 and r["new_tokens"] > 0 for r in wp["rows"])
    assert wp["kvzap_over_hf_wall"] > 0

    out = proc.stdout
    assert "kvzap-trt / transformers dense" in out and "whole process, 256-token prompt" in out
    for config in CONFIGS:
        assert f"   256 {config:>13} " in out  # one table row per configuration
    assert f"wrote {path}" in out
