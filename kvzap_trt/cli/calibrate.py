"""`kvzap-trt calibrate`: the threshold tau that reaches a target compression on a corpus
(kvzap_trt/train/calibrate.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvzap_trt.cli.flags import EVICTION, add_config_flags, check_positive, config_from_args
from kvzap_trt.errors import KvzapError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose the threshold tau that reaches a target compression on a corpus",
        description="Score each calibration text with the surrogate, choose tau so that the mean "
        "prefill compression over the texts hits --target, and report the spread across texts. "
        "--write-preset stores tau in the preset's YAML.",
    )
    add_config_flags(p, EVICTION)
    p.add_argument("--corpus", type=Path, required=True, help="folder of .txt calibration texts")
    p.add_argument("--target", type=float, required=True, help="target compression ratio, e.g. 0.5")
    p.add_argument("--min-tokens", type=int, default=128, help="shorter texts are skipped, as in training (default 128)")
    p.add_argument("--max-tokens", type=int, default=512, help="texts are cut to this many tokens (default 512)")
    p.add_argument("--max-texts", type=int, default=None,
                   help="use at most this many of the long-enough texts, a fixed random choice (default: all)")
    p.add_argument("--write-preset", action="store_true", help="write tau into build_configs/<preset>.yaml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvzap_trt.config import build_configs_dir
    from kvzap_trt.runtime.generate import Runtime
    from kvzap_trt.train.calibrate import calibrate, write_threshold
    from kvzap_trt.train.dataset import read_corpus, select_texts

    check_positive(args, "min_tokens", "max_tokens", "max_texts")
    cfg = config_from_args(args)
    if args.write_preset and cfg.preset is None:
        raise KvzapError("--write-preset needs --model to name a preset")
    corpus = read_corpus(args.corpus)
    rt = Runtime.from_config(cfg)
    if rt.surrogate is None or rt.tokenizer is None:
        raise KvzapError("calibration needs a surrogate and a tokenizer")
    texts = [t for _, t in select_texts(rt.tokenizer, corpus, args.min_tokens, args.max_tokens, args.max_texts)]
    result = calibrate(rt.loaded.model, rt.tokenizer, rt.surrogate, texts, args.target, cfg.window)
    result.update({"model": cfg.preset or cfg.model, "surrogate": cfg.surrogate, "corpus": str(args.corpus)})
    if args.write_preset:
        write_threshold(build_configs_dir() / f"{cfg.preset}.yaml", result["threshold"])
    if args.json:
        print(json.dumps(result))
        return 0
    past = result["evicted_past_window_mean"]
    print(f"tau {result['threshold']:.4f}: compression {result['compression_mean']:.1%} mean over "
          f"{result['prompts']} texts (std {result['compression_std']:.1%}, "
          f"{result['compression_min']:.1%} to {result['compression_max']:.1%})"
          + ("" if past is None else f"; {past:.1%} of the tokens older than the {cfg.window}-token window evicted"))
    return 0
