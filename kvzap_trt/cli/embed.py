"""`kvzap-trt embed`: KV embeddings of texts, read from the engine's cache after prefill (KV-CoE,
kvzap_trt/kvcoe/embedding.py).

Output: one JSON object per line, in input order:
  {"index": i, "embedding": [...], "prompt_tokens": n, "kv_compression_ratio": r}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvzap_trt.cli.flags import EVICTION, add_config_flags, add_prompt_flags, check_positive, config_from_args, \
    prompt_text
from kvzap_trt.errors import KvzapError

# kvzap_trt/kvcoe/embedding.py's HEAD_AGGS (imported there with torch; tests/test_cli_flags.py
# checks they are equal)
HEAD_AGGS = ("mean", "flatten")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "embed",
        help="KV-cache embeddings of texts (KV-CoE): the kept K/V of the last layers, mean-pooled",
        description="Prefill each text through the engine (KVzap eviction as configured; --threshold -1e9 "
        "keeps everything) and read its embedding from the cache: per kv head the mean of the held K and V "
        "(kept pages + window), averaged over heads and the last --layers layers, L2-normalised "
        "(arXiv 2601.20326). Prints one JSON object per text, in input order.",
    )
    add_config_flags(p, EVICTION)
    add_prompt_flags(p, "the text").add_argument("--jsonl", type=Path, help='file of lines {"text": ...} (blank lines skipped)')
    p.add_argument("--layers", type=int, default=4, help="last layers to use, 0: all (default: 4, as the paper)")
    p.add_argument("--head-agg", choices=HEAD_AGGS, default="mean",
                   help="mean (default, the paper's: 2 * head_dim values) or flatten (kv_heads * 2 * head_dim)")
    p.add_argument("--batch", type=int, default=16, help="texts per continuous batch (default: 16)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON lines here (default: stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvzap_trt.kvcoe.embedding import KVEmbedding
    from kvzap_trt.kvcoe.jsonl import read_jsonl
    from kvzap_trt.runtime.generate import Runtime

    check_positive(args, "batch")
    embedding = KVEmbedding(last_layers=args.layers, head_agg=args.head_agg)
    if args.jsonl is not None:
        texts = [obj["text"] for _, obj in read_jsonl(args.jsonl)]
    else:
        texts = [prompt_text(args)]
    rt = Runtime.from_config(config_from_args(args))
    ids = [rt.encode(t) for t in texts]
    for i, t in enumerate(ids):
        if not t:
            raise KvzapError(f"text {i} has no tokens")
    reqs = rt.embed(ids, embedding, args.batch)
    lines = [json.dumps({"index": i, "embedding": r.embedding.tolist(), "prompt_tokens": len(r.prompt_ids),
                         "kv_compression_ratio": r.kv["compression_ratio"]}) for i, r in enumerate(reqs)]
    text = "\n".join(lines) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        from kvzap_trt.atomic import atomic_write_text

        atomic_write_text(args.out, text)
    return 0
