"""`kvzap-trt train`: a KVzap surrogate for a model from a folder of texts (kvzap_trt/train/)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvzap_trt.cli.flags import add_config_flags, check_positive
from kvzap_trt.config import resolve_config
from kvzap_trt.errors import KvzapError
from kvzap_trt.oracle import ORACLES


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a KVzap surrogate for a model on a folder of text files",
        description="Build (or reuse) a dataset of hidden states and log KVzip+ oracle scores from a "
        "corpus folder of .txt files, fit a linear (closed-form ridge) or MLP (AdamW, cosine) surrogate "
        "layer by layer, and write it in NVIDIA's released format with report.json and report.png "
        "(held-out R² per layer, compression vs tau, overlap with the oracle's keep set).",
    )
    add_config_flags(p, ("model",))
    p.add_argument("--corpus", type=Path, required=True, help="folder of .txt files")
    p.add_argument("--kind", choices=["linear", "mlp"], required=True)
    p.add_argument("--out", type=Path, required=True, help="surrogate directory (written atomically)")
    p.add_argument("--dataset", type=Path, default=None,
                   help="dataset directory to reuse or write (default: build/datasets/<model>-<corpus>)")
    p.add_argument("--oracle", choices=ORACLES, default="press",
                   help="training targets: press, kvpress's KVzipPress (default), or kvzap-data, NVIDIA's training collector (kvpress "
                   "kvzap/data.py, what the released nvidia/KVzap-* surrogates were fit to; their tau values assume it)")
    p.add_argument("--n-tokens", type=int, default=384,
                   help="positions sampled per text (default 384: the oracle scores every position anyway)")
    p.add_argument("--min-tokens", type=int, default=128, help="shorter texts are skipped (default 128)")
    p.add_argument("--max-tokens", type=int, default=512, help="longer texts are cut (default 512)")
    p.add_argument("--max-texts", type=int, default=None,
                   help="score at most this many of the corpus's long-enough texts, a random choice by --seed "
                   "(default: all; the oracle costs ~20 s a 1000-token text on one CPU thread for SmolLM2)")
    p.add_argument("--epochs", type=int, default=15, help="MLP epochs (default 15)")
    p.add_argument("--l2", type=float, default=1e-2, help="ridge penalty on standardised features (default 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvzap_trt.atomic import atomic_dir
    from kvzap_trt.models.loading import load_model, resolve_model_dir
    from kvzap_trt.surrogate import write_surrogate_files
    from kvzap_trt.train.dataset import Dataset, build_dataset, read_corpus
    from kvzap_trt.train.fit import train_surrogate
    from kvzap_trt.train.report import build_report, plot_report

    check_positive(args, "n_tokens", "min_tokens", "max_tokens", "epochs", "max_texts")
    cfg = resolve_config(args.model)
    corpus = read_corpus(args.corpus)
    model_dir = resolve_model_dir(cfg.model)
    loaded = load_model(model_dir)
    wanted = {"model": str(model_dir), "n_tokens": args.n_tokens, "min_tokens": args.min_tokens,
              "max_tokens": args.max_tokens, "oracle": args.oracle, "max_texts": args.max_texts}
    oracle_suffix = "" if args.oracle == "press" else f"-{args.oracle}"  # each oracle its own default dataset
    ds_dir = args.dataset or Path("build") / "datasets" / f"{cfg.preset or model_dir.name}-{args.corpus.name}{oracle_suffix}"
    ds = Dataset.open(ds_dir) if (ds_dir / "meta.json").is_file() else None
    # a dataset written before there was a choice of oracle has no "oracle": it is the press's
    if ds is None or any(ds.meta.get(k, "press" if k == "oracle" else None) != v for k, v in wanted.items()):
        ds = build_dataset(loaded, corpus, ds_dir, args.n_tokens, args.min_tokens, args.max_tokens, args.seed,
                           oracle=args.oracle, max_texts=args.max_texts)
    surrogate, fit = train_surrogate(ds, args.kind, l2=args.l2, epochs=args.epochs, seed=args.seed)
    surrogate.source = str(args.out)
    surrogate.validate(loaded.config, f"model {cfg.preset or cfg.model}")
    report = build_report(ds, surrogate, fit)
    report.update({"model": cfg.preset or cfg.model, "corpus": str(args.corpus), "dataset": str(ds_dir),
                   "texts": len(ds.meta["texts"]), "train_pairs": ds.meta["count"]["train"],
                   "options": {k: getattr(args, k) for k in ("oracle", "n_tokens", "min_tokens", "max_tokens", "max_texts",
                                                              "epochs", "l2", "seed")}})
    try:
        with atomic_dir(args.out) as tmp:
            write_surrogate_files(surrogate, tmp)
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            plot_report(report, tmp / "report.png", f"{args.kind} surrogate for {cfg.preset or cfg.model}")
    except PermissionError as e:
        raise KvzapError(f"cannot write {args.out}: {e.strerror}") from None
    ov = report["oracle_overlap"]
    print(f"{args.out}: held-out R² mean {report['r2_test_mean']:.3f}; keeps "
          + ", ".join(f"{o['surrogate']:.0%} of the oracle's pairs at {o['compression']:.0%} compression "
                      f"(random {o['random']:.0%})" for o in ov))
    return 0
