"""scripts/bench_serve.py --openai: without AIPerf it stops at once with the install line (the
run itself needs AIPerf in its own environment; its figures are in bench/results/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py"


def test_openai_mode_without_aiperf_names_the_fix(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--openai", "--aiperf", str(tmp_path / "no-aiperf"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "aiperf not found" in done.stderr and "pip install aiperf" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_openai_mode_is_listed_in_the_help():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--openai" in done.stdout and "AIPerf" in done.stdout
