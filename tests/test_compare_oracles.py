"""scripts/compare_oracles.py on one short slice: runs, prints, writes the JSON it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_oracles.py"


@pytest.mark.slow  # loads SmolLM2, scores 96 tokens with both oracles: a few seconds
def test_compare_oracles_small(smollm2_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--slices", "100:96", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("oracles-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["start"] == 100 and 90 <= row["tokens"] <= 100  # a decoded slice re-encodes to about its length
    assert -1 <= row["corr_min"] <= row["corr_max"] <= 1 and row["corr_max"] > 0.5  # two views of one quantity
    assert 0 < row["keep_overlap_50"] <= 1 and 0 < row["keep_overlap_75"] <= 1 and row["diff_std"] > 0
    assert "keep 75%" in proc.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--slices", "10000000:10", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "past the text's" in bad.stderr and not (tmp_path / "x").exists()
