#!/usr/bin/env python
"""The key figures of one scripts/gpu_check.sh step, as one line for its summary.md table.

    python scripts/gpu_check_figures.py junit RESULTS/junit-gpu.xml
    python scripts/gpu_check_figures.py sanitizer RESULTS/sanitize-memcheck.log
    python scripts/gpu_check_figures.py kernels RESULTS      # newest kernels-*.json there
    python scripts/gpu_check_figures.py e2e RESULTS          # newest e2e-*.json there
Standard library only: it must run where the step it summarises failed.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def junit(path: Path) -> str:
    """pytest's counts from its JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped of {n['tests']}"


def sanitizer(path: Path) -> str:
    """compute-sanitizer's error summary and the driver's own verdict from one log."""
    text = path.read_text(errors="replace")
    # memcheck, initcheck, synccheck: "ERROR SUMMARY: N errors"; racecheck: "RACECHECK SUMMARY: N hazards
    # displayed (E errors, W warnings)"
    found = re.findall(r"(?:ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?)", text)
    found = [a or b for a, b in found]
    verdict = re.findall(r"sanitize_kernels: (\d+ of \d+) runs match", text)
    parts = [f"sanitizer: {found[-1]} errors" if found else "sanitizer: no summary",
             f"{verdict[-1]} runs match the reference" if verdict else "driver did not finish"]
    return "; ".join(parts)


def newest(folder: Path, pattern: str) -> dict:
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no {pattern} in {folder}")
    return json.loads(files[-1].read_text())


def kernels(folder: Path) -> str:
    """Copy bandwidth, the best decode attention GB/s and its speed-up over dense, evict times."""
    r = newest(folder, "kernels-*.json")
    # The engine's layout (16-token pages, scattered); the page-size and page-run rows are the sweep's.
    attention = [c for c in r["cases"] if "GBps" in c and c["block_size"] == r["shapes"]["block_size"]
                 and not c.get("page_runs")]
    best = max(attention, key=lambda c: c["GBps"])
    evict = {c["kernel"]: c["time_us"] for c in r["cases"] if c["kernel"].startswith("evict")}
    # Prompt rows through the kernel's packed launch over PyTorch's attention (> 1: the kernel is slower)
    prompts = [f"prompt {c['prompt']} {c['packed_kernel_vs_fused_causal']:.2f}x" for c in r["cases"]
               if c["kernel"] == "fresh_prompt_attention"]
    chunks = [f"chunk {c['chunk']} kept {c['kept_fraction']:.2f} {c['packed_kernel_vs_gather_fused']:.2f}x"
              for c in r["cases"] if c["kernel"] == "chunk_attention"]
    return (f"{r['device']}: copy {r['copy_GBps']:.0f} GB/s; decode attention best {best['GBps']:.0f} GB/s "
            f"({100 * best['GBps'] / r['copy_GBps']:.0f}% of copy; batch {best['batch']}, kv {best['kv_len']}, "
            f"kept {best['kept_fraction']:.2f}); max speed-up vs dense "
            f"{max(c['speedup_vs_dense'] for c in attention):.2f}x; "
            + ", ".join(f"{k} {v:.1f} us" for k, v in evict.items())
            + ("; packed kernel / PyTorch: " + ", ".join(prompts + chunks) if prompts or chunks else ""))


def e2e(folder: Path) -> str:
    """KVzap over dense: peak concurrent sequences and decode tokens/s."""
    r = newest(folder, "e2e-*.json")
    ratio = r["kvzap_over_dense"]
    tps = ratio.get("decode_tokens_per_s")
    rows = {row["config"]: row for row in r["rows"]}
    return (f"ops {r['ops']}; compression {rows['kvzap']['compression_ratio']:.1%}; kvzap/dense peak seqs "
            f"{ratio['peak_seqs']:.2f}x, decode tokens/s " + (f"{tps:.2f}x" if tps else "-"))


KINDS = {"junit": junit, "sanitizer": sanitizer, "kernels": kernels, "e2e": e2e}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in KINDS:
        print(f"usage: gpu_check_figures.py {{{','.join(KINDS)}}} PATH", file=sys.stderr)
        return 2
    try:
        print(KINDS[args[0]](Path(args[1])))
    except (OSError, ValueError, KeyError, ET.ParseError) as e:
        print(f"no figures ({type(e).__name__}: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
