"""`kvzap-trt generate`: one prompt through the engine, with KVzap eviction over the paged cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvzap_trt.cli.flags import EVICTION, REASONING, SAMPLING, add_config_flags, add_prompt_flags, config_from_args, \
    prompt_text, read_prompt_ids
from kvzap_trt.config import REASONING_MODES, preset_names
from kvzap_trt.errors import KvzapError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with KVzap eviction over the paged cache",
        description="Generate with KVzap: tokens whose surrogate log-score is below the threshold are "
        "evicted from the per-head paged KV cache once they leave the sliding window. "
        f"Presets: {', '.join(preset_names())}.",
    )
    add_config_flags(p, EVICTION)
    add_prompt_flags(p, "the prompt").add_argument("--prompt-ids-file", type=Path, help="file holding a JSON list of token ids")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_config_flags(p, SAMPLING)
    p.add_argument("--json", action="store_true", help="print one JSON object (token ids, text, KV statistics)")
    p.add_argument("--reasoning", choices=REASONING_MODES, default=None,
                   help="fast: thinking off (Qwen3's enable_thinking switch) and/or --fast-max-new-tokens; slow: as "
                   "asked; auto: the --probe picks after prefill (default: off)")
    add_config_flags(p, REASONING)
    p.add_argument("--positions", action="store_true", help="with --json: list the kept positions per layer and head")
    p.add_argument("--kv-coe", action="store_true",
                   help="with --json: add kv_coe_score (KV-CoE self-evaluation, higher: more likely right) and kv_coe")
    p.add_argument("--executor", choices=["torch", "onnx", "tensorrt"], default="torch",
                   help="torch (default): the PyTorch forward; onnx: the exported graph on ONNX Runtime (CPU, float32); "
                   "tensorrt: an engine of `kvzap-trt build --engine tensorrt` (CUDA; needs --engine-file)")
    p.add_argument("--onnx", type=Path, default=None,
                   help="with --executor onnx: a `kvzap-trt export` directory (default: export the model now, to a temporary directory)")
    p.add_argument("--engine-file", type=Path, default=None,
                   help="with --executor tensorrt: model.plan or its directory (OUT/engine of `kvzap-trt build --engine tensorrt`)")
    p.add_argument("--plugin-lib", type=Path, default=None,
                   help="with --executor tensorrt: libkvzap_trt_plugins.so (default: $KVZAP_TRT_PLUGIN_LIB, else the engine's)")
    p.set_defaults(func=run)


def check(args: argparse.Namespace) -> None:
    """Options that contradict each other: one line each."""
    if args.kv_coe and not args.json:
        raise KvzapError("--kv-coe needs --json (the score is a field of the JSON object)")
    if args.onnx is not None and args.executor != "onnx":
        raise KvzapError("--onnx needs --executor onnx")
    if (args.engine_file is not None or args.plugin_lib is not None) and args.executor != "tensorrt":
        raise KvzapError("--engine-file and --plugin-lib need --executor tensorrt")
    if args.executor == "tensorrt" and args.engine_file is None:
        raise KvzapError("--executor tensorrt needs --engine-file (OUT/engine of `kvzap-trt build --engine tensorrt`)")


def run(args: argparse.Namespace) -> int:
    from kvzap_trt.runtime.generate import Runtime

    cfg = config_from_args(args)
    if args.prompt_ids_file is not None:
        prompt_ids = read_prompt_ids(args.prompt_ids_file)
    text = prompt_text(args)
    check(args)
    rt = Runtime.from_config(cfg, executor=args.executor, onnx_model=args.onnx, engine_file=args.engine_file,
                             plugin_lib=args.plugin_lib)
    if text is not None:
        prompt_ids = rt.encode(text, chat=args.chat)
    result = rt.generate([prompt_ids], positions=args.positions, kv_coe=args.kv_coe, reasoning=args.reasoning)[0]
    if args.json:
        out = {
            "token_ids": result.token_ids,
            "text": result.text,
            "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
            "kv": result.kv,
            "config": cfg.to_dict(),
            "executor": args.executor,
        }
        if args.kv_coe:
            from kvzap_trt.kvcoe.coe import SCORE

            out["kv_coe_score"], out["kv_coe"] = result.kv_coe[SCORE], result.kv_coe
        if args.reasoning is not None:
            out["reasoning"] = {"requested": args.reasoning, "used": result.reasoning, "p_slow": result.reasoning_p_slow}
        print(json.dumps(out))
        return 0
    print(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
    kv = result.kv
    print(f"[kvzap] {kv['tokens']} tokens in cache, compression {kv['compression_ratio']:.1%}, "
          f"{kv['bytes_allocated'] / 2**20:.2f} MiB allocated vs {kv['bytes_dense'] / 2**20:.2f} MiB dense",
          file=sys.stderr)
    if args.reasoning is not None:
        p = "" if result.reasoning_p_slow is None else f", P(slow) {result.reasoning_p_slow:.3f}"
        print(f"[kvzap] reasoning {args.reasoning}: {result.reasoning}{p}", file=sys.stderr)
    return 0
