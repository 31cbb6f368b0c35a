"""`kvzap-trt score`: per-(layer, kv head, position) importance scores of a prompt, from the KVzip+
oracle (kvzap_trt/oracle/) or the surrogate."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvzap_trt.cli.flags import EVICTION, add_config_flags, add_prompt_flags, config_from_args, prompt_text
from kvzap_trt.errors import KvzapError
from kvzap_trt.oracle import ORACLES


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "score",
        help="print per-(layer, kv head, position) importance scores of a prompt",
        description="Score every KV pair of a prompt (the chat template's user turn around the text): "
        "with --oracle, KVzip+ scores (kvpress KVzipPress with kvzip_plus_normalization, linear space; "
        "positions of the chat prefix score 0); without it, the surrogate's log-scores.",
    )
    add_config_flags(p, EVICTION)
    add_prompt_flags(p, "the text to score")
    p.add_argument("--oracle", action="store_true", help="KVzip+ oracle scores instead of the surrogate's")
    p.add_argument("--oracle-variant", choices=ORACLES, default=None,
                   help="with --oracle: press, kvpress's KVzipPress (default), or kvzap-data, NVIDIA's training collector "
                   "(kvpress kvzap/data.py: one pass, full softmax, max over the repeated text)")
    p.add_argument("--chunk-size", type=int, default=2048, help="tokens repeated per oracle pass (press; default 2048)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the default prints a summary)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from kvzap_trt.oracle import oracle_scorer
    from kvzap_trt.oracle.kvzip import context_ids, surrogate_scores
    from kvzap_trt.runtime.generate import Runtime

    cfg = config_from_args(args)
    text = prompt_text(args)
    if args.chunk_size < 1:
        raise KvzapError(f"chunk size must be >= 1, got {args.chunk_size}")
    if args.oracle_variant is not None and not args.oracle:
        raise KvzapError("--oracle-variant needs --oracle (without it the surrogate scores)")
    rt = Runtime.from_config(cfg)
    tok = rt.tokenizer
    if tok is None:
        raise KvzapError(f"model {cfg.model} has no tokenizer")
    ids, prefix_len = context_ids(tok, text)
    if len(ids) > rt.loaded.config.max_position_embeddings // 2:
        raise KvzapError(f"{len(ids)} tokens: the oracle repeats the prompt, so at most half the context "
                         f"({rt.loaded.config.max_position_embeddings // 2}) fits")
    if args.oracle:
        variant = args.oracle_variant or "press"
        extra = {"chunk_size": args.chunk_size} if variant == "press" else {}
        scores, space = oracle_scorer(variant)(rt.loaded.model, tok, ids, **extra), "linear"
        kind = "kvzip+" if variant == "press" else f"kvzip+ ({variant})"
    else:
        if rt.surrogate is None:
            raise KvzapError("no surrogate to score with: pass --surrogate or --oracle")
        scores, kind, space = surrogate_scores(rt.loaded.model, rt.surrogate, ids), "surrogate", "log"
    if args.json:
        print(json.dumps({"kind": kind, "space": space, "prompt_tokens": len(ids), "prefix_tokens": prefix_len,
                          "scores": scores.tolist()}))
        return 0
    flat = scores[..., prefix_len:]
    q = torch.quantile(flat.flatten().double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    print(f"{kind} scores ({space}) of {len(ids)} tokens, {scores.shape[0]} layers x {scores.shape[1]} kv heads: "
          f"p10 {q[0]:.4g}, median {q[1]:.4g}, p90 {q[2]:.4g}")
    return 0
