"""The embedded default's real model: SmolLM2-135M keeps exactly what kvpress keeps."""

from __future__ import annotations

import codecs
import this

import pytest

from kvzap_trt.config import RunConfig
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.surrogate import random_surrogate, save_surrogate
from tests.kvpress_reference import kvpress_generate

ZEN = codecs.decode(this.s, "rot13")  # real English text that ships with every Python


@pytest.mark.slow
@pytest.mark.parametrize("kind,window,tau", [("linear", 32, 0.0), ("mlp", 100, 0.1)])
def test_smollm2_same_decisions_and_tokens_as_kvpress(smollm2_dir, tmp_path, kind, window, tau):
    cfg = RunConfig(model=str(smollm2_dir), surrogate=str(tmp_path / "s"), threshold=tau, window=window,
                    max_new_tokens=8).validate()
    save_surrogate(random_surrogate(kind, 30, 576, 3, seed=7), tmp_path / "s")
    rt = Runtime.from_config(cfg)
    prompt = rt.encode(ZEN)
    assert len(prompt) > 100
    ours = rt.generate([prompt], rt.sampling(stop_token_ids=()), positions=True)[0]
    ref_tokens, ref_kept, ref_ratio = kvpress_generate(smollm2_dir, tmp_path / "s", prompt, 8, tau, window, True, kind)
    assert ours.token_ids == ref_tokens
    assert ours.kv["positions"] == ref_kept
    assert ours.kv["compression_ratio"] == pytest.approx(ref_ratio, abs=1e-12)
    assert 0.1 < ours.kv["compression_ratio"] < 0.9
