"""`kvzap-trt build --engine tensorrt`: the dry run, the stop after the ONNX where TensorRT is
missing (exit 2, one line, the docker command), --resume, argument errors, the repository's
executor parameter."""

from __future__ import annotations

import importlib.util
import json
import shlex

import pytest
import torch

from kvzap_trt.cli import main
from kvzap_trt.config import resolve_config
from kvzap_trt.export import read_metadata
from kvzap_trt.serve.repository import write_repository
from kvzap_trt.serve.triton_core import executor_from_model_args

CAN_BUILD = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_dry_run_prints_every_step_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["build", "--model", "qwen3-8b", "--engine", "tensorrt", "--out", str(out), "--max-num-tokens", "4096",
                 "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"1. checkpoint: kvzap-trt convert --model qwen3-8b --surrogate nvidia/KVzap-mlp-Qwen3-8B "
                        f"--threshold -4.0 --window 128 --dtype bfloat16 --block-size 16 --tp 1 --out {out}/checkpoint")
    assert lines[1].startswith(f"2. onnx: kvzap-trt export --model {out}/checkpoint --threshold -4.0 ")
    assert lines[1].endswith(f"--device cpu --out {out}/onnx")
    assert lines[2].startswith(f"3. engine: python: kvzap_trt.trt.build.build_engine({out}/onnx/model.onnx")
    assert "strongly typed network (types of the ONNX: bfloat16)" in lines[3] and "ALIASED_PLUGIN_IO_10_03" in lines[3]
    assert "decode N 1..32 (opt 32)" in lines[3] and "prefill N 1..4128 (opt 2048)" in lines[3]  # a chunk + 32 decodes
    assert lines[4].startswith(f"4. repository: write the Triton repository {out}/triton")
    if not CAN_BUILD:
        assert lines[5].startswith("this machine: lacks the tensorrt Python package")
        docker = lines[6].removeprefix("then, in the container: ")
        argv = shlex.split(docker)
        assert argv[:4] == ["docker", "run", "--rm", "--gpus"] and f"{out}:{out}" in argv
        assert argv[argv.index("--entrypoint") + 1:] == ["kvzap-trt", "kvzap-trt", "build", "--engine", "tensorrt",
                                                         "--model", "qwen3-8b", "--max-num-tokens", "4096",
                                                         "--model-name", "ensemble", "--out", str(out), "--resume"]
    assert not out.exists()


def test_dry_run_of_the_pytorch_build(tmp_path, capsys):
    assert main(["build", "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith(f"1. repository: write the Triton repository {tmp_path / 'r'}")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv, message", [
    (["--resume"], "--resume need --engine tensorrt"),
    (["--max-seq-len", "64"], "--max-seq-len need --engine tensorrt"),
    (["--max-num-tokens", "0"], "max_num_tokens must be >= 1, got 0"),  # the scheduler's, for either engine
    (["--engine", "tensorrt", "--max-num-tokens", "0"], "max_num_tokens must be >= 1, got 0"),
    (["--engine", "tensorrt", "--max-seq-len", "-3"], "--max-seq-len must be >= 1, got -3"),
    (["--engine", "onnx"], "argument --engine: invalid choice: 'onnx'"),
    (["--engine", "tensorrt", "--threshold", "nan"], "threshold must be a finite number"),
])
def test_argument_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    try:
        code = main(["build", "--out", str(tmp_path / "x"), "--dry-run", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(CAN_BUILD, reason="this machine can build engines: the stop after the ONNX is for those that cannot")
def test_without_tensorrt_it_stops_after_the_onnx_with_the_docker_line(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "tiny"
    argv = ["build", "--model", str(tiny_dirs["qwen3"]), "--surrogate", "random:linear:0", "--threshold", "0.5",
            "--window", "8", "--block-size", "4", "--max-seqs", "3", "--engine", "tensorrt", "--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.strip().splitlines() if "convert tp=1" not in ln]  # less convert's progress bar
    assert len(err) == 1
    assert err[0].startswith("kvzap-trt: error: cannot build the TensorRT engine here (missing: the tensorrt Python package")
    assert f"the ONNX is in {out}/onnx" in err[0]
    docker = err[0].split("finish in the NGC container (image: `docker build -t kvzap-trt .`): ")[1]
    assert shlex.split(docker)[-3:] == ["--out", str(out), "--resume"] and "--threshold 0.5" in docker
    # Everything up to the ONNX ran: the checkpoint carries the surrogate, the graph its settings.
    assert (out / "checkpoint" / "manifest.json").is_file()
    meta = read_metadata(out / "onnx" / "model.onnx")
    assert (meta["window"], meta["threshold"], meta["surrogate"]["kind"]) == (8, 0.5, "linear")
    build = json.loads((out / "build.json").read_text())
    assert build["limits"] == {"max_seqs": 3, "max_num_tokens": 8192, "max_seq_len": 1024, "block_size": 4,
                               "window": 8, "num_blocks": int(256 * 2**20 // (4 * (2 * 16 * 4 + 8)))}
    assert build["serving_config"]["model"] == str(out / "checkpoint") and build["serving_config"]["device"] == "cuda"
    assert not (out / "engine").exists() and not (out / "triton").exists()
    # --resume reuses the checkpoint and the ONNX and stops at the same place; other settings are refused.
    onnx_mtime = (out / "onnx" / "model.onnx").stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 2
    captured = capsys.readouterr()
    assert "checkpoint: reusing" in captured.out and "onnx: reusing" in captured.out
    assert (out / "onnx" / "model.onnx").stat().st_mtime_ns == onnx_mtime
    assert main([*argv, "--resume", "--threshold", "0.75"]) == 2
    assert "records other threshold than this build's" in capsys.readouterr().err


def test_repository_names_the_executor_for_the_core_model(tmp_path):
    cfg = resolve_config("smollm2-135m")
    spec = {"executor": "tensorrt", "engine": "/e/model.plan", "plugin_lib": "/p/libkvzap_trt_plugins.so"}
    repo = write_repository(cfg, tmp_path / "repo", "m", executor=spec)
    core = (repo / "m_stream" / "config.pbtxt").read_text()
    param = [ln for ln in core.splitlines() if '"kvzap_executor"' in ln]
    assert len(param) == 1
    raw = json.loads(param[0].split("string_value: ", 1)[1].rsplit(" }", 2)[0])
    model_config = json.dumps({"parameters": {"kvzap_executor": {"string_value": raw}}})
    assert executor_from_model_args({"model_config": model_config}) == {
        "executor": "tensorrt", "engine_file": "/e/model.plan", "plugin_lib": "/p/libkvzap_trt_plugins.so"}
    assert executor_from_model_args({"model_config": json.dumps({"parameters": {}})}) == {}
    assert "kvzap_executor" not in (write_repository(cfg, tmp_path / "r2", "m") / "m_stream" / "config.pbtxt").read_text()


def test_an_onnx_tensorrts_parser_would_refuse_stops_the_build_before_the_engine(tiny_dirs, tmp_path, capsys,
                                                                                monkeypatch):
    import kvzap_trt.export.trt_support as support

    monkeypatch.delitem(support.SUPPORTED, "MatMul")  # as if the graph had gained an op the parser lacks
    out = tmp_path / "tiny"
    argv = ["build", "--model", str(tiny_dirs["llama"]), "--window", "8", "--block-size", "4", "--engine", "tensorrt",
            "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kvzap-trt: error: {out}/onnx/model.onnx: TensorRT's ONNX parser would "
                                               "refuse it (")
    assert "(MatMul): op not in TensorRT's ONNX parser support table" in err[0] and "more" in err[0]
    assert not (out / "build.json").exists()  # the engine step, which reads it, cannot start
