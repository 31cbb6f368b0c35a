"""`kvzap-trt build`: a Triton model repository for a model; with --engine tensorrt, the whole
TensorRT route (checkpoint, ONNX, engine, repository: kvzap_trt/trt/pipeline.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvzap_trt.cli.flags import EVICTION, SERVING, add_config_flags, config_argv, config_from_args
from kvzap_trt.errors import KvzapError

# Flags of the TensorRT route only.
ENGINE_FLAGS = ("resume", "max_seq_len", "plugin_lib")


def add_serving_flags(p: argparse.ArgumentParser) -> None:
    """The served model's name and what the server holds at once (build and serve)."""
    p.add_argument("--model-name", default="ensemble",
                   help="Triton model name (default: ensemble); the streaming model is <name>_stream")
    add_config_flags(p, SERVING)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        help="write a Triton model repository (Python backend) for a model, with a TensorRT engine on request",
        description="Write a Triton Inference Server model repository serving the model with KVzap "
        "eviction: <name> (infer, generate) and <name>_stream (generate_stream, token by token). Any "
        "tritonserver with the Python backend loads it where kvzap_trt is installed. --engine pytorch (default): "
        "the PyTorch executor, OUT is the repository. --engine tensorrt: OUT/checkpoint (kvzap-trt convert), "
        "OUT/onnx (kvzap-trt export), OUT/engine (TensorRT, strongly typed, decode and prefill profiles, the "
        "kvzap plugins), OUT/triton (the repository, running the engine); where TensorRT, a GPU or the plugin "
        "library is missing it stops after the ONNX with exit code 2 and the `docker run` command that finishes.",
    )
    add_config_flags(p, EVICTION)
    add_serving_flags(p)
    p.add_argument("--out", type=Path, default=None,
                   help="repository directory (default: build/triton/<model>); with --engine tensorrt the build "
                   "directory (default: build/engines/<model>)")
    p.add_argument("--engine", choices=["pytorch", "tensorrt"], default="pytorch",
                   help="pytorch (default): the PyTorch executor; tensorrt: build a TensorRT engine and serve it")
    p.add_argument("--dry-run", action="store_true", help="print every step with its paths and commands; run nothing")
    p.add_argument("--resume", action="store_true",
                   help="with --engine tensorrt: reuse the complete checkpoint, ONNX and engine already in OUT")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="with --engine tensorrt: longest context (default: the model's max_position_embeddings)")
    p.add_argument("--plugin-lib", type=Path, default=None,
                   help="with --engine tensorrt: libkvzap_trt_plugins.so (default: $KVZAP_TRT_PLUGIN_LIB, else "
                   "build/plugins/trt/libkvzap_trt_plugins.so)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvzap_trt.serve.repository import write_repository

    cfg = config_from_args(args)
    name = cfg.preset or Path(cfg.model).name
    if args.engine == "tensorrt":
        return run_tensorrt(args, cfg, name)
    given = [f"--{f.replace('_', '-')}" for f in ENGINE_FLAGS if getattr(args, f) not in (None, False)]
    if given:
        raise KvzapError(f"{', '.join(given)} need --engine tensorrt")
    out = args.out or Path("build") / "triton" / name
    if args.dry_run:
        print(f"1. repository: write the Triton repository {out} (models {args.model_name}, {args.model_name}_stream; "
              "executor pytorch)")
        return 0
    write_repository(cfg, out, args.model_name)
    print(out)
    return 0


def container_args(args: argparse.Namespace) -> list[str]:
    """The build command's arguments as the container must see them: no paths of this machine, no
    --device (the container's is the GPU)."""
    model = ["--model", args.model] if args.model else []
    config = config_argv(args, tuple(n for n in (*EVICTION, *SERVING) if n not in ("model", "device")))
    own = [a for dest in ("model_name", "max_seq_len") if getattr(args, dest, None) is not None
           for a in (f"--{dest.replace('_', '-')}", str(getattr(args, dest)))]
    return ["--engine", "tensorrt", *model, *config, *own]


def run_tensorrt(args: argparse.Namespace, cfg, name: str) -> int:
    from kvzap_trt.trt import default_plugin_lib
    from kvzap_trt.trt.pipeline import EngineBuild, run as run_pipeline

    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise KvzapError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    if cfg.tp != 1:
        raise KvzapError(f"TensorRT engines are built for one GPU (tp 1); the config says tp {cfg.tp}")
    b = EngineBuild(cfg, (args.out or Path("build") / "engines" / name).resolve(), args.model_name,
                    args.plugin_lib or default_plugin_lib(), cfg.max_num_tokens or 8192, args.max_seq_len,
                    args.resume, container_args(args))
    print(run_pipeline(b, print, dry_run=args.dry_run))
    return 0
