"""`kvzap-trt serve`: Triton Inference Server (PyTriton's bundled tritonserver) over the engine,
optionally with the OpenAI-compatible API on the same engine (kvzap_trt/serve/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvzap_trt.cli.build import add_serving_flags
from kvzap_trt.cli.flags import EVICTION, REASONING, add_config_flags, config_from_args
from kvzap_trt.errors import KvzapError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP with Triton Inference Server (PyTriton's bundled tritonserver)",
        description="Start Triton Inference Server with continuous batching over the KVzap cache. "
        "Endpoints: /v2/models/<name>/infer and /generate, /v2/models/<name>_stream/generate_stream, "
        "/v2/health/ready; Prometheus metrics on the metrics port.",
    )
    add_config_flags(p, EVICTION)
    add_serving_flags(p)
    p.add_argument("--repository", type=Path, default=None,
                   help="serve this repository (from `kvzap-trt build`) instead of writing one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--openai-port", type=int, default=None,
                   help="also serve the OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions, "
                   "/v1/embeddings) "
                   "on this port of --host, on the same engine and KV pool as Triton (default: off, no OpenAI port)")
    p.add_argument("--verbose", action="store_true", help="show tritonserver's log")
    add_config_flags(p, REASONING)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from kvzap_trt.serve import server
    from kvzap_trt.serve.repository import write_repository

    server.handle_sigterm()  # SIGTERM while starting still stops tritonserver (finally below)
    repo = args.repository
    if repo is not None and not (repo / args.model_name / "config.pbtxt").is_file():
        raise KvzapError(f"{repo} has no model {args.model_name!r}; write one with `kvzap-trt build`")
    cfg = config_from_args(args) if repo is None else server.repository_config(repo)
    server.check_loadable(cfg)  # a missing model, surrogate or tokenizer: one line, exit 2
    work = Path(tempfile.mkdtemp(prefix="kvzap-triton-"))
    if repo is None:
        repo = write_repository(cfg, work / "repo", args.model_name)
    if args.openai_port is not None:
        os.environ[server.OPENAI_ENV] = f"{args.host}:{args.openai_port}"
    log_file = work / "tritonserver.log"
    reaper = server.ProcessReaper().start()
    triton = None
    try:
        triton = server.start_server(repo, args.host, args.http_port, args.grpc_port, args.metrics_port,
                                     args.verbose, log_file)
        url = f"{args.host}:{args.http_port}"
        server.wait_until_ready(url, f"{args.model_name}_stream", triton=triton, log_file=log_file)
        server.wait_until_ready(url, args.model_name, triton=triton, log_file=log_file)
        extra = ""
        if args.openai_port is not None:
            server.wait_for_openai(args.host, args.openai_port)
            extra = f", OpenAI API at http://{args.host}:{args.openai_port}/v1"
        print(f"kvzap-trt: serving {args.model_name} at http://{url} (metrics on port {args.metrics_port}){extra}",
              file=sys.stderr, flush=True)
        if not server.serve_forever(triton):
            tail = server.log_tail(log_file)
            raise KvzapError("tritonserver stopped" + (f"; its log ends:\n{tail}" if tail else ""))
    finally:
        if triton is not None:
            triton.stop()
        left = reaper.reap()
        if left:
            names = "; ".join(f"{p} {reaper.killed.get(p, '')}".strip() for p in left)
            print(f"kvzap-trt: killed {len(left)} process(es) left behind by tritonserver: {names}", file=sys.stderr)
    return 0
