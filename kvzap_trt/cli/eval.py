"""`kvzap-trt eval`: accuracy against compression on generated long-context tasks (kvzap_trt/eval/)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from kvzap_trt.cli.flags import add_config_flags, check_positive, config_from_args
from kvzap_trt.errors import KvzapError


def _list(kind: type, flag: str):
    def parse(text: str) -> list:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a comma-separated list of {kind.__name__}, got {text!r}") from None
    return parse


def add_parser(sub: Any) -> None:
    from kvzap_trt.eval.tasks import TASKS

    p = sub.add_parser(
        "eval",
        help="accuracy against compression on generated long-context tasks (RULER-style)",
        description="Generate long-context tasks locally (deterministic per seed, scored exactly), run them "
        "with the full cache, then per surrogate and threshold with KVzap and with two baselines at the same "
        "compression (window only; random eviction at KVzap's per-head rate; --baselines). Writes OUT/report.json, "
        f"report.md and report.png atomically. Tasks: {', '.join(TASKS)}.",
    )
    add_config_flags(p, ("model",))
    p.add_argument("--surrogate", action="append", default=None,
                   help="surrogate directory, HF id or random:KIND:SEED; repeat for several (default: the preset's)")
    p.add_argument("--thresholds", type=_list(float, "--thresholds"), default=[],
                   help="comma-separated taus (none: the full cache only, to find what the model can do)")
    p.add_argument("--tasks", type=_list(str, "--tasks"), default=None, help="comma-separated tasks (default: all)")
    p.add_argument("--lengths", type=_list(int, "--lengths"), default=[512, 1024],
                   help="comma-separated prompt lengths in tokens (default: 512,1024)")
    p.add_argument("--samples", type=int, default=8, help="samples per task and length (default: 8)")
    p.add_argument("--seed", type=int, default=0)
    add_config_flags(p, ("window",))
    p.add_argument("--min-full-accuracy", type=float, default=0.0,
                   help="run KVzap and baselines only where the full cache scores at least this %% (default: 0)")
    p.add_argument("--batch", type=int, default=8, help="samples per continuous batch (default: 8)")
    p.add_argument("--baselines", type=_list(str, "--baselines"), default=["window", "random"],
                   help="comma-separated baselines beside each KVzap run, window and/or random, or none "
                   "(each costs what the KVzap run costs; default: window,random)")
    add_config_flags(p, ("max_num_tokens", "device", "dtype"))
    p.add_argument("--out", type=Path, default=None, help="report directory (default: build/eval/<model>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from kvzap_trt import bench
    from kvzap_trt.eval.report import kvzap_summary, paired_summary, write_report
    from kvzap_trt.eval.runner import Prompter
    from kvzap_trt.eval.suite import BASELINES, check_baselines, evaluate
    from kvzap_trt.eval.tasks import TASKS, task_names
    from kvzap_trt.runtime.generate import Runtime
    from kvzap_trt.surrogate import load_surrogate

    tasks = task_names(args.tasks)
    baselines = check_baselines(args.baselines)
    if not all(math.isfinite(t) for t in args.thresholds):
        raise KvzapError(f"--thresholds must be finite, got {args.thresholds}")
    check_positive(args, "samples", "batch")
    if not args.lengths or min(args.lengths) < 1:
        raise KvzapError(f"--lengths must be positive, got {args.lengths}")
    cfg = config_from_args(args)  # its --surrogate (repeatable) and --seed (the tasks') are its own
    specs = args.surrogate or ([cfg.surrogate] if cfg.surrogate and args.thresholds else [])
    if args.thresholds and not specs:
        raise KvzapError(f"--thresholds needs a surrogate: {cfg.preset or cfg.model} has none, pass --surrogate")
    rt = Runtime.from_config(dataclasses.replace(cfg, surrogate=None, surrogate_kind=None))
    if rt.tokenizer is None:
        raise KvzapError(f"model {cfg.model} has no tokenizer: eval writes its prompts as text")
    limit = rt.loaded.config.max_position_embeddings
    answer = max(TASKS[t][2] for t in tasks)  # the longest answer a task asks for, in tokens
    if max(args.lengths) + answer > limit:
        raise KvzapError(f"--lengths {max(args.lengths)} leaves no room for the answer: the model's context is "
                         f"{limit} tokens{rt.loaded.config.context_note} and {', '.join(tasks)} may answer in "
                         f"{answer} tokens; use --lengths up to {limit - answer}")
    name = cfg.preset or Path(cfg.model).name
    surrogates = {Path(s).name if Path(s).expanduser().is_dir() else s: load_surrogate(s, rt.loaded.config, name)
                  for s in specs}
    prompter = Prompter(rt)
    meta = {
        "model": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": bench.machine_info(cfg.device, threads=torch.get_num_threads()),
        "command": "kvzap-trt " + shlex.join(sys.argv[1:]),
        "surrogates": specs, "thresholds": args.thresholds, "tasks": tasks, "lengths": args.lengths,
        "samples": args.samples, "seed": args.seed, "window": cfg.window, "baselines": list(baselines),
        "min_full_accuracy": args.min_full_accuracy, "decoding": "compressed (kvpress decoding=True)",
        "question": "fed after the context's prefill, over the compressed cache",
        "prefill": "whole" if cfg.max_num_tokens is None else f"in chunks of {cfg.max_num_tokens} tokens",
    }
    out = args.out or Path("build/eval") / name

    def write(runs: list[dict], complete: bool) -> None:  # partial reports while it runs, then the whole
        write_report({"meta": {**meta, "complete": complete}, "config": cfg.to_dict(), "runs": runs}, out)

    runs = evaluate(rt, prompter.ids, prompter.text, prompter.count(), tasks, args.lengths, args.samples, args.seed,
                    surrogates, args.thresholds, args.min_full_accuracy, args.batch, lambda r: write(r, False),
                    baselines)
    write(runs, True)
    paired = {p["config"]: p["full"] for p in paired_summary(runs)}
    for s in kvzap_summary(runs):
        d = paired[s["config"]]
        beside = "".join(f", {b} {s[b]:.1f}" for b in BASELINES if s[b] is not None)
        print(f"{s['config']}: compression {s['compression']:.1%}, accuracy {s['accuracy']:.1f} "
              f"(full {s['full']:.1f}{beside}) over {s['groups']} groups; "
              f"against the full cache {d['delta']:+.1f} points"
              + ("" if d["low"] is None else f", 95% interval [{d['low']:+.1f}, {d['high']:+.1f}]")
              + f", sign test p {d['p']:.2g}")
    print(out)
    return 0
