"""`kvzap-trt`: the command line. Bad input exits with code 2 and one line on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from kvzap_trt.config import DTYPES, REASONING_MODES, preset_names, resolve_config
from kvzap_trt.errors import KvzapError
from kvzap_trt.oracle import ORACLES


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override the preset: the third layer of the configuration."""
    p.add_argument("--model", default=None, help="preset name, HF model directory, .gguf file or HF id (default: smollm2-135m)")
    p.add_argument("--surrogate", default=None, help="surrogate directory, HF id or random:KIND:SEED (default: the preset's)")
    p.add_argument("--threshold", type=float, default=None, help="tau: evict KV pairs with log-score < tau (default: the preset's)")
    p.add_argument("--window", type=int, default=None, help="most recent tokens never evicted (default: 128)")
    p.add_argument("--no-compress-decoding", dest="compress_decoding", action="store_false", default=None,
                   help="evict only during prefill, as kvpress decoding=False")
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default: 16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--max-num-tokens", type=int, default=None,
                   help="prefill prompts in chunks of this many tokens, at most this many prompt tokens per step "
                   "(decodes come on top; later chunks attend to the compressed cache of earlier ones); default: "
                   "prompts prefilled whole; with build --engine tensorrt also the engine's limit (default 8192)")


CONFIG_FLAGS = ("surrogate", "threshold", "window", "compress_decoding", "block_size", "device", "dtype",
                "max_new_tokens", "temperature", "top_p", "top_k", "seed", "max_seqs", "kv_cache_mb", "tp",
                "probe", "fast_max_new_tokens", "max_num_tokens")


def add_reasoning_flags(p: argparse.ArgumentParser) -> None:
    """Fast/slow reasoning (kvzap_trt/kvcoe/reasoning.py): what requests with `reasoning` use."""
    p.add_argument("--probe", type=lambda f: str(Path(f).resolve()), default=None,
                   help="difficulty probe for reasoning auto (from `kvzap-trt probe train`)")
    p.add_argument("--fast-max-new-tokens", type=int, default=None,
                   help="generation budget of reasoning fast (default: the request's own)")


def config_from_args(args: argparse.Namespace):
    return resolve_config(args.model, **{k: getattr(args, k, None) for k in CONFIG_FLAGS})


def add_serving_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", default="ensemble",
                   help="Triton model name (default: ensemble); the streaming model is <name>_stream")
    p.add_argument("--max-seqs", type=int, default=None, help="sequences served at once (default: 32)")
    p.add_argument("--kv-cache-mb", type=float, default=None, help="KV block pool size in MiB (default: 256)")


def add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with KVzap eviction over the paged cache",
        description="Generate with KVzap: tokens whose surrogate log-score is below the threshold are "
        "evicted from the per-head paged KV cache once they leave the sliding window. "
        f"Presets: {', '.join(preset_names())}.",
    )
    add_config_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file whose whole content is the prompt")
    src.add_argument("--prompt-ids-file", type=Path, help="file holding a JSON list of token ids")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=None, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object (token ids, text, KV statistics)")
    p.add_argument("--reasoning", choices=REASONING_MODES, default=None,
                   help="fast: thinking off (Qwen3's enable_thinking switch) and/or --fast-max-new-tokens; slow: as "
                   "asked; auto: the --probe picks after prefill (default: off)")
    add_reasoning_flags(p)
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
    p.set_defaults(func=run_generate)


def add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export the model with KVzap as an ONNX graph (the input of a TensorRT engine build)",
        description="Write OUT/model.onnx: the Llama/Mistral/Qwen2/Qwen3 forward with the KVzap surrogate as ordinary ops and "
        "per layer a KvzapVarlenPagedAttention and a KvzapEvict node (the TensorRT plugins; domain kvzap_trt), "
        "the cache and the batch description as graph inputs, the updated cache as outputs, window and "
        "threshold as plugin fields. Weights go to OUT/model.onnx.data past 2 GB. Checked with onnx.checker; "
        "`kvzap-trt generate --executor onnx --onnx OUT` runs it on ONNX Runtime.",
    )
    add_config_flags(p)
    p.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    p.add_argument("--external-data", action="store_true", help="weights in model.onnx.data whatever their size")
    p.set_defaults(func=run_export)


def add_build(sub: Any) -> None:
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
    add_config_flags(p)
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
    p.set_defaults(func=run_build)


def add_convert(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="fold a KVzap surrogate into a TensorRT-LLM checkpoint",
        description="Write a TensorRT-LLM 1.x checkpoint (config.json with a kvzap section, "
        "rank{N}.safetensors, manifest.json) for a Llama, Mistral, Qwen2 or Qwen3 model with its KVzap surrogate, "
        "sharded for tensor parallelism, tensor by tensor. `kvzap-trt generate --model OUT` runs it.",
    )
    add_config_flags(p)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory (written atomically)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: the preset's, else 1)")
    p.set_defaults(func=run_convert)


def add_score(sub: Any) -> None:
    p = sub.add_parser(
        "score",
        help="print per-(layer, kv head, position) importance scores of a prompt",
        description="Score every KV pair of a prompt (the chat template's user turn around the text): "
        "with --oracle, KVzip+ scores (kvpress KVzipPress with kvzip_plus_normalization, linear space; "
        "positions of the chat prefix score 0); without it, the surrogate's log-scores.",
    )
    add_config_flags(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to score")
    src.add_argument("--prompt-file", type=Path, help="file whose content is the text to score")
    p.add_argument("--oracle", action="store_true", help="KVzip+ oracle scores instead of the surrogate's")
    p.add_argument("--oracle-variant", choices=ORACLES, default=None,
                   help="with --oracle: press, kvpress's KVzipPress (default), or kvzap-data, NVIDIA's training collector "
                   "(kvpress kvzap/data.py: one pass, full softmax, max over the repeated text)")
    p.add_argument("--chunk-size", type=int, default=2048, help="tokens repeated per oracle pass (press; default 2048)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the default prints a summary)")
    p.set_defaults(func=run_score)


def add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a KVzap surrogate for a model on a folder of text files",
        description="Build (or reuse) a dataset of hidden states and log KVzip+ oracle scores from a "
        "corpus folder of .txt files, fit a linear (closed-form ridge) or MLP (AdamW, cosine) surrogate "
        "layer by layer, and write it in NVIDIA's released format with report.json and report.png "
        "(held-out R² per layer, compression vs tau, overlap with the oracle's keep set).",
    )
    p.add_argument("--model", default=None, help="preset, HF model directory, .gguf or HF id (default: smollm2-135m)")
    p.add_argument("--corpus", type=Path, required=True, help="folder of .txt files")
    p.add_argument("--kind", choices=["linear", "mlp"], required=True)
    p.add_argument("--out", type=Path, required=True, help="surrogate directory (written atomically)")
    p.add_argument("--dataset", type=Path, default=None,
                   help="dataset directory to reuse or write (default: build/datasets/<model>-<corpus>)")
    p.add_argument("--oracle", choices=ORACLES, default="press",
                   help="training targets: press, kvpress's KVzipPress (default), or kvzap-data, NVIDIA's training collector (kvpress "
                   "kvzap/data.py, what the released nvidia/KVzap-* surrogates were fit to; their tau values assume it)")
    p.add_argument("--n-tokens", type=int, default=384,
                   help="positions sampled per text (default 384: the oracle scores every position anyway)")
    p.add_argument("--min-tokens", type=int, default=128, help="shorter texts are skipped (default 128)")
    p.add_argument("--max-tokens", type=int, default=512, help="longer texts are cut (default 512)")
    p.add_argument("--epochs", type=int, default=15, help="MLP epochs (default 15)")
    p.add_argument("--l2", type=float, default=1e-2, help="ridge penalty on standardised features (default 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_train)


def add_calibrate(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose the threshold tau that reaches a target compression on a corpus",
        description="Score each calibration text with the surrogate, choose tau so that the mean "
        "prefill compression over the texts hits --target, and report the spread across texts. "
        "--write-preset stores tau in the preset's YAML.",
    )
    add_config_flags(p)
    p.add_argument("--corpus", type=Path, required=True, help="folder of .txt calibration texts")
    p.add_argument("--target", type=float, required=True, help="target compression ratio, e.g. 0.5")
    p.add_argument("--min-tokens", type=int, default=128, help="shorter texts are skipped, as in training (default 128)")
    p.add_argument("--max-tokens", type=int, default=512, help="texts are cut to this many tokens (default 512)")
    p.add_argument("--write-preset", action="store_true", help="write tau into build_configs/<preset>.yaml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_calibrate)


def add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP with Triton Inference Server (PyTriton's bundled tritonserver)",
        description="Start Triton Inference Server with continuous batching over the KVzap cache. "
        "Endpoints: /v2/models/<name>/infer and /generate, /v2/models/<name>_stream/generate_stream, "
        "/v2/health/ready; Prometheus metrics on the metrics port.",
    )
    add_config_flags(p)
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
    add_reasoning_flags(p)
    p.set_defaults(func=run_serve)


def read_prompt_ids(path: Path) -> list[int]:
    try:
        ids = json.loads(path.read_text())
    except OSError as e:
        raise KvzapError(f"cannot read prompt ids file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise KvzapError(f"prompt ids file {path} is not JSON: {e}") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise KvzapError(f"prompt ids file {path} must hold a JSON list of integers")
    return ids


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KvzapError(f"cannot read prompt file {path}: {getattr(e, 'strerror', None) or e}") from None


def run_generate(args: argparse.Namespace) -> int:
    from kvzap_trt.runtime.generate import Runtime

    cfg = config_from_args(args)
    if args.prompt_ids_file is not None:
        prompt_ids = read_prompt_ids(args.prompt_ids_file)
    text = args.prompt if args.prompt is not None else read_text(args.prompt_file) if args.prompt_file else None
    if text is not None and not text.strip():
        raise KvzapError("the prompt is empty")
    if args.kv_coe and not args.json:
        raise KvzapError("--kv-coe needs --json (the score is a field of the JSON object)")
    if args.onnx is not None and args.executor != "onnx":
        raise KvzapError("--onnx needs --executor onnx")
    if (args.engine_file is not None or args.plugin_lib is not None) and args.executor != "tensorrt":
        raise KvzapError("--engine-file and --plugin-lib need --executor tensorrt")
    if args.executor == "tensorrt" and args.engine_file is None:
        raise KvzapError("--executor tensorrt needs --engine-file (OUT/engine of `kvzap-trt build --engine tensorrt`)")
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
    else:
        print(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
        kv = result.kv
        print(
            f"[kvzap] {kv['tokens']} tokens in cache, compression {kv['compression_ratio']:.1%}, "
            f"{kv['bytes_allocated'] / 2**20:.2f} MiB allocated vs {kv['bytes_dense'] / 2**20:.2f} MiB dense",
            file=sys.stderr,
        )
        if args.reasoning is not None:
            p = "" if result.reasoning_p_slow is None else f", P(slow) {result.reasoning_p_slow:.3f}"
            print(f"[kvzap] reasoning {args.reasoning}: {result.reasoning}{p}", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from kvzap_trt.runtime.generate import Runtime

    cfg = config_from_args(args)
    print(Runtime.from_config(cfg).export_onnx(args.out, external_data=args.external_data or None))
    return 0


BUILD_ENGINE_FLAGS = ("resume", "max_seq_len", "plugin_lib")


def run_build(args: argparse.Namespace) -> int:
    from kvzap_trt.serve.repository import write_repository

    cfg = config_from_args(args)
    name = cfg.preset or Path(cfg.model).name
    if args.engine == "tensorrt":
        return run_build_tensorrt(args, cfg, name)
    given = [f"--{f.replace('_', '-')}" for f in BUILD_ENGINE_FLAGS if getattr(args, f) not in (None, False)]
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


def build_container_args(args: argparse.Namespace) -> list[str]:
    """The build command's arguments as the container must see them (no paths of this machine)."""
    out = ["--model", args.model] if args.model else []
    for dest in ("surrogate", "threshold", "window", "block_size", "dtype", "model_name", "max_seqs", "kv_cache_mb",
                 "max_num_tokens", "max_seq_len"):
        v = getattr(args, dest, None)
        if v is not None:
            out += [f"--{dest.replace('_', '-')}", str(v)]
    if args.compress_decoding is False:
        out.append("--no-compress-decoding")
    return ["--engine", "tensorrt", *out]


def run_build_tensorrt(args: argparse.Namespace, cfg, name: str) -> int:
    from kvzap_trt.trt import default_plugin_lib
    from kvzap_trt.trt.pipeline import EngineBuild, run

    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise KvzapError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    if cfg.tp != 1:
        raise KvzapError(f"TensorRT engines are built for one GPU (tp 1); the config says tp {cfg.tp}")
    b = EngineBuild(cfg, (args.out or Path("build") / "engines" / name).resolve(), args.model_name,
                    args.plugin_lib or default_plugin_lib(), cfg.max_num_tokens or 8192, args.max_seq_len,
                    args.resume, build_container_args(args))
    print(run(b, print, dry_run=args.dry_run))
    return 0


def run_score(args: argparse.Namespace) -> int:
    import torch

    from kvzap_trt.oracle import oracle_scorer
    from kvzap_trt.oracle.kvzip import context_ids, surrogate_scores
    from kvzap_trt.runtime.generate import Runtime

    cfg = config_from_args(args)
    text = args.prompt if args.prompt is not None else read_text(args.prompt_file)
    if not text.strip():
        raise KvzapError("the prompt is empty")
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
    else:
        flat = scores[..., prefix_len:]
        q = torch.quantile(flat.flatten().double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        print(f"{kind} scores ({space}) of {len(ids)} tokens, {scores.shape[0]} layers x {scores.shape[1]} kv heads: "
              f"p10 {q[0]:.4g}, median {q[1]:.4g}, p90 {q[2]:.4g}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from kvzap_trt.atomic import atomic_dir
    from kvzap_trt.models.loading import load_model, resolve_model_dir
    from kvzap_trt.surrogate import write_surrogate_files
    from kvzap_trt.train.dataset import Dataset, build_dataset, read_corpus
    from kvzap_trt.train.fit import train_surrogate
    from kvzap_trt.train.report import build_report, plot_report

    for name in ("n_tokens", "min_tokens", "max_tokens", "epochs"):
        if getattr(args, name) < 1:
            raise KvzapError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    cfg = resolve_config(args.model)
    corpus = read_corpus(args.corpus)
    model_dir = resolve_model_dir(cfg.model)
    loaded = load_model(model_dir)
    wanted = {"model": str(model_dir), "n_tokens": args.n_tokens, "min_tokens": args.min_tokens,
              "max_tokens": args.max_tokens, "oracle": args.oracle}
    oracle_suffix = "" if args.oracle == "press" else f"-{args.oracle}"  # each oracle its own default dataset
    ds_dir = args.dataset or Path("build") / "datasets" / f"{cfg.preset or model_dir.name}-{args.corpus.name}{oracle_suffix}"
    ds = Dataset.open(ds_dir) if (ds_dir / "meta.json").is_file() else None
    # a dataset written before there was a choice of oracle has no "oracle": it is the press's
    if ds is None or any(ds.meta.get(k, "press" if k == "oracle" else None) != v for k, v in wanted.items()):
        ds = build_dataset(loaded, corpus, ds_dir, args.n_tokens, args.min_tokens, args.max_tokens, args.seed,
                           oracle=args.oracle)
    surrogate, fit = train_surrogate(ds, args.kind, l2=args.l2, epochs=args.epochs, seed=args.seed)
    surrogate.source = str(args.out)
    surrogate.validate(loaded.config, f"model {cfg.preset or cfg.model}")
    report = build_report(ds, surrogate, fit)
    report.update({"model": cfg.preset or cfg.model, "corpus": str(args.corpus), "dataset": str(ds_dir),
                   "texts": len(ds.meta["texts"]), "train_pairs": ds.meta["count"]["train"],
                   "options": {k: getattr(args, k) for k in ("oracle", "n_tokens", "min_tokens", "max_tokens", "epochs", "l2",
                                                              "seed")}})
    try:
        with atomic_dir(args.out) as tmp:
            write_surrogate_files(surrogate, tmp)
            (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            plot_report(report, tmp / "report.png", f"{args.kind} surrogate for {cfg.preset or cfg.model}")
    except PermissionError as e:
        raise KvzapError(f"cannot write {args.out}: {e.strerror}") from None
    ov = report["oracle_overlap"]
    print(f"{args.out}: held-out R² mean {report['r2_test_mean']:.3f}; keeps "
          + ", ".join(f"{o['surrogate']:.0%} of the oracle's pairs at {o['compression']:.0%} compression "
                      f"(random {o['random']:.0%})" for o in ov))
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from kvzap_trt.config import build_configs_dir
    from kvzap_trt.runtime.generate import Runtime
    from kvzap_trt.train.calibrate import calibrate, write_threshold
    from kvzap_trt.train.dataset import read_corpus, select_texts

    cfg = config_from_args(args)
    if args.write_preset and cfg.preset is None:
        raise KvzapError("--write-preset needs --model to name a preset")
    corpus = read_corpus(args.corpus)
    rt = Runtime.from_config(cfg)
    if rt.surrogate is None or rt.tokenizer is None:
        raise KvzapError("calibration needs a surrogate and a tokenizer")
    texts = [t for _, t in select_texts(rt.tokenizer, corpus, args.min_tokens, args.max_tokens)]
    result = calibrate(rt.loaded.model, rt.tokenizer, rt.surrogate, texts, args.target, cfg.window)
    result.update({"model": cfg.preset or cfg.model, "surrogate": cfg.surrogate, "corpus": str(args.corpus)})
    if args.write_preset:
        write_threshold(build_configs_dir() / f"{cfg.preset}.yaml", result["threshold"])
    if args.json:
        print(json.dumps(result))
    else:
        past = result["evicted_past_window_mean"]
        print(f"tau {result['threshold']:.4f}: compression {result['compression_mean']:.1%} mean over "
              f"{result['prompts']} texts (std {result['compression_std']:.1%}, "
              f"{result['compression_min']:.1%} to {result['compression_max']:.1%})"
              + ("" if past is None else f"; {past:.1%} of the tokens older than the {cfg.window}-token window evicted"))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from kvzap_trt.convert.writer import convert

    cfg = config_from_args(args)
    print(convert(cfg, args.out, cfg.tp, cfg.dtype))
    return 0


def run_serve(args: argparse.Namespace) -> int:
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


def build_parser() -> Parser:
    parser = Parser(prog="kvzap-trt", description="KVzap KV-cache pruning with real memory savings.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_generate(sub)
    add_build(sub)
    add_convert(sub)
    add_export(sub)
    add_score(sub)
    add_train(sub)
    add_calibrate(sub)
    add_serve(sub)
    from kvzap_trt.eval.command import add_parser as add_eval  # flags and run: kvzap_trt/eval/command.py

    add_eval(sub)
    from kvzap_trt.kvcoe.command import add_parser as add_embed  # flags and run: kvzap_trt/kvcoe/command.py

    add_embed(sub)
    from kvzap_trt.kvcoe.probe_command import add_parser as add_probe  # kvzap_trt/kvcoe/probe_command.py

    add_probe(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KvzapError as e:
        print(f"kvzap-trt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
