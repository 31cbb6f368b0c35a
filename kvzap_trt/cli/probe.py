"""`kvzap-trt probe train`: a difficulty probe (kvzap_trt/kvcoe/probe.py) from labelled prompts.

Input: lines {"text": ..., "label": "fast" | "slow" | 0 | 1} (1: slow). Each text is wrapped in the
chat template (as the OpenAI chat endpoint and `generate --chat` present prompts; --raw: as is),
prefilled through the engine under the configured eviction, and its KV embedding read from the
cache. Prints the held-out accuracy (and the majority-label baseline) and writes the probe file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvzap_trt.cli.flags import EVICTION, Parser, add_config_flags, check_positive, config_from_args
from kvzap_trt.errors import KvzapError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("probe", help="difficulty probe for fast/slow reasoning (KV-CoE): train one",
                       description="The difficulty probe picks fast or slow reasoning from a prompt's prefill KV "
                       "embedding (requests with reasoning auto; kvzap_trt/kvcoe/reasoning.py).")
    probe_sub = p.add_subparsers(dest="probe_command", required=True, parser_class=Parser)
    t = probe_sub.add_parser(
        "train", help="train a probe on labelled prompts",
        description="Prefill each labelled prompt through the engine (KVzap eviction as configured), read its KV "
        "embedding (kv heads side by side, K and V means over the held tokens, mean over the last 4 layers), hold "
        "out --val-frac at random, fit the classifier (an MLP as the paper's, or logistic regression with "
        "--hidden 0) and write it as one safetensors file with its config. Prints the held-out accuracy.")
    add_config_flags(t, EVICTION)
    t.add_argument("--data", type=Path, required=True, help='lines {"text": ..., "label": "fast"|"slow"|0|1}')
    t.add_argument("--out", type=Path, required=True, help="probe file to write (.safetensors, written atomically)")
    t.add_argument("--raw", action="store_true", help="embed the texts as they are, not in the chat template")
    t.add_argument("--hidden", type=int, default=512, help="MLP hidden width (default 512, the paper's); 0: logistic regression")
    t.add_argument("--val-frac", type=float, default=0.2, help="share held out for the accuracy (default 0.2)")
    t.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps (default 300)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--seed", type=int, default=0, help="split and initialisation seed (default 0)")
    t.add_argument("--batch", type=int, default=16, help="prompts per continuous batch (default 16)")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from kvzap_trt.kvcoe.probe_train import read_labelled, train_probe
    from kvzap_trt.runtime.generate import Runtime

    check_positive(args, "batch")
    texts, labels = read_labelled(args.data)
    cfg = config_from_args(args)
    rt = Runtime.from_config(cfg)
    probe, report = train_probe(rt, texts, labels, cfg.preset or cfg.model, chat=not args.raw, hidden=args.hidden,
                                val_frac=args.val_frac, epochs=args.epochs, lr=args.lr, seed=args.seed,
                                batch=args.batch, source=str(args.data))
    try:
        probe.save(args.out)
    except PermissionError as e:
        raise KvzapError(f"cannot write {args.out}: {e.strerror}") from None
    held = report["held_out_accuracy"]
    acc = "no held-out prompts" if held is None else \
        f"held-out accuracy {held:.3f} on {report['held_out']} prompts (majority label {report['held_out_majority_accuracy']:.3f})"
    print(f"{args.out}: {report['train']} training prompts ({report['slow_share']:.0%} slow overall), "
          f"train accuracy {report['train_accuracy']:.3f}, {acc}")
    return 0
