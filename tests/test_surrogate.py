"""Surrogates: NVIDIA's released format both ways with kvpress, and validation against a model."""

from __future__ import annotations

import json

import pytest
import torch

from kvzap_trt.errors import KvzapError
from kvzap_trt.models.config import ModelConfig
from kvzap_trt.surrogate import load_surrogate, random_surrogate, read_surrogate_dir, save_surrogate


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_our_files_load_in_kvpress_with_the_same_scores(tmp_path, kind):
    from kvpress.presses.kvzap_press import KVzapModel

    s = random_surrogate(kind, 3, 64, 4, seed=1)
    s.b1.normal_()  # non-zero biases, so their names and order are checked too
    if s.b2 is not None:
        s.b2.normal_()
    save_surrogate(s, tmp_path / "s")
    theirs = KVzapModel.from_pretrained(tmp_path / "s").eval()
    x = torch.randn(10, 3, 64)  # [tokens, layers, d]
    with torch.no_grad():
        want = theirs(x)  # [tokens, layers, Hkv]
    got = torch.stack([s.score(i, x[:, i]) for i in range(3)], 1)
    assert torch.allclose(got, want, atol=1e-6)
    again = read_surrogate_dir(tmp_path / "s")
    assert again.kind == kind and torch.equal(again.w1, s.w1) and torch.equal(again.b1, s.b1)


@pytest.mark.parametrize("hidden_dim", [None, 8])
def test_kvpress_files_load_in_ours(tmp_path, hidden_dim):
    from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel

    torch.manual_seed(0)
    theirs = KVzapModel(KVzapConfig(input_dim=64, output_dim=4, n_modules=3, hidden_dim=hidden_dim)).eval()
    theirs.save_pretrained(tmp_path / "s")
    ours = read_surrogate_dir(tmp_path / "s")
    assert ours.kind == ("linear" if hidden_dim is None else "mlp") and ours.hidden_dim == hidden_dim
    x = torch.randn(7, 3, 64)
    with torch.no_grad():
        want = theirs(x)
    assert torch.allclose(torch.stack([ours.score(i, x[:, i]) for i in range(3)], 1), want, atol=1e-6)


def model_cfg(**kw):
    base = dict(model_type="qwen3", vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6)
    return ModelConfig.from_hf({**base, **kw})


@pytest.mark.parametrize("dims,message", [
    ((5, 64, 4), "has 5 layers but model Q has 3"),
    ((3, 32, 4), "has 32 input dim but model Q has 64"),
    ((3, 64, 2), "has 2 kv heads but model Q has 4"),
])
def test_mismatch_names_both_sides(tmp_path, dims, message):
    save_surrogate(random_surrogate("linear", *dims), tmp_path / "s")
    with pytest.raises(KvzapError, match=message):
        load_surrogate(str(tmp_path / "s"), model_cfg(), "model Q")


def test_non_finite_weights_are_refused(tmp_path):
    s = random_surrogate("mlp", 3, 64, 4)
    s.w2[1, 0, 0] = float("nan")
    save_surrogate(s, tmp_path / "s")
    with pytest.raises(KvzapError, match="non-finite values in w2"):
        load_surrogate(str(tmp_path / "s"), model_cfg())


def test_broken_files_are_named(tmp_path):
    save_surrogate(random_surrogate("linear", 3, 64, 4), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    (tmp_path / "s" / "config.json").write_text(json.dumps({**cfg, "n_modules": 4}))
    with pytest.raises(KvzapError, match="lacks tensor layers.3.weight"):
        read_surrogate_dir(tmp_path / "s")
    (tmp_path / "s" / "config.json").write_text(json.dumps({**cfg, "input_dim": 32}))
    with pytest.raises(KvzapError, match=r"layers.0.weight has shape \(4, 64\), config implies \(4, 32\)"):
        read_surrogate_dir(tmp_path / "s")
    (tmp_path / "s" / "config.json").write_text("{not json")
    with pytest.raises(KvzapError, match="malformed"):
        read_surrogate_dir(tmp_path / "s")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(KvzapError, match="'nvidia/KVzap-mlp-Qwen3-8B' is neither reachable"):
        load_surrogate("nvidia/KVzap-mlp-Qwen3-8B", model_cfg())


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    save_surrogate(random_surrogate("linear", 3, 64, 4, seed=1), tmp_path / "s")
    before = (tmp_path / "s" / "model.safetensors").read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_surrogate(random_surrogate("linear", 3, 64, 4, seed=2), tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary directory left
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == before  # the old surrogate intact


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_shipped_smollm2_surrogates(smollm2_dir, kind):
    from kvpress.presses.kvzap_press import KVzapModel

    from kvzap_trt.config import build_configs_dir, resolve_config

    path = build_configs_dir() / "surrogates" / f"smollm2-135m-{kind}"
    s = load_surrogate(str(path), ModelConfig.from_dir(smollm2_dir))  # fits SmolLM2: 30 layers, 576, 3 heads
    assert s.kind == kind
    x = torch.randn(5, 30, 576)
    with torch.no_grad():
        want = KVzapModel.from_pretrained(path).eval()(x)
    assert torch.allclose(torch.stack([s.score(i, x[:, i]) for i in range(30)], 1), want, atol=1e-5)
    report = json.loads((path / "report.json").read_text())
    # The embedded default (MLP) meets the training issue's bar of held-out R² >= 0.6; the linear
    # one, shipped beside it for comparison, comes close (the paper's linear ones trail too).
    assert len(report["r2_test"]) == 30 and report["r2_test_mean"] >= (0.6 if kind == "mlp" else 0.55)
    assert all(o["surrogate"] > o["random"] + 0.3 for o in report["oracle_overlap"])
    if kind == "mlp":
        assert resolve_config("smollm2-135m").surrogate == str(path.resolve())
