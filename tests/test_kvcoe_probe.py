"""Fast/slow reasoning (kvzap_trt/kvcoe: probe.py, probe_train.py, reasoning.py) end to end on the tiny
Qwen3-shaped model, given a character-level tokenizer whose chat template has Qwen3's
`enable_thinking` switch: `kvzap-trt probe train` on prompts with a separable signal, the probe
file (save, load, another model refused, atomic write), `reasoning` on the engine, `generate` and
the OpenAI front. Expected outputs come from runs without the option (plain generation of the
prompt, or of the prompt followed by the think block), never from the code under test."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
import torch

from kvzap_trt.cli import main
from kvzap_trt.config import resolve_config
from kvzap_trt.errors import KvzapError
from kvzap_trt.kvcoe.probe import Probe, ProbeConfig, model_shape
from kvzap_trt.kvcoe.probe_train import read_labelled, split
from kvzap_trt.runtime.generate import Runtime
from tests.tiny_models import build_tiny

# Qwen3's template, reduced to what matters here: enable_thinking=False appends the empty think block.
QWEN3_LIKE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")


def save_char_tokenizer(out, template: str | None = QWEN3_LIKE) -> None:
    """One token per printable ASCII character and newline (ids 0-95), then <|endoftext|>,
    <|im_start|>, <|im_end|> (special) and <think>, </think> (not special, as Qwen3's): 101 < 160."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, []))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(out)


THINK_BLOCK = [99, 95, 95, 100, 95, 95]  # "<think>", "\n", "\n", "</think>", "\n", "\n" in that tokenizer


def question(kind: str, i: int) -> str:
    """A separable signal: "fast" prompts are mostly 'a', "slow" ones mostly 'z'."""
    return f"{(kind[0] if kind == 'alpha' else 'z') * (20 + i)} {i}?"


FAST, SLOW = "alpha", "zulu"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = build_tiny("qwen3", tmp_path_factory.mktemp("qwen3chat") / "m")
    save_char_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("probe") / "labelled.jsonl"
    lines = [{"text": question(FAST, i), "label": "fast"} for i in range(10)]
    lines += [{"text": question(SLOW, i), "label": 1} for i in range(10)]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return f


@pytest.fixture(scope="module")
def probe_file(qwen_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe.safetensors"
    assert main(["probe", "train", "--model", str(qwen_dir), "--data", str(data_file), "--out", str(out),
                 "--epochs", "200", "--val-frac", "0.3", "--batch", "8"]) == 0
    return out


def test_train_writes_a_probe_that_separates_and_reports_held_out_accuracy(probe_file, qwen_dir, capsys):
    probe = Probe.load(probe_file)
    t = probe.cfg.training
    assert (t["train"], t["held_out"], t["prompts"]) == (14, 6, 20)
    assert t["held_out_accuracy"] == 1.0 and t["train_accuracy"] == 1.0
    assert probe.cfg.hidden == 512 and probe.cfg.prompt_format == "chat" and probe.cfg.head_agg == "flatten"
    assert probe.cfg.input_dim == 4 * 2 * 16  # kv heads x (K, V) x head_dim of the tiny model
    rt = Runtime.from_config(resolve_config(str(qwen_dir)))
    assert probe.cfg.shape == model_shape(rt.loaded.config)
    # Unseen prompts of both kinds, embedded through the engine: the probe separates them.
    ids = [rt.encode(question(k, i), chat=True) for k in (FAST, SLOW) for i in (30, 41)]
    x = torch.stack([r.embedding for r in rt.embed(ids, probe.cfg.embedding)])
    assert [probe.choose(e)[0] for e in x] == ["fast", "fast", "slow", "slow"]


def test_auto_chooses_as_the_probe_says_fast_forces_the_think_block_slow_is_unchanged(qwen_dir, probe_file):
    rt = Runtime.from_config(resolve_config(str(qwen_dir), probe=str(probe_file), max_new_tokens=12))
    prompts = [rt.encode(question(k, i), chat=True) for k, i in ((FAST, 33), (SLOW, 33), (FAST, 7), (SLOW, 50))]
    auto = rt.generate(prompts, reasoning="auto")
    assert [r.reasoning for r in auto] == ["fast", "slow", "fast", "slow"]
    assert all(r.reasoning_p_slow is not None for r in auto)
    assert [r.reasoning_p_slow >= 0.5 for r in auto] == [False, True, False, True]
    plain = rt.generate(prompts)  # the option off: nothing chosen, nothing forced
    assert all(r.reasoning is None and r.reasoning_p_slow is None for r in plain)
    after_block = rt.generate([p + THINK_BLOCK for p in prompts], rt.sampling(max_new_tokens=12 - len(THINK_BLOCK)))
    for a, p, b in zip(auto, plain, after_block):
        if a.reasoning == "slow":
            assert a.token_ids == p.token_ids  # the request as given
        else:  # the empty think block first, then what the prompt followed by it generates
            assert a.token_ids[:len(THINK_BLOCK)] == THINK_BLOCK
            assert a.token_ids[len(THINK_BLOCK):] == b.token_ids
            assert a.text.startswith("<think>\n\n</think>\n\n")
    # Explicit modes need no probe and read nothing.
    no_probe = Runtime(resolve_config(str(qwen_dir), max_new_tokens=12), rt.loaded, None)
    fast = no_probe.generate(prompts[:2], reasoning="fast")
    assert [r.reasoning for r in fast] == ["fast", "fast"] and all(r.reasoning_p_slow is None for r in fast)
    assert fast[1].token_ids[len(THINK_BLOCK):] == after_block[1].token_ids
    assert [r.token_ids for r in no_probe.generate(prompts[:2], reasoning="slow")] == [p.token_ids for p in plain[:2]]
    with pytest.raises(KvzapError, match="reasoning auto needs a difficulty probe"):
        no_probe.generate(prompts[:1], reasoning="auto")
    with pytest.raises(KvzapError, match="reasoning must be one of auto, fast, slow"):
        rt.generate(prompts[:1], reasoning="medium")


def test_fast_budget_on_a_model_without_the_switch(qwen_dir, tmp_path):
    # The same weights, a template without enable_thinking: fast is only the shorter budget.
    d = tmp_path / "plain"
    shutil.copytree(qwen_dir, d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    save_char_tokenizer(d, template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                                     "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    prompts = [[5, 6, 7, 8], [40, 41, 42]]
    no_budget = Runtime.from_config(resolve_config(str(d), max_new_tokens=20))
    with pytest.raises(KvzapError, match="has no fast mode"):
        no_budget.generate(prompts, reasoning="fast")
    rt = Runtime.from_config(resolve_config(str(d), max_new_tokens=20, fast_max_new_tokens=5))
    long = rt.generate(prompts, rt.sampling(stop_token_ids=()))
    fast = rt.generate(prompts, rt.sampling(stop_token_ids=()), reasoning="fast")
    slow = rt.generate(prompts, rt.sampling(stop_token_ids=()), reasoning="slow")
    assert [len(r.token_ids) for r in long] == [20, 20]
    assert [r.token_ids for r in fast] == [r.token_ids[:5] for r in long]  # greedy: the long answer's start
    assert all(r.finish_reason == "length" and r.reasoning == "fast" for r in fast)
    assert [r.token_ids for r in slow] == [r.token_ids for r in long]


def test_generate_json_returns_the_choice(qwen_dir, probe_file, capsys):
    argv = ["generate", "--model", str(qwen_dir), "--prompt", question(SLOW, 12), "--chat", "--max-new-tokens", "8",
            "--json", "--reasoning", "auto", "--probe", str(probe_file)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reasoning"]["requested"] == "auto" and out["reasoning"]["used"] == "slow"
    assert 0.5 <= out["reasoning"]["p_slow"] <= 1 and out["config"]["probe"] == str(probe_file.resolve())
    assert main(argv[:-4] + ["--reasoning", "fast"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reasoning"] == {"requested": "fast", "used": "fast", "p_slow": None}
    assert out["token_ids"][:len(THINK_BLOCK)] == THINK_BLOCK
    assert main(argv[:-4]) == 0
    assert "reasoning" not in json.loads(capsys.readouterr().out)  # off: the output is as before


def test_a_probe_for_another_model_is_refused(probe_file, tmp_path, capsys):
    other = build_tiny("qwen3", tmp_path / "other", num_key_value_heads=2, head_dim=16)
    save_char_tokenizer(other)
    rt = Runtime.from_config(resolve_config(str(other), probe=str(probe_file)))
    with pytest.raises(KvzapError, match=r"the probe was trained for model .* does not fit model .*num_kv_heads 4 vs 2"):
        rt.generate([[1, 2, 3]], reasoning="auto")
    assert main(["generate", "--model", str(other), "--prompt", "zz", "--reasoning", "auto",
                 "--probe", str(probe_file)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and err.count("\n") == 1
    from kvzap_trt.serve.server import check_loadable

    with pytest.raises(KvzapError, match="cannot serve .* does not fit"):  # `kvzap-trt serve --probe` says so at start
        check_loadable(resolve_config(str(other), probe=str(probe_file)))
    with pytest.raises(KvzapError, match="not a kvzap-trt probe"):
        Probe.load(other / "model.safetensors")
    with pytest.raises(KvzapError, match="cannot read probe"):
        Probe.load(tmp_path / "missing.safetensors")


def test_save_is_atomic_and_load_round_trips(probe_file, tmp_path, monkeypatch):
    import pathlib

    probe = Probe.load(probe_file)
    target = tmp_path / "p.safetensors"
    probe.save(target)
    again = Probe.load(target)
    x = torch.randn(3, probe.cfg.input_dim)
    torch.testing.assert_close(again.p_slow(x), probe.p_slow(x), rtol=0, atol=0)
    assert again.cfg == probe.cfg
    before = target.read_bytes()

    real_write = pathlib.Path.write_bytes

    def torn(self, data):  # the write dies halfway through
        real_write(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", torn)
    with pytest.raises(OSError, match="disk full"):
        probe.save(target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


@pytest.mark.parametrize("content,match", [
    ('{"text": "a", "label": "medium"}\n', 'in.jsonl:1: label must be "fast", "slow", 0 or 1'),
    ('{"text": "a", "label": true}\n', "in.jsonl:1: label must be"),
    ('{"text": "a"}\n', "in.jsonl:1: label must be"),
    ('{"label": 0}\n', 'in.jsonl:1: each line must be an object with a non-empty string "text"'),
    ("oops\n", "in.jsonl:1: not JSON"),
    ("\n\n", "holds no texts"),
])
def test_bad_training_files_exit_2_with_one_line(tmp_path, capsys, content, match, qwen_dir):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    assert main(["probe", "train", "--model", str(qwen_dir), "--data", str(src), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


def test_one_label_only_and_bad_configs_are_refused(tmp_path, qwen_dir, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": question(FAST, i), "label": "fast"}) for i in range(4)))
    assert read_labelled(src)[1] == [0, 0, 0, 0]
    assert main(["probe", "train", "--model", str(qwen_dir), "--data", str(src), "--out", str(tmp_path / "p")]) == 2
    assert "a probe needs both labels" in capsys.readouterr().err
    shape = {"num_layers": 3, "num_kv_heads": 4, "head_dim": 16, "hidden_size": 64, "vocab_size": 160}
    with pytest.raises(KvzapError, match="threshold"):
        ProbeConfig("m", shape, threshold=1.0)
    with pytest.raises(KvzapError, match="hidden"):
        ProbeConfig("m", shape, hidden=-1)
    with pytest.raises(KvzapError, match="fast_max_new_tokens"):
        resolve_config(str(qwen_dir), fast_max_new_tokens=0)
    tr, va = split(10, 0.3, 0)
    assert len(va) == 3 and sorted(tr + va) == list(range(10)) and split(10, 0.3, 0) == (tr, va)


def test_openai_reasoning_field(qwen_dir, probe_file):
    from kvzap_trt.serve.engine_loop import EngineLoop
    from kvzap_trt.serve.openai_api import OpenAIServer

    rt = Runtime.from_config(resolve_config(str(qwen_dir), probe=str(probe_file), kv_cache_mb=4, max_seqs=4))
    loop = EngineLoop.from_runtime(rt).start()
    server = OpenAIServer(loop, "tiny").start()
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        for kind, want in ((FAST, "fast"), (SLOW, "slow")):
            msgs = [{"role": "user", "content": question(kind, 25)}]
            r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                               extra_body={"reasoning": "auto"}).to_dict()
            assert r["reasoning"]["requested"] == "auto" and r["reasoning"]["used"] == want
            ids = rt.encode(question(kind, 25), chat=True)
            direct = rt.generate([ids], rt.sampling(max_new_tokens=10), reasoning="auto")[0]
            assert r["choices"][0]["message"]["content"] == direct.text
            assert r["reasoning"]["p_slow"] == pytest.approx(direct.reasoning_p_slow, abs=1e-5)
            plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0).to_dict()
            assert "reasoning" not in plain
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                     stream=True, extra_body={"reasoning": "fast"}))
        assert chunks[-1].to_dict()["reasoning"] == {"requested": "fast", "used": "fast", "p_slow": None}
        assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("<think>\n\n</think>\n\n")
        c = client.completions.create(model="tiny", prompt=question(FAST, 3), max_tokens=4, temperature=0,
                                      extra_body={"reasoning": "slow"}).to_dict()
        assert c["reasoning"]["used"] == "slow"
        for value, message in (("medium", "Input should be 'auto', 'fast' or 'slow'"), (3, "Input should be")):
            resp = httpx.post(f"{server.url}/chat/completions", timeout=60,
                              json={"model": "tiny", "messages": msgs, "max_tokens": 2, "reasoning": value})
            err = resp.json()["error"]
            assert resp.status_code == 400 and err["param"] == "reasoning" and message in err["message"], resp.text
    finally:
        server.stop()
        loop.stop()
    bare = Runtime(resolve_config(str(qwen_dir), kv_cache_mb=4, max_seqs=4), rt.loaded, None)
    loop = EngineLoop.from_runtime(bare).start()
    server = OpenAIServer(loop, "tiny").start()
    try:
        resp = httpx.post(f"{server.url}/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": msgs, "max_tokens": 2, "reasoning": "auto"})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "reasoning"
        assert "needs a difficulty probe" in resp.json()["error"]["message"]
        assert httpx.get(f"{server.url}/models", timeout=10).status_code == 200  # still serving
    finally:
        server.stop()
        loop.stop()
