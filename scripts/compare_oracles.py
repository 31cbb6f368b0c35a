#!/usr/bin/env python
"""The two KVzip+ oracles side by side on SmolLM2: kvpress's KVzipPress ("press", oracle/kvzip.py)
and NVIDIA's training collector ("kvzap-data", kvpress kvzap/data.py; oracle/repeat_once.py).

For slices of real English (the standard library's documentation), the log-scores of every
(layer, kv head, position) of the text under both: their correlation per layer, the mean and
spread of press - kvzap-data, and how much of one's keep set the other keeps at 50% and 75%
compression (the top scores over all layers and heads). Prints a table and writes
bench/results/oracles-<date>.json.

    .venv/bin/python scripts/compare_oracles.py [--slices 0:512 30000:512 10000:1000 20000:1200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from bench_text import long_text  # scripts/ is on sys.path when a script runs
from kvzap_trt import bench
from kvzap_trt.config import resolve_config
from kvzap_trt.models.loading import load_model, resolve_model_dir
from kvzap_trt.oracle.kvzip import context_ids, kvzip_plus_scores
from kvzap_trt.oracle.repeat_once import repeat_once_scores
from kvzap_trt.train.report import overlap_with_oracle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", nargs="+", default=["0:512", "30000:512", "10000:1000", "20000:1200"],
                    help="START:TOKENS slices of the documentation text")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    machine = bench.machine_info()

    loaded = load_model(resolve_model_dir(resolve_config("smollm2-135m").model))
    tok = loaded.tokenizer
    full = tok.encode(long_text(), add_special_tokens=False)
    rows = []
    for spec in tqdm(args.slices, desc="slices", file=sys.stderr):
        start, n = (int(x) for x in spec.split(":"))
        if start + n > len(full):
            raise SystemExit(f"slice {spec} is past the text's {len(full)} tokens")
        ids, prefix = context_ids(tok, tok.decode(full[start:start + n]))
        press = kvzip_plus_scores(loaded.model, tok, ids)[..., prefix:].clamp(min=1e-30).log()  # [L, Hkv, T]
        data = repeat_once_scores(loaded.model, tok, ids)[..., prefix:].clamp(min=1e-30).log()
        corr = [torch.corrcoef(torch.stack([press[i].flatten(), data[i].flatten()]))[0, 1].item()
                for i in range(press.shape[0])]
        diff = press - data
        rows.append({"start": start, "tokens": len(ids) - prefix, "corr_min": min(corr), "corr_max": max(corr),
                     "diff_mean": diff.mean().item(), "diff_std": diff.std().item(),
                     "keep_overlap_50": overlap_with_oracle(data, press, 0.5),
                     "keep_overlap_75": overlap_with_oracle(data, press, 0.75)})

    print(f"\n{'start':>6} {'tokens':>6} {'corr per layer':>15} {'press - data':>14} {'keep 50%':>9} {'keep 75%':>9}")
    for r in rows:
        print(f"{r['start']:>6} {r['tokens']:>6} {r['corr_min']:>7.3f}-{r['corr_max']:.3f} "
              f"{r['diff_mean']:>+7.3f} ± {r['diff_std']:.2f} {r['keep_overlap_50']:>9.3f} {r['keep_overlap_75']:>9.3f}")
    result = bench.result("oracles", "compare_oracles.py", argv, machine, model="smollm2-135m", rows=rows)
    path = bench.write_result(result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
