"""The flags made from RunConfig's fields (kvzap_trt/cli/flags.py): each reaches the config, each
belongs to a command, and `build --engine tensorrt`'s container command line carries them."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest

from kvzap_trt.cli import build_parser
from kvzap_trt.cli.build import container_args
from kvzap_trt.cli.flags import CONFIG_FIELDS, EVICTION, REASONING, SAMPLING, SERVING, Parser, add_config_flags, \
    config_argv, config_from_args, flag_name
from kvzap_trt.config import RunConfig

# A value for every flag field; all but --model (a preset) differ from the defaults and the preset's.
GIVEN = {"model": "smollm2-135m", "surrogate": "random:linear:1", "threshold": -1.5, "window": 7,
         "compress_decoding": False, "dtype": "bfloat16", "device": "cuda", "tp": 2, "block_size": 8,
         "max_new_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 4, "max_seqs": 2,
         "kv_cache_mb": 12.5, "max_num_tokens": 64, "probe": "/abs/probe.safetensors", "fast_max_new_tokens": 3}


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its name: 'generate', 'probe train', ..."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[prefix + name] = sub
                out.update(commands(sub, f"{prefix}{name} "))
    return out


def test_every_flag_field_has_a_value_here_and_a_command():
    assert set(GIVEN) == set(CONFIG_FIELDS)
    assert set(EVICTION + SAMPLING + SERVING + REASONING + ("tp",)) == set(CONFIG_FIELDS)
    defaults = RunConfig()
    assert all(GIVEN[k] != getattr(defaults, k) for k in GIVEN if k != "model")
    taken = {f: [] for f in CONFIG_FIELDS}
    for name, sub in commands(build_parser()).items():
        options = {o for a in sub._actions for o in a.option_strings}
        for f in sub.get_default("config_fields") or ():
            assert flag_name(f) in options, (name, f)
            taken[f].append(name)
    assert all(taken.values()), {f: c for f, c in taken.items() if not c}  # each field is some command's flag
    assert "generate" in taken["max_new_tokens"] and "serve" in taken["max_seqs"]


def test_a_commands_own_flag_of_a_config_name_stays_its_own():
    # probe train's --seed splits and initialises the probe; eval's --seed generates the tasks
    for argv in (["probe", "train", "--data", "d.jsonl", "--out", "p.safetensors", "--seed", "5"],
                 ["eval", "--seed", "5", "--window", "9"]):
        args = build_parser().parse_args(argv)
        assert args.seed == 5 and config_from_args(args).seed == RunConfig().seed
    assert config_from_args(args).window == 9  # eval's --window is the config's


def test_embed_offers_the_head_aggregations_the_embedding_knows():
    from kvzap_trt.cli.embed import HEAD_AGGS
    from kvzap_trt.kvcoe.embedding import HEAD_AGGS as KNOWN

    assert HEAD_AGGS == KNOWN


def test_each_flag_reaches_the_config():
    p = Parser()
    add_config_flags(p, tuple(CONFIG_FIELDS))
    argv = config_argv(argparse.Namespace(**GIVEN), tuple(CONFIG_FIELDS))
    assert "--no-compress-decoding" in argv and "--kv-cache-mb" in argv
    cfg = config_from_args(p.parse_args(argv))
    assert {k: getattr(cfg, k) for k in GIVEN if k != "model"} == {k: v for k, v in GIVEN.items() if k != "model"}
    assert cfg.preset == "smollm2-135m"  # --model named the preset, whose model the config now holds


def test_flags_not_given_leave_the_preset_and_defaults():
    p = Parser()
    add_config_flags(p, tuple(CONFIG_FIELDS))
    args = p.parse_args([])
    assert all(getattr(args, k) is None for k in CONFIG_FIELDS)
    assert config_argv(args, tuple(CONFIG_FIELDS)) == []
    assert dataclasses.asdict(config_from_args(args))["window"] == RunConfig().window


def test_a_probe_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = Parser()
    add_config_flags(p, REASONING)
    assert p.parse_args(["--probe", "p.safetensors"]).probe == str(tmp_path / "p.safetensors")


@pytest.mark.parametrize("flag,value", [("--dtype", "float64"), ("--device", "tpu"), ("--window", "seven")])
def test_a_bad_value_is_a_usage_error(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "--prompt", "x", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err


def test_the_container_build_line_carries_the_config():
    given = {k: v for k, v in GIVEN.items() if k in EVICTION + SERVING}
    argv = ["build", *config_argv(argparse.Namespace(**given), EVICTION + SERVING), "--model-name", "m",
            "--max-seq-len", "2048"]
    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(["build", *container_args(args)])
    assert again.engine == "tensorrt" and (again.model_name, again.max_seq_len) == ("m", 2048)
    want, got = config_from_args(args), config_from_args(again)
    assert dataclasses.replace(got, device=want.device) == want  # all but the device, which is the container's
    assert again.device is None and "--device" not in shlex.join(container_args(args))


def test_flag_names_follow_the_fields():
    assert flag_name("kv_cache_mb") == "--kv-cache-mb" and flag_name("compress_decoding") == "--no-compress-decoding"


def test_the_parser_is_built_without_torch():
    # every command's flags and --help come before the heavy imports (each run imports its own)
    import subprocess
    import sys

    code = ("import sys; from kvzap_trt.cli import build_parser; build_parser(); "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("command", ["generate", "score", "embed"])
def test_an_empty_prompt_is_refused_before_the_model_loads(command, tmp_path, capsys):
    from kvzap_trt.cli import main

    blank = tmp_path / "blank.txt"
    blank.write_text(" \n")
    for source in (["--prompt", "  "], ["--prompt-file", str(blank)]):
        assert main([command, *source]) == 2
        assert capsys.readouterr().err == "kvzap-trt: error: the prompt is empty\n"
    assert main([command, "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err
