"""`kvzap-trt build --engine tensorrt`: preset -> checkpoint -> ONNX -> engine -> Triton repository.

    OUT/checkpoint/   `kvzap-trt convert`: the TensorRT-LLM checkpoint with the surrogate folded in
                      (skipped for a model without surrogate: the ONNX is exported from the model)
    OUT/onnx/         `kvzap-trt export` of the checkpoint (model.onnx, its weights, export.json)
    OUT/build.json    the resolved configuration and the engine's limits (profiles.EngineLimits)
    OUT/engine/       model.plan + engine.json (trt/build.py): needs TensorRT, a GPU, the plugins
    OUT/triton/       the repository of `kvzap-trt build`, its core model running the engine
                      through the TensorRT executor under the same scheduler

Where TensorRT, a GPU or the plugin library is missing, the steps up to the ONNX run and
`ToolsMissing` says in one line what is missing and the `docker run` command that finishes the
job in the NGC container (the Dockerfile's image), with `--resume` so it reuses what ran here.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from kvzap_trt.atomic import atomic_write_text
from kvzap_trt.config import RunConfig
from kvzap_trt.errors import KvzapError
from kvzap_trt.trt import ENGINE_FILE, ENGINE_META, missing_for_engine
from kvzap_trt.trt.profiles import EngineLimits, dim_ranges

BUILD_META = "build.json"
IMAGE = "kvzap-trt"  # `docker build -t kvzap-trt .` in the repository root


class ToolsMissing(KvzapError):
    """TensorRT, a GPU or the plugin library is missing: the message is the one line to print."""


@dataclass
class EngineBuild:
    cfg: RunConfig          # resolved from the preset and the flags
    out: Path               # absolute
    model_name: str
    plugin_lib: Path
    max_num_tokens: int
    max_seq_len: int | None  # None: the model's max_position_embeddings
    resume: bool
    container_args: list[str]  # the build command's arguments, for the docker line

    @property
    def checkpoint(self) -> Path | None:
        return self.out / "checkpoint" if self.cfg.surrogate is not None else None

    @property
    def onnx_dir(self) -> Path:
        return self.out / "onnx"

    @property
    def engine_dir(self) -> Path:
        return self.out / "engine"

    @property
    def repository(self) -> Path:
        return self.out / "triton"

    def export_config(self) -> RunConfig:
        """What `kvzap-trt export` runs with: the checkpoint as the model (its surrogate inside), on CPU."""
        if self.checkpoint is None:
            return replace(self.cfg, device="cpu")
        return replace(self.cfg, preset=None, model=str(self.checkpoint), surrogate=None, surrogate_kind=None,
                       device="cpu")

    def serving_config(self) -> RunConfig:
        return replace(self.export_config(), device="cuda")


@dataclass
class Step:
    name: str
    command: str        # what runs, as a command a person could type
    output: Path
    reuse: bool         # --resume and its output is complete: skipped
    needs_trt: bool = False


def _flags(cfg: RunConfig) -> str:
    return (f"--threshold {cfg.threshold} --window {cfg.window} --dtype {cfg.dtype} --block-size {cfg.block_size}"
            + ("" if cfg.compress_decoding else " --no-compress-decoding"))


def steps(b: EngineBuild) -> list[Step]:
    cfg, q = b.cfg, shlex.quote
    out = []
    if b.checkpoint is not None:
        out.append(Step("checkpoint", f"kvzap-trt convert --model {q(cfg.preset or cfg.model)} --surrogate {q(cfg.surrogate)} "
                        f"{_flags(cfg)} --tp 1 --out {q(str(b.checkpoint))}", b.checkpoint,
                        b.resume and (b.checkpoint / "manifest.json").is_file()))
    src = b.checkpoint or (cfg.preset or cfg.model)
    out.append(Step("onnx", f"kvzap-trt export --model {q(str(src))} {_flags(cfg)} --device cpu --out {q(str(b.onnx_dir))}",
                    b.onnx_dir, b.resume and (b.onnx_dir / "export.json").is_file() and (b.out / BUILD_META).is_file()))
    out.append(Step("engine", f"python: kvzap_trt.trt.build.build_engine({q(str(b.onnx_dir / 'model.onnx'))}, "
                    f"plugins {q(str(b.plugin_lib))}) -> {q(str(b.engine_dir / ENGINE_FILE))}", b.engine_dir,
                    b.resume and (b.engine_dir / ENGINE_FILE).is_file() and (b.engine_dir / ENGINE_META).is_file(),
                    needs_trt=True))
    out.append(Step("repository", f"write the Triton repository {q(str(b.repository))} (models {b.model_name}, "
                    f"{b.model_name}_stream; executor tensorrt, engine {q(str(b.engine_dir / ENGINE_FILE))})",
                    b.repository, False, needs_trt=True))
    return out


def docker_command(b: EngineBuild) -> str:
    """The command that finishes the build in the Dockerfile's image: the same build, --resume,
    the output directory mounted at the same path (so every recorded path holds there too)."""
    q = shlex.quote
    args = " ".join(q(a) for a in b.container_args)
    return (f'docker run --rm --gpus all --user "$(id -u):$(id -g)" -v {q(str(b.out))}:{q(str(b.out))} '
            f"--entrypoint kvzap-trt {IMAGE} build {args} --out {q(str(b.out))} --resume")


def describe_profiles(b: EngineBuild, limits: EngineLimits | None) -> str:
    cfg = b.cfg
    if limits is None:  # before the ONNX step: what the model fixes is not known yet
        c = f"ceil({b.max_seq_len}/{cfg.block_size})" if b.max_seq_len else f"ceil(max_position_embeddings/{cfg.block_size})"
        return (f"profiles: decode N 1..{cfg.max_seqs} (opt {cfg.max_seqs}), B 1..{cfg.max_seqs}; prefill N 1.."
                f"{b.max_num_tokens + cfg.max_seqs} (opt {min(b.max_num_tokens, 2048)}), B 1..{cfg.max_seqs}; cache: num_blocks 1..(the "
                f"blocks of {cfg.kv_cache_mb:g} MiB), max_seqs 1..{cfg.max_seqs}, max_blocks_per_head 1..{c}, "
                f"block_size {cfg.block_size}, ring_pages {math.ceil(cfg.window / cfg.block_size)}")
    parts = []
    for name, r in dim_ranges(limits).items():
        parts.append(f"{name}: " + ", ".join(f"{k} {lo}..{hi}" + (f" (opt {o})" if lo != hi else "")
                                             for k, (lo, o, hi) in r.items()))
    return "profiles: " + "; ".join(parts)


def engine_limits(b: EngineBuild, head_dim: int, elem_bytes: int, max_position_embeddings: int) -> EngineLimits:
    """The shapes the engine must accept: the serving cache of `kv_cache_mb` (EngineLoop.from_runtime's
    arithmetic) and CLI runs within it."""
    block_bytes = b.cfg.block_size * (2 * head_dim * elem_bytes + 8)  # = CacheSpec.block_bytes
    return EngineLimits(max_seqs=b.cfg.max_seqs, max_num_tokens=b.max_num_tokens,
                        max_seq_len=b.max_seq_len or max_position_embeddings, block_size=b.cfg.block_size,
                        window=b.cfg.window, num_blocks=max(1, int(b.cfg.kv_cache_mb * 2**20 // block_bytes)))


# Settings an engine bakes in (paths are left out: a preset's files resolve elsewhere in the container).
ENGINE_SETTINGS = ("preset", "surrogate_kind", "threshold", "window", "compress_decoding", "dtype", "block_size",
                   "max_seqs", "kv_cache_mb")


def _check_reused_config(b: EngineBuild) -> dict:
    """build.json of an earlier run, checked against this build's settings (--resume)."""
    path = b.out / BUILD_META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KvzapError(f"cannot read {path}: {e}; run without --resume") from None
    mine, theirs = b.cfg.to_dict(), meta["config"]
    diff = [k for k in ENGINE_SETTINGS if mine[k] != theirs.get(k)]
    if meta["limits"]["max_num_tokens"] != b.max_num_tokens:
        diff.append("max_num_tokens")
    if diff:
        raise KvzapError(f"{path} records other {', '.join(diff)} than this build's: run without --resume "
                         "(or with the settings it records)")
    return meta


def run(b: EngineBuild, say: Callable[[str], None], dry_run: bool = False) -> Path:
    """Run (or with dry_run, print) the steps; returns the repository. ToolsMissing after the ONNX
    when this machine cannot build the engine."""
    plan = steps(b)
    missing = missing_for_engine(b.plugin_lib)
    if dry_run:
        for i, s in enumerate(plan, 1):
            say(f"{i}. {s.name}{' (reused: --resume and complete)' if s.reuse else ''}: {s.command}")
            if s.name == "engine":
                say(f"   TensorRT builder: strongly typed network (types of the ONNX: {b.cfg.dtype}), preview feature "
                    f"ALIASED_PLUGIN_IO_10_03, plugin library loaded; {describe_profiles(b, None)}")
        say(f"this machine: {'can build the engine' if not missing else 'lacks ' + ', '.join(missing)}")
        if missing:
            say(f"then, in the container: {docker_command(b)}")
        return b.repository
    from kvzap_trt.runtime.generate import Runtime

    export_cfg = b.export_config()
    for s in plan:
        if s.reuse:
            say(f"{s.name}: reusing {s.output}")
            if s.name == "onnx":
                _check_reused_config(b)
            continue
        if s.needs_trt and missing:
            raise ToolsMissing(f"cannot build the TensorRT engine here (missing: {', '.join(missing)}); the ONNX is in "
                               f"{b.onnx_dir}; finish in the NGC container (image: `docker build -t {IMAGE} .`): "
                               f"{docker_command(b)}")
        say(f"{s.name}: {s.command}")
        if s.name == "checkpoint":
            from kvzap_trt.convert.writer import convert

            convert(b.cfg, b.checkpoint, 1, b.cfg.dtype)
        elif s.name == "onnx":
            from kvzap_trt.export.trt_support import check_for_parser

            rt = Runtime.from_config(export_cfg)
            check_for_parser(rt.export_onnx(b.onnx_dir))  # before a container is started for the engine
            m = rt.loaded.config
            elem = {"float32": 4, "bfloat16": 2, "float16": 2}[b.cfg.dtype]
            limits = engine_limits(b, m.head_dim, elem, m.max_position_embeddings)
            atomic_write_text(b.out / BUILD_META, json.dumps(
                {"config": b.cfg.to_dict(), "serving_config": b.serving_config().to_dict(),
                 "limits": limits.to_dict(), "checkpoint": str(b.checkpoint) if b.checkpoint else None,
                 "onnx": str(b.onnx_dir / "model.onnx")}, indent=2) + "\n")
            say(f"   {describe_profiles(b, limits)}")
        elif s.name == "engine":
            from kvzap_trt.export import read_metadata
            from kvzap_trt.trt.build import build_engine

            limits = EngineLimits(**_check_reused_config(b)["limits"])
            onnx_path = b.onnx_dir / "model.onnx"
            build_engine(onnx_path, b.plugin_lib, b.engine_dir, limits, read_metadata(onnx_path))
        elif s.name == "repository":
            from kvzap_trt.serve.repository import write_repository

            write_repository(b.serving_config(), b.repository, b.model_name,
                             executor={"executor": "tensorrt", "engine": str(b.engine_dir / ENGINE_FILE),
                                       "plugin_lib": str(b.plugin_lib.resolve())})
    return b.repository
