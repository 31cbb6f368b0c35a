"""`kvzap-trt convert`: TensorRT-LLM checkpoints that read back to the same model and decisions."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvzap_trt.cli import main
from kvzap_trt.config import RunConfig
from kvzap_trt.convert import safetensors_stream
from kvzap_trt.convert.reader import read_checkpoint
from kvzap_trt.models.config import ModelConfig
from kvzap_trt.models.loading import load_model, load_state_dict
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.surrogate import random_surrogate, save_surrogate
from tests.test_transformer import dense_causal_attend, hf_logits
from tests.tiny_models import build_tiny


def convert_cli(model_dir, surrogate, out, tp, *extra):
    assert main(["convert", "--model", str(model_dir), "--surrogate", str(surrogate), "--out", str(out),
                 "--tp", str(tp), "--threshold", "0", "--window", "8", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def model_dirs(tiny_dirs, tmp_path_factory):
    """The shared tiny models and a Mistral (a 4096-token window, past its 1024 positions)."""
    return {**tiny_dirs, "mistral": build_tiny("mistral", tmp_path_factory.mktemp("mistral") / "m")}


@pytest.fixture(scope="module")
def surrogates(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sur")
    out = {}
    for family, d in model_dirs.items():
        m = ModelConfig.from_dir(d)
        kind = "mlp" if family == "qwen3" else "linear"
        out[family] = save_surrogate(random_surrogate(kind, m.num_layers, m.hidden_size, m.num_kv_heads, 4),
                                     root / family) or root / family
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2", "mistral"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])  # 8 > the 4 kv heads: kv heads are replicated
def test_round_trip(model_dirs, surrogates, tmp_path, family, tp):
    model_dir = model_dirs[family]
    ckpt = convert_cli(model_dir, surrogates[family], tmp_path / "ckpt", tp, "--dtype", "float32")

    # 1. The tensors read back exactly, surrogate included, and the model's family and window.
    back = read_checkpoint(ckpt)
    source = ModelConfig.from_dir(model_dir)
    assert (back.model_config.family, back.model_config.sliding_window) == (family, source.sliding_window)
    assert back.model_config.max_position_embeddings == source.max_position_embeddings
    hf = load_state_dict(model_dir)
    if back.model_config.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
        back.state.pop("lm_head.weight", None)
    assert set(back.state) == set(hf) and all(torch.equal(back.state[k], hf[k]) for k in hf)
    from kvzap_trt.surrogate import read_surrogate_dir

    s = read_surrogate_dir(surrogates[family])
    assert all(torch.equal(getattr(back.surrogate, k), getattr(s, k)) for k in ("w1", "b1"))
    assert back.surrogate.kind == s.kind

    # 2. Logits of the model loaded from the checkpoint match transformers' on the original.
    ids = torch.randint(0, 160, (40,), generator=torch.Generator().manual_seed(tp)).tolist()
    got = load_model(ckpt).model(torch.tensor(ids), torch.arange(40), dense_causal_attend)
    want = hf_logits(model_dir, ids)
    assert ((got - want).norm() / want.norm()) <= 1e-5

    # 3. The same KVzap decisions and tokens as the original model + surrogate; the checkpoint's
    #    own surrogate, threshold and window are used (no flags).
    prompt = torch.randint(0, 160, (60,), generator=torch.Generator().manual_seed(7)).tolist()
    orig = Runtime.from_config(RunConfig(model=str(model_dir), surrogate=str(surrogates[family]), threshold=0.0,
                                         window=8, max_new_tokens=8).validate())
    from kvzap_trt.config import resolve_config

    conv = Runtime.from_config(resolve_config(str(ckpt), max_new_tokens=8))
    assert (conv.cfg.threshold, conv.cfg.window) == (0.0, 8)
    a = orig.generate([prompt], orig.sampling(stop_token_ids=()), positions=True)[0]
    b = conv.generate([prompt], conv.sampling(stop_token_ids=()), positions=True)[0]
    assert b.token_ids == a.token_ids and b.kv["positions"] == a.kv["positions"]
    assert 0 < a.kv["compression_ratio"] < 1


def test_tensorrt_llm_layout(tiny_dirs, surrogates, tmp_path):
    """Names, shapes and slices as TensorRT-LLM 1.x's Qwen converter lays them out, checked by hand."""
    tp, model_dir = 2, tiny_dirs["qwen3"]
    ckpt = convert_cli(model_dir, surrogates["qwen3"], tmp_path / "ckpt", tp, "--dtype", "bfloat16")
    c = json.loads((ckpt / "config.json").read_text())
    assert c["architecture"] == "Qwen3ForCausalLM" and c["qwen_type"] == "qwen3" and c["dtype"] == "bfloat16"
    assert c["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_size"]) == (8, 4, 16)
    assert c["kvzap"]["kind"] == "mlp" and c["kvzap"]["threshold"] == 0.0 and c["kvzap"]["window"] == 8
    manifest = json.loads((ckpt / "manifest.json").read_text())
    import hashlib

    for name, entry in manifest.items():
        assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == entry["sha256"]
    hf = load_state_dict(model_dir)
    q, k, v = (hf[f"layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    for r in range(tp):
        t = load_file(ckpt / f"rank{r}.safetensors")
        assert all(x.dtype == torch.bfloat16 for x in t.values())
        # rank r: q heads 4r..4r+3, then kv heads 2r..2r+1 of k, then of v (head_dim 16)
        want = torch.cat([q[64 * r : 64 * (r + 1)], k[32 * r : 32 * (r + 1)], v[32 * r : 32 * (r + 1)]])
        assert torch.equal(t["transformer.layers.1.attention.qkv.weight"], want.bfloat16())
        assert torch.equal(t["transformer.layers.1.mlp.fc.weight"], hf["layers.1.mlp.gate_proj.weight"].chunk(2)[r].bfloat16())
        assert torch.equal(t["transformer.layers.1.mlp.gate.weight"], hf["layers.1.mlp.up_proj.weight"].chunk(2)[r].bfloat16())
        assert torch.equal(t["transformer.layers.1.attention.dense.weight"],
                           hf["layers.1.self_attn.o_proj.weight"].chunk(2, 1)[r].bfloat16())
        assert t["transformer.layers.1.attention.q_layernorm.weight"].shape == (16,)
        assert t["transformer.layers.1.attention.kvzap.proj.weight"].shape == (2, 8)  # 2 kv heads, MLP width 8
        assert t["lm_head.weight"].shape == (80, 64) and t["transformer.vocab_embedding.weight"].shape == (160, 64)
        assert "transformer.ln_f.weight" in t


def test_streaming_writer_refuses_what_it_did_not_plan(tmp_path):
    w = safetensors_stream.StreamingSafetensorsWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (2,))})
    with pytest.raises(ValueError, match="out of order"):
        w.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="planned"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="were not written"):
        w.close()


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_round_trip(smollm2_dir, tmp_path, tp):
    save_surrogate(random_surrogate("linear", 30, 576, 3, seed=2), tmp_path / "s")
    ckpt = convert_cli(smollm2_dir, tmp_path / "s", tmp_path / "ckpt", tp)
    ids = torch.randint(0, 49152, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    got = load_model(ckpt).model(torch.tensor(ids), torch.arange(48), dense_causal_attend)
    want = hf_logits(smollm2_dir, ids)
    assert ((got - want).norm() / want.norm()) <= 1e-5
    from kvzap_trt.config import resolve_config

    orig = Runtime.from_config(RunConfig(model=str(smollm2_dir), surrogate=str(tmp_path / "s"), threshold=0.0,
                                         window=8, max_new_tokens=6).validate())
    conv = Runtime.from_config(resolve_config(str(ckpt), max_new_tokens=6))
    prompt = orig.encode("The quick brown fox jumps over the lazy dog because it wanted to see the other side.")
    a, b = (rt.generate([prompt], positions=True)[0] for rt in (orig, conv))
    assert b.token_ids == a.token_ids and b.kv["positions"] == a.kv["positions"] and b.text == a.text


def bad_cases(tiny_dirs, surrogates, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    state = load_file(tiny_dirs["llama"] / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors")
    misshapen = tmp_path / "misshapen"
    misshapen.mkdir()
    (misshapen / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    state = load_file(tiny_dirs["llama"] / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.weight"] = state["model.layers.0.self_attn.o_proj.weight"][:, :32].contiguous()
    save_file(state, misshapen / "model.safetensors")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    m = ModelConfig.from_dir(tiny_dirs["llama"])
    save_surrogate(random_surrogate("linear", m.num_layers, m.hidden_size, 2), tmp_path / "other")
    llama, sur = tiny_dirs["llama"], surrogates["llama"]
    biased = build_tiny("llama", tmp_path / "biased", attention_bias=True)  # o_proj has a bias too
    return [
        ((biased, sur, 1), "model has 3 tensors this llama checkpoint has no place for, e.g. "
                           "layers.0.self_attn.o_proj.bias"),
        ((gpt2, sur, 1), "unsupported architecture 'gpt2'"),
        ((broken, sur, 1), "model lacks tensor layers.1.mlp.up_proj.weight"),
        ((misshapen, sur, 1), "layers.0.self_attn.o_proj.weight has shape (64, 32), its config implies (64, 128)"),
        ((llama, tmp_path / "other", 1), "has 2 kv heads but model"),
        ((llama, sur, 3), "tp 3 does not divide the model's 8 attention heads"),
    ]


def test_bad_input_leaves_no_checkpoint(tiny_dirs, surrogates, tmp_path, capsys):
    out_root = tmp_path / "outs"
    out_root.mkdir()
    for (model, sur, tp), message in bad_cases(tiny_dirs, surrogates, tmp_path):
        code = main(["convert", "--model", str(model), "--surrogate", str(sur), "--out", str(out_root / "ckpt"),
                     "--tp", str(tp)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (message, err)
        assert list(out_root.iterdir()) == []


def test_full_disk_leaves_no_checkpoint(tiny_dirs, surrogates, tmp_path, monkeypatch, capsys):
    written = {"bytes": 0}
    real_put = safetensors_stream.StreamingSafetensorsWriter._put

    def put(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > 20_000:  # the disk fills part-way through the first rank file
            raise OSError(errno.ENOSPC, "No space left on device")
        real_put(self, data)

    monkeypatch.setattr(safetensors_stream.StreamingSafetensorsWriter, "_put", put)
    code = main(["convert", "--model", str(tiny_dirs["qwen3"]), "--surrogate", str(surrogates["qwen3"]),
                 "--out", str(tmp_path / "out" / "ckpt"), "--tp", "2"])
    assert code == 2 and "no space left on the device" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_weights_beside_the_model_and_the_sliding_window(tiny_dirs, surrogates, tmp_path):
    """convert reads the weights transformers would (a consolidated.safetensors in Mistral's naming
    beside them is not the model), and a Qwen3 sliding window that capped the context still says so
    when the checkpoint is read back."""
    qwen = build_tiny("qwen3", tmp_path / "qwen", use_sliding_window=True, sliding_window=256, max_window_layers=1)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, qwen / "consolidated.safetensors")
    ckpt = convert_cli(qwen, surrogates["qwen3"], tmp_path / "ckpt", 2, "--dtype", "float32")
    back = read_checkpoint(ckpt).model_config
    source = ModelConfig.from_dir(qwen)
    assert source.sliding_window == 256 and source.max_position_embeddings == 256
    assert back.sliding_window == 256 and back.max_position_embeddings == 256
    assert back.context_note == source.context_note != ""
    plain = read_checkpoint(convert_cli(tiny_dirs["qwen3"], surrogates["qwen3"], tmp_path / "plain", 1)).model_config
    assert plain.sliding_window is None and plain.context_note == ""
