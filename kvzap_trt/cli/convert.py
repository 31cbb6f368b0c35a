"""`kvzap-trt convert`: a TensorRT-LLM checkpoint with the KVzap surrogate folded in
(kvzap_trt/convert/writer.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvzap_trt.cli.flags import EVICTION, add_config_flags, config_from_args


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="fold a KVzap surrogate into a TensorRT-LLM checkpoint",
        description="Write a TensorRT-LLM 1.x checkpoint (config.json with a kvzap section, "
        "rank{N}.safetensors, manifest.json) for a Llama, Mistral, Qwen2 or Qwen3 model with its KVzap surrogate, "
        "sharded for tensor parallelism, tensor by tensor. `kvzap-trt generate --model OUT` runs it.",
    )
    add_config_flags(p, EVICTION)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory (written atomically)")
    add_config_flags(p, ("tp",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvzap_trt.convert.writer import convert

    cfg = config_from_args(args)
    print(convert(cfg, args.out, cfg.tp, cfg.dtype))
    return 0
