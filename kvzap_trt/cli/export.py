"""`kvzap-trt export`: the model with KVzap as an ONNX graph, the input of a TensorRT build
(kvzap_trt/export/)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvzap_trt.cli.flags import EVICTION, add_config_flags, config_from_args


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export the model with KVzap as an ONNX graph (the input of a TensorRT engine build)",
        description="Write OUT/model.onnx: the Llama/Mistral/Qwen2/Qwen3 forward with the KVzap surrogate as ordinary ops and "
        "per layer a KvzapVarlenPagedAttention and a KvzapEvict node (the TensorRT plugins; domain kvzap_trt), "
        "the cache and the batch description as graph inputs, the updated cache as outputs, window and "
        "threshold as plugin fields. Weights go to OUT/model.onnx.data past 2 GB. Checked with onnx.checker; "
        "`kvzap-trt generate --executor onnx --onnx OUT` runs it on ONNX Runtime.",
    )
    add_config_flags(p, EVICTION)
    p.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    p.add_argument("--external-data", action="store_true", help="weights in model.onnx.data whatever their size")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvzap_trt.runtime.generate import Runtime

    cfg = config_from_args(args)
    print(Runtime.from_config(cfg).export_onnx(args.out, external_data=args.external_data or None))
    return 0
