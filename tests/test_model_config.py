"""Which HF configs have a sliding window, and why it caps the context: kvzap-trt attends to every
kept token, which equals a sliding-window model's attention only while the context fits the window."""

from __future__ import annotations

import pytest
import torch

from kvzap_trt.errors import KvzapError
from kvzap_trt.models.config import ModelConfig
from tests.test_transformer import assert_same_logits, dense_causal_attend, hf_logits
from tests.tiny_models import build_tiny

BASE = dict(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=32768)


@pytest.mark.parametrize("hf,window", [
    ({"model_type": "llama"}, None),
    ({"model_type": "llama", "sliding_window": 4096}, None),  # not a Llama field: transformers ignores it
    ({"model_type": "mistral", "sliding_window": 4096}, 4096),  # Mistral-7B-v0.1
    ({"model_type": "mistral", "sliding_window": None}, None),  # v0.2 on
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, None),  # Qwen2.5's configs
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 2}, 4096),
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": True, "max_window_layers": 4}, None),
    ({"model_type": "qwen3", "sliding_window": 1024, "use_sliding_window": True,
      "layer_types": ["full_attention"] * 3 + ["sliding_attention"]}, 1024),
    ({"model_type": "qwen3", "sliding_window": None, "use_sliding_window": False, "max_window_layers": 36}, None),
])
def test_sliding_window_caps_the_context(hf, window):
    cfg = ModelConfig.from_hf({**BASE, **hf})
    assert cfg.sliding_window == window
    assert cfg.max_position_embeddings == (32768 if window is None else window)
    assert ("sliding window" in cfg.context_note) == (window is not None)


def test_window_wider_than_the_context_changes_nothing():
    cfg = ModelConfig.from_hf({**BASE, "max_position_embeddings": 2048, "model_type": "mistral", "sliding_window": 4096})
    assert cfg.max_position_embeddings == 2048 and cfg.context_note == ""


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return build_tiny("mistral", tmp_path_factory.mktemp("mistral") / "m", sliding_window=24)


def test_mistral_equals_transformers_up_to_its_window_and_not_past_it(mistral_dir):
    ids = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    assert_same_logits(mistral_dir, ids[:24])  # the whole context inside the window: exact
    from kvzap_trt.models.loading import load_model

    ours = load_model(mistral_dir).model(torch.tensor(ids), torch.arange(40), dense_causal_attend)
    theirs = hf_logits(mistral_dir, ids)
    assert torch.allclose(ours[:24], theirs[:24], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[24:], theirs[24:], atol=1e-2)  # past it, full attention is another model


def test_runtime_refuses_a_prompt_past_the_window_and_says_why(mistral_dir):
    from kvzap_trt.config import RunConfig
    from kvzap_trt.runtime.generate import Runtime

    rt = Runtime.from_config(RunConfig(model=str(mistral_dir), window=4, max_new_tokens=2, block_size=8).validate())
    assert rt.loaded.config.max_position_embeddings == 24
    out = rt.generate([[1] * 20])  # fits: runs
    assert len(out[0].token_ids) == 2
    with pytest.raises(KvzapError, match=r"25 tokens, the maximum is 24 \(the model's 24-token sliding window"):
        rt.generate([[1] * 25])


def test_a_checkpoint_with_tensors_the_forward_lacks_is_refused(tmp_path):
    """Llama with attention_bias has an o_proj bias (and mlp_bias MLP biases) that this forward
    does not model (3 layers x 4 here): refused by name rather than silently dropped."""
    from kvzap_trt.models.loading import load_model

    d = build_tiny("llama", tmp_path / "m", attention_bias=True, mlp_bias=True)
    with pytest.raises(KvzapError, match=r"has 12 tensors this llama forward has no place for, e\.g\. "
                                         r"layers\.0\.mlp\.down_proj\.bias"):
        load_model(d)


def test_an_activation_other_than_silu_is_refused():
    with pytest.raises(KvzapError, match="unsupported MLP activation hidden_act='gelu'; supported: silu"):
        ModelConfig.from_hf({**BASE, "model_type": "llama", "hidden_act": "gelu"})
    assert ModelConfig.from_hf({**BASE, "model_type": "llama", "hidden_act": "silu"}).family == "llama"


def test_weights_are_read_as_transformers_picks_them(tmp_path):
    """A consolidated.safetensors in another naming beside the HF weights (mistralai's repositories
    ship one) is not the model: the index's shards, or model.safetensors, are."""
    import json

    from safetensors.torch import load_file, save_file

    from kvzap_trt.models.loading import load_model, model_weight_files

    d = build_tiny("llama", tmp_path / "m")
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2), "tok_embeddings.weight": torch.zeros(2, 2)},
              d / "consolidated.safetensors")
    assert model_weight_files(d) == [d / "model.safetensors"]
    want = load_model(d).model.state_dict()["layers.0.self_attn.q_proj.weight"]
    # Sharded: the index names the shards; a file it does not name is ignored.
    state = load_file(d / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, keys in parts.items():
        save_file({k: state[k].contiguous() for k in keys}, d / f)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}))
    assert model_weight_files(d) == [d / f for f in sorted(parts)]
    assert torch.equal(load_model(d).model.state_dict()["layers.0.self_attn.q_proj.weight"], want)
    # Neither: every file, so a stray one is refused by name rather than ignored.
    (d / "model.safetensors.index.json").unlink()
    assert model_weight_files(d) is None
    with pytest.raises(KvzapError, match="tensors this llama forward has no place for"):
        load_model(d)
