#!/usr/bin/env python
"""Surrogates side by side on datasets of oracle scores: which one predicts the oracle better.

For every dataset (written by `kvzap-trt train`, or by `train --dataset D` on a corpus kept out of
training) and every surrogate: the R² of its log-scores against the oracle's, mean over layers and
kv heads, and how much of the oracle's keep set it keeps when it evicts the same number of
(layer, kv head, position) pairs, its lowest-scoring ones over all layers as KVzap's one tau does
(a random choice keeps 1 - compression of them), at each `--compressions`. Also the tau at which
the surrogate evicts that share of the dataset's pairs, to show how its score scale moves with the
texts. Prints a table, writes bench/results/surrogates-<date>.json and .png.

    .venv/bin/python scripts/compare_surrogates.py \\
        --dataset build/datasets/eval-short --dataset build/datasets/eval-long --split all \\
        --surrogate build_configs/surrogates/smollm2-135m-mlp --surrogate build/surrogates/smollm2-135m-mlp-long

`--split test` (the default) reads only each dataset's held-out texts: use it for the dataset a
surrogate was trained on. `--split all` reads both: for a dataset none of the surrogates saw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvzap_trt import bench
from kvzap_trt.errors import KvzapError


def compare(datasets: list[Path], surrogates: list[Path], splits: tuple[str, ...],
            compressions: list[float]) -> list[dict]:
    """One row per (dataset, surrogate): r2_mean, r2_min_layer, and per compression the keep-set
    overlap with the oracle and the tau reaching it."""
    import torch

    from kvzap_trt.surrogate import read_surrogate_dir
    from kvzap_trt.train.dataset import Dataset
    from kvzap_trt.train.fit import r2_score
    from kvzap_trt.train.report import held_out, overlap_with_oracle

    rows = []
    for d in datasets:
        ds = Dataset.open(d)
        lengths = [t["tokens"] for t in ds.meta["texts"] if t["split"] in splits]
        for path in surrogates:
            s = read_surrogate_dir(path)
            if (s.n_modules, s.input_dim, s.output_dim) != (ds.meta["num_layers"], ds.meta["hidden_size"],
                                                           ds.meta["num_kv_heads"]):
                raise KvzapError(f"surrogate {path} ({s.n_modules} layers, {s.input_dim} -> {s.output_dim}) does not fit "
                                 f"dataset {d} ({ds.meta['num_layers']} layers, {ds.meta['hidden_size']} -> "
                                 f"{ds.meta['num_kv_heads']})")
            with torch.no_grad():
                pred, y = held_out(ds, s, splits)
            r2 = [r2_score(p.double(), t.double()) for p, t in zip(pred, y)]  # per layer, mean over kv heads
            sample = pred.flatten()[:: max(1, pred.numel() // 2_000_000)]
            rows.append({
                "dataset": str(d), "surrogate": str(path), "oracle": ds.meta.get("oracle", "press"),
                "texts": len(lengths), "text_tokens": [min(lengths), max(lengths)], "pairs": int(y.numel()),
                "r2_mean": sum(r2) / len(r2), "r2_min_layer": min(r2),
                "by_compression": [{"compression": c, "keeps_of_oracle": overlap_with_oracle(pred, y, c), "random": 1 - c,
                                    "tau": float(torch.quantile(sample, c))} for c in compressions],
            })
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == d]
        cs = [b["compression"] for b in mine[0]["by_compression"]]
        for r in mine:
            ax.plot(cs, [b["keeps_of_oracle"] for b in r["by_compression"]], "o-", ms=4,
                    label=f"{Path(r['surrogate']).name} (R² {r['r2_mean']:.2f})")
        ax.plot(cs, [1 - c for c in cs], "k--", lw=1, label="random")
        ax.set_title(f"{Path(d).name}: {mine[0]['texts']} texts, {mine[0]['text_tokens'][0]}-"
                     f"{mine[0]['text_tokens'][1]} tokens", fontsize=9)
        ax.set_xlabel("compression (share of pairs evicted)")
        ax.set_ylabel("share of the oracle's kept pairs kept")
        ax.legend(fontsize=7)
    fig.tight_layout()
    bench.save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", type=Path, action="append", required=True, help="dataset directory; repeat for several")
    ap.add_argument("--surrogate", type=Path, action="append", required=True, help="surrogate directory; repeat")
    ap.add_argument("--split", choices=["test", "all"], default="test",
                    help="test: the held-out texts only (default); all: every text (datasets no surrogate was trained on)")
    ap.add_argument("--compressions", default="0.5,0.75,0.85", help="comma-separated shares of pairs evicted")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="surrogates", help="file name stem of the JSON and PNG (default: surrogates)")
    args = ap.parse_args(argv)
    try:
        compressions = [float(c) for c in args.compressions.split(",")]
    except ValueError:
        raise SystemExit(f"--compressions: not a list of numbers: {args.compressions!r}") from None
    if not all(0 < c < 1 for c in compressions):
        raise SystemExit(f"--compressions must lie strictly between 0 and 1, got {args.compressions}")
    splits = ("test",) if args.split == "test" else ("train", "test")
    try:
        rows = compare(args.dataset, args.surrogate, splits, compressions)
    except KvzapError as e:
        raise SystemExit(str(e)) from None

    head = f"{'dataset':<22} {'surrogate':<28} {'texts':>5} {'R²':>6}" + "".join(
        f" {'keeps @' + format(c, '.0%'):>11} {'tau':>7}" for c in compressions)
    print(head)
    for r in rows:
        print(f"{Path(r['dataset']).name[:22]:<22} {Path(r['surrogate']).name[:28]:<28} {r['texts']:>5} {r['r2_mean']:>6.3f}"
              + "".join(f" {b['keeps_of_oracle']:>11.3f} {b['tau']:>7.2f}" for b in r["by_compression"]))
    print("random keeps " + ", ".join(f"{1 - c:.3f} @ {c:.0%}" for c in compressions))
    record = bench.result(args.name, "compare_surrogates.py", argv, bench.machine_info(), options=bench.options(args),
                          rows=rows)
    path = bench.write_result(record, args.out)
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
