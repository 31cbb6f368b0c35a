"""`kvzap-trt generate`: the JSON contract, and exit code 2 with one line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvzap_trt.cli import main
from kvzap_trt.surrogate import random_surrogate, save_surrogate


@pytest.fixture()
def ids_file(tmp_path):
    def write(ids):
        path = tmp_path / f"ids{len(ids)}.json"
        path.write_text(json.dumps(ids))
        return str(path)

    return write


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_contract_without_tokenizer(tiny_dirs, ids_file, capsys):
    prompt = [(7 * i) % 160 for i in range(50)]
    out = run_json(capsys, ["generate", "--model", str(tiny_dirs["qwen3"]), "--surrogate", "random:linear:0",
                            "--threshold", "0", "--window", "8", "--prompt-ids-file", ids_file(prompt),
                            "--max-new-tokens", "6", "--json", "--positions"])
    assert out["text"] is None
    assert out["prompt_tokens"] == 50
    assert 1 <= len(out["token_ids"]) <= 6 and all(isinstance(t, int) for t in out["token_ids"])
    kv = out["kv"]
    assert kv["tokens"] == 50 + len(out["token_ids"]) - 1
    assert len(kv["kept"]) == 3 and all(len(layer) == 4 for layer in kv["kept"])
    assert kv["kept"] == [[len(h) for h in layer] for layer in kv["positions"]]
    assert all(h == sorted(h) and h[-8:] == list(range(kv["tokens"] - 8, kv["tokens"]))
               for layer in kv["positions"] for h in layer)  # the window is always kept
    assert 0 < kv["compression_ratio"] < 1
    assert 0 < kv["bytes_allocated"] and kv["bytes_dense"] > 0
    assert out["config"]["threshold"] == 0.0 and out["config"]["window"] == 8


def test_generate_max_num_tokens_prefills_in_chunks(tiny_dirs, ids_file, capsys):
    # --max-num-tokens reaches the engine (config field, recorded in the output's config): the
    # kept positions equal the Runtime's with the same setting and differ from the whole prefill's.
    from dataclasses import replace

    from kvzap_trt.config import resolve_config
    from kvzap_trt.runtime.generate import Runtime

    prompt = [(7 * i) % 160 for i in range(50)]
    base = ["generate", "--model", str(tiny_dirs["qwen3"]), "--surrogate", "random:linear:0", "--threshold", "0",
            "--window", "8", "--prompt-ids-file", ids_file(prompt), "--max-new-tokens", "6", "--json", "--positions"]
    chunked = run_json(capsys, [*base, "--max-num-tokens", "16"])
    whole = run_json(capsys, base)
    assert chunked["config"]["max_num_tokens"] == 16 and whole["config"]["max_num_tokens"] is None
    cfg = resolve_config(str(tiny_dirs["qwen3"]), surrogate="random:linear:0", threshold=0.0, window=8,
                         max_new_tokens=6)
    rt = Runtime.from_config(replace(cfg, max_num_tokens=16))
    want = rt.generate([prompt], positions=True)[0]
    assert (chunked["token_ids"], chunked["kv"]["positions"]) == (want.token_ids, want.kv["positions"])
    assert chunked["kv"]["positions"] != whole["kv"]["positions"]
    assert main([*base, "--max-num-tokens", "0"]) == 2
    assert "max_num_tokens must be >= 1, got 0" in capsys.readouterr().err


def test_positions_only_on_request(tiny_dirs, ids_file, capsys):
    out = run_json(capsys, ["generate", "--model", str(tiny_dirs["llama"]), "--surrogate", "random:mlp:1",
                            "--prompt-ids-file", ids_file([1, 2, 3]), "--max-new-tokens", "2", "--json"])
    assert "positions" not in out["kv"]


def bad_input_cases(tiny, tmp):
    save_surrogate(random_surrogate("linear", 3, 64, 2), tmp / "two-heads")
    (tmp / "bad.json").write_text('[1, "a"]')
    (tmp / "long.json").write_text(json.dumps([1] * 1025))
    (tmp / "ok.json").write_text("[1, 2, 3]")
    (tmp / "oov.json").write_text("[1, 160, 2]")  # the tiny vocabulary is [0, 160)
    (tmp / "negative.json").write_text("[1, -1]")
    (tmp / "notjson.json").write_text("[1, 2,")
    yarn = tmp / "yarn"
    yarn.mkdir()
    hf = json.loads((tiny / "config.json").read_text())
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 256}
    (yarn / "config.json").write_text(json.dumps(hf))
    (yarn / "model.safetensors").symlink_to(tiny / "model.safetensors")
    m = ["--model", str(tiny), "--surrogate", "random:linear:0"]
    ok = ["--prompt-ids-file", str(tmp / "ok.json")]
    return [
        (m + ok + ["--threshold", "nan"], "threshold must be a finite number, got nan"),
        (m + ok + ["--threshold", "inf"], "threshold must be a finite number, got inf"),
        (m + ok + ["--window", "-3"], "window must be >= 0"),
        (["--model", "qwen4-1b"] + ok, "unknown preset 'qwen4-1b'"),
        (m + ["--prompt-ids-file", str(tmp / "long.json")], "prompt has 1025 tokens, the maximum is 1024"),
        (["--model", str(tiny), "--surrogate", str(tmp / "two-heads")] + ok, "has 2 kv heads but model"),
        (m + ["--prompt-ids-file", str(tmp / "missing.json")], "cannot read prompt ids file"),
        (m + ["--prompt-ids-file", str(tmp / "bad.json")], "must hold a JSON list of integers"),
        (m + ["--prompt-ids-file", str(tmp / "notjson.json")], "notjson.json is not JSON"),
        (m + ["--prompt-file", str(tmp / "missing.txt")], "cannot read prompt file"),
        (m + ["--prompt", ""], "the prompt is empty"),
        (m + ["--prompt", "hello"], "has no tokenizer"),
        (m + ok + ["--max-new-tokens", "x"], "invalid int value"),
        (m + ["--prompt-ids-file", str(tmp / "oov.json")], "prompt token id 160 is outside the vocabulary [0, 160)"),
        (m + ["--prompt-ids-file", str(tmp / "negative.json")], "prompt token id -1 is outside the vocabulary"),
        (["--model", str(yarn), "--surrogate", "random:linear:0"] + ok,
         "unsupported RoPE type 'yarn'; supported: default, llama3"),
    ]


def test_bad_input_exits_2_with_one_line(tiny_dirs, tmp_path, capsys):
    for args, message in bad_input_cases(tiny_dirs["llama"], tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            raise SystemExit(main(["generate"] + args))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, args
        assert message in err, (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err


def test_other_commands_refuse_bad_input_with_one_line(tiny_dirs, tmp_path, capsys):
    tiny = str(tiny_dirs["llama"])
    (tmp_path / "empty").mkdir()
    cases = [
        (["serve", "--repository", str(tmp_path / "empty")], f"{tmp_path / 'empty'} has no model 'ensemble'"),
        (["build", "--model", "qwen3-32b", "--engine", "tensorrt", "--dry-run", "--out", str(tmp_path / "b")],
         "TensorRT engines are built for one GPU (tp 1); the config says tp 2"),  # the preset's tp
        (["score", "--model", tiny, "--prompt", "hi"], f"model {tiny} has no tokenizer"),
        (["score", "--model", tiny, "--prompt", "hi", "--oracle-variant", "kvzap-data"], "--oracle-variant needs --oracle"),
        (["calibrate", "--model", tiny, "--corpus", str(tmp_path), "--target", "0.5", "--write-preset"],
         "--write-preset needs --model to name a preset"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_score_refuses_what_it_cannot_score(smollm2_dir, capsys):
    """A model directory (no preset, so no surrogate) and a prompt past half the context."""
    assert main(["score", "--model", str(smollm2_dir), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == "kvzap-trt: error: no surrogate to score with: pass --surrogate or --oracle\n"
    assert main(["score", "--oracle", "--model", str(smollm2_dir), "--prompt", "word " * 5000]) == 2
    err = capsys.readouterr().err  # SmolLM2: 8192 positions; the oracle repeats the prompt
    assert "the oracle repeats the prompt, so at most half the context (4096) fits" in err and err.count("\n") == 1


def test_console_entry_point_exit_code(tiny_dirs, tmp_path):
    args, message = bad_input_cases(tiny_dirs["llama"], tmp_path)[4]
    proc = subprocess.run([sys.executable, "-m", "kvzap_trt.cli", "generate"] + args, capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_embedded_default_generates_text(smollm2_dir, capsys):
    out = run_json(capsys, ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "5", "--json"])
    assert isinstance(out["text"], str) and out["text"].strip()
    assert out["config"]["preset"] == "smollm2-135m"
    assert len(out["kv"]["kept"]) == 30 and len(out["kv"]["kept"][0]) == 3
