"""The KVzip+ oracle equals kvpress's KVzipPress(kvzip_plus_normalization=True) scores (fp32, CPU)."""

from __future__ import annotations

import codecs
import this

import pytest
import torch

from kvzap_trt.models.loading import load_model
from kvzap_trt.oracle.kvzip import chat_frame, context_ids, kvzip_plus_scores

ZEN = codecs.decode(this.s, "rot13")


def kvpress_scores(model_dir, ids: list[int], chunk_size: int) -> torch.Tensor:
    from kvpress import KVzipPress
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    press = KVzipPress(compression_ratio=0.1, kvzip_plus_normalization=True, chunk_size=chunk_size)
    captured = {}
    original = press.compress_post

    def capture(m):  # the scores are reset when the press exits: keep them
        captured["scores"] = press.score_val.clone()
        original(m)

    press.compress_post = capture
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache())
    return captured["scores"][:, 0]  # [L, Hkv, T]


@pytest.mark.slow
@pytest.mark.parametrize("text,chunk_size", [(ZEN, 2048), (ZEN, 48)])  # one pass; several chunks
def test_kvzip_plus_matches_kvpress_on_smollm2(smollm2_dir, text, chunk_size):
    loaded = load_model(smollm2_dir)
    tok = loaded.tokenizer
    ids, prefix_len = context_ids(tok, text)
    ours = kvzip_plus_scores(loaded.model, tok, ids, chunk_size=chunk_size)
    want = kvpress_scores(smollm2_dir, ids, chunk_size)
    assert ours.shape == want.shape == (30, 3, len(ids))
    assert torch.all(ours[..., :prefix_len] == 0) and torch.all(ours[..., prefix_len:] > 0)
    rel = ((ours - want).abs() / want.abs().clamp(min=1e-12))[..., prefix_len:]
    assert rel.max() <= 1e-4, f"max relative error {rel.max():.2e}"


@pytest.mark.slow
def test_score_command(smollm2_dir, capsys):
    import json

    from kvzap_trt.cli import main

    text = "KVzap prunes the KV cache by predicting which entries the model will never need."
    assert main(["score", "--oracle", "--prompt", text, "--json", "--chunk-size", "8"]) == 0
    oracle = json.loads(capsys.readouterr().out)
    loaded = load_model(smollm2_dir)
    prefix_len, _ = chat_frame(loaded.tokenizer)
    assert oracle["kind"] == "kvzip+" and oracle["prefix_tokens"] == prefix_len
    ids_len = oracle["prompt_tokens"]
    assert len(oracle["scores"]) == 30 and all(len(h) == ids_len for layer in oracle["scores"] for h in layer)

    # The surrogate's scores are exactly what the cache compares with tau: with no window, a prefill
    # keeps precisely the positions scoring >= tau.
    assert main(["score", "--prompt", text, "--json", "--threshold", "0.1"]) == 0
    surrogate = json.loads(capsys.readouterr().out)
    assert surrogate["space"] == "log"
    from kvzap_trt.config import resolve_config
    from kvzap_trt.runtime.generate import Runtime

    rt = Runtime.from_config(resolve_config("smollm2-135m", window=0, threshold=0.1, max_new_tokens=0))
    tok = rt.tokenizer
    ids, _ = context_ids(tok, text)
    kept = rt.generate([ids], positions=True)[0].kv["positions"]
    want = [[[p for p, s in enumerate(h) if s >= 0.1] for h in layer] for layer in surrogate["scores"]]
    assert kept == want and 0 < sum(map(len, sum(want, []))) < 30 * 3 * len(ids)

    capsys.readouterr()
    assert main(["score", "--prompt", "   "]) == 2
    assert capsys.readouterr().err == "kvzap-trt: error: the prompt is empty\n"
    assert main(["score", "--oracle", "--prompt", "x", "--chunk-size", "0"]) == 2
    assert "chunk size must be >= 1" in capsys.readouterr().err


def test_context_ids_with_an_x_in_the_system_prompt(smollm2_dir):
    """The chat prefix ends where the user's content begins, whatever the system prompt says (it
    was found by splitting a rendering at the letter 'x')."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default in tok.chat_template
    tok.chat_template = tok.chat_template.replace(default, "You are an expert in experiments")
    text = "Some context to score."
    ids, prefix_len = context_ids(tok, text)
    assert tok.decode(ids[:prefix_len]) == ("<|im_start|>system\nYou are an expert in experiments<|im_end|>\n"
                                            "<|im_start|>user\n")
    assert ids[prefix_len:] == tok.encode(text, add_special_tokens=False)
    assert prefix_len == chat_frame(tok)[0]


def transformers_repeat_once(model_dir, ids: list[int], text: slice, repeat: slice) -> torch.Tensor:
    """The kvzap-data oracle from transformers' own eager attention weights, written from its
    definition: per layer and kv head, the max over the repeat's queries t and the group's heads
    of attn[t, i] / ||h_t|| * ||W_O,g v_i||, i over the text. -> [L, Hkv, len(text)]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    c = model.config
    Hkv, G, D = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
    out = []

    def hook(module, args, kwargs, output):
        h = kwargs["hidden_states"][0]  # [T, d]: the input of attention (after input_layernorm)
        attn = output[1][0]  # [Hq, T, T], each row a softmax over the keys up to it
        v = module.v_proj(h).view(-1, Hkv, D)  # [T, Hkv, D]
        wo = module.o_proj.weight.view(c.hidden_size, Hkv, G, D)
        wov = torch.einsum("jhgi,khi->hgkj", wo, v[text]).norm(dim=-1)  # [Hkv, G, n]
        a = attn[:, repeat, text].view(Hkv, G, -1, wov.shape[-1]) / h[repeat].norm(dim=-1)[None, None, :, None]
        out.append((a * wov[:, :, None, :]).amax(dim=(1, 2)))

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), output_attentions=True)
    for handle in handles:
        handle.remove()
    return torch.stack(out)


@pytest.mark.slow
def test_repeat_once_oracle_matches_transformers_attention(smollm2_dir, monkeypatch, capsys):
    """The one-pass oracle of NVIDIA's training collector, on SmolLM2: the rendering is the chat
    template's for user: text + the instruction, assistant: text, and the scores are those of
    transformers' eager attention weights."""
    from kvzap_trt.oracle.repeat_once import REPEAT_INSTRUCTION, repeat_frame, repeat_once_scores

    loaded = load_model(smollm2_dir)
    tok = loaded.tokenizer
    text = ZEN[:300]
    ids, prefix_len = context_ids(tok, text)
    hidden = {}
    ours = repeat_once_scores(loaded.model, tok, ids, hidden=hidden)
    n = len(ids) - prefix_len
    before, between, after = repeat_frame(tok)
    full = ids + tok.encode(between, add_special_tokens=False) + ids[prefix_len:] + tok.encode(after, add_special_tokens=False)
    rendering = tok.apply_chat_template([{"role": "user", "content": text + REPEAT_INSTRUCTION},
                                         {"role": "assistant", "content": text}], tokenize=False)
    assert tok.decode(full) == rendering
    start = len(ids) + len(tok.encode(between, add_special_tokens=False))
    want = transformers_repeat_once(smollm2_dir, full, slice(prefix_len, len(ids)), slice(start, start + n))
    assert ours.shape == (30, 3, len(ids)) and torch.all(ours[..., :prefix_len] == 0)
    got = ours[..., prefix_len:]
    assert torch.all(got > 0)
    rel = (got - want).abs() / want
    assert rel.max() <= 1e-4, f"max relative error {rel.max():.2e}"
    assert set(hidden) == set(range(30)) and hidden[0].shape == (len(ids), 576)
    from kvzap_trt.oracle import repeat_once

    monkeypatch.setattr(repeat_once, "QUERY_BLOCK", 7)  # the repeat's queries in blocks of 7
    assert torch.allclose(repeat_once_scores(loaded.model, tok, ids), ours, rtol=1e-5, atol=0)
    # the KVzipPress oracle on the same text differs (another softmax and query set)
    press = kvzip_plus_scores(loaded.model, tok, ids)[..., prefix_len:]
    assert not torch.allclose(press, got, rtol=1e-2)
    # `kvzap-trt score --oracle --oracle-variant kvzap-data` prints these scores
    import json

    from kvzap_trt.cli import main

    capsys.readouterr()
    assert main(["score", "--model", str(smollm2_dir), "--prompt", text, "--oracle", "--oracle-variant", "kvzap-data",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "kvzip+ (kvzap-data)" and printed["prefix_tokens"] == prefix_len
    assert torch.allclose(torch.tensor(printed["scores"]), ours, rtol=1e-5, atol=0)
