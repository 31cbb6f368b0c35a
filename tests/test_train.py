"""Surrogate training: the dataset builder and fits recover a planted score function; bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kvzap_trt.cli import main
from kvzap_trt.models.loading import load_model
from kvzap_trt.oracle.kvzip import causal_attend_recording
from kvzap_trt.train.dataset import Dataset, build_dataset, read_corpus, select_texts
from kvzap_trt.train.fit import train_surrogate
from tests.tiny_models import build_tiny

TEXT = ("The standard library of Python is very extensive, offering a wide range of facilities. It contains "
        "built-in modules that provide access to system functionality such as file I/O, as well as modules "
        "written in Python that provide standardized solutions for many problems of everyday programming. ")


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, smollm2_dir):
    """A tiny random Llama that uses SmolLM2's tokenizer (so the builder runs unchanged)."""
    d = build_tiny("llama", tmp_path_factory.mktemp("tiny-tok") / "m", vocab_size=49152)
    for f in list(smollm2_dir.glob("tokenizer*")) + list(smollm2_dir.glob("chat_template*")):
        shutil.copy2(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        (d / f"t{i:02d}.txt").write_text(" ".join(TEXT.split()[i % 7 :]) + TEXT * (1 + i % 3))
    (d / "short.txt").write_text("too short")
    return d


def planted_scorer(w: torch.Tensor, b: torch.Tensor):
    """log score = w[l] h + b[l], exactly: the function the fit must find."""

    def scorer(model, tokenizer, ids, hidden):
        model(torch.tensor(ids), torch.arange(len(ids)), causal_attend_recording({}, hidden),
              logits_at=torch.tensor([len(ids) - 1]))
        return torch.stack([(w[l] @ hidden[l].T.float() + b[l][:, None]).exp() for l in range(len(w))])

    return scorer


def planted_dataset(model_dir, corpus, out) -> tuple:
    """A dataset of `corpus` whose log-scores are a random linear function of the hidden states
    (planted_scorer) -> (the loaded model, the dataset)."""
    loaded = load_model(model_dir)
    m = loaded.config
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m.num_layers, m.num_kv_heads, m.hidden_size, generator=g) * 0.3
    b = torch.randn(m.num_layers, m.num_kv_heads, generator=g)
    return loaded, build_dataset(loaded, read_corpus(corpus), out, n_tokens=48, min_tokens=32, max_tokens=96,
                                 scorer=planted_scorer(w, b))


@pytest.mark.slow
def test_fits_recover_a_planted_score_function(tiny_with_tokenizer, corpus, tmp_path):
    loaded, ds = planted_dataset(tiny_with_tokenizer, corpus, tmp_path / "ds")
    m = loaded.config
    assert ds.meta["count"]["test"] > 0 and ds.meta["count"]["train"] > 10 * m.hidden_size
    assert "short.txt" not in [t["file"] for t in ds.meta["texts"]]
    x, y = ds.layer("train", 1)
    assert x.shape[1] == m.hidden_size and y.shape[1] == m.num_kv_heads and len(x) == len(y)

    linear, fit = train_surrogate(ds, "linear", l2=1e-6)
    r2 = held_out_r2(linear, ds)
    assert r2.min() > 0.99
    assert fit["r2_test"] == pytest.approx(r2.mean(1).tolist(), abs=1e-4)  # the report tells the truth
    # The function, not the weights: this corpus repeats itself, so the features are rank-deficient.
    xt, yt = ds.layer("test", 2)
    pred = linear.score(2, torch.from_numpy(np.asarray(xt, dtype=np.float32)))
    assert (pred - torch.from_numpy(np.asarray(yt, dtype=np.float32))).abs().max() < 0.05
    mlp, fit = train_surrogate(ds, "mlp", epochs=40)
    assert mlp.kind == "mlp" and mlp.hidden_dim == m.hidden_size // 8
    r2 = held_out_r2(mlp, ds)
    assert r2.min() > 0.95
    assert fit["r2_test"] == pytest.approx(r2.mean(1).tolist(), abs=1e-4)


def held_out_r2(s, ds) -> np.ndarray:
    """[layers, kv heads] R2 of the surrogate on the test split, recomputed in float64."""
    out = []
    for layer in range(ds.meta["num_layers"]):
        x, y = (np.asarray(a, dtype=np.float64) for a in ds.layer("test", layer))
        pred = s.score(layer, torch.from_numpy(x).float()).double().numpy()
        out.append(1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0))
    return np.array(out)


def test_train_refuses_bad_input_and_leaves_nothing(tmp_path, capsys, smollm2_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("a few words")
    cases = [
        (["--corpus", str(tmp_path / "missing")], "is not a directory"),
        (["--corpus", str(empty)], "has no .txt files"),
        (["--corpus", str(short), "--dataset", str(tmp_path / "ds")], "no text of the corpus has 128 tokens"),
        (["--corpus", str(short), "--n-tokens", "0"], "--n-tokens must be >= 1"),
        (["--corpus", str(short), "--max-texts", "0"], "--max-texts must be >= 1"),
    ]
    for extra, message in cases:
        code = main(["train", "--kind", "linear", "--out", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (extra, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ds").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "short"]


def test_max_texts_draws_a_seeded_subset_of_the_long_enough_texts_in_corpus_order(tiny_with_tokenizer, corpus):
    tok = load_model(tiny_with_tokenizer).tokenizer
    texts = read_corpus(corpus)
    every = select_texts(tok, texts, 32, 64)
    assert "short.txt" not in dict(every) and len(every) == 24
    a, b, c = (select_texts(tok, texts, 32, 64, max_texts=10, seed=s) for s in (0, 0, 1))
    assert len(a) == 10 and a == b and a != c
    order = [name for name, _ in every]
    for chosen in (a, c):
        assert set(chosen) <= set(every)
        names = [name for name, _ in chosen]
        assert names == sorted(names, key=order.index)
    assert select_texts(tok, texts, 32, 64, max_texts=100) == every


@pytest.mark.slow
def test_calibrated_tau_gives_the_reported_compression_in_the_real_cache(tiny_with_tokenizer, corpus, tmp_path,
                                                                         monkeypatch, capsys):
    import json

    from kvzap_trt.config import resolve_config
    from kvzap_trt.runtime.generate import Runtime

    # a preset of our own, so that --write-preset has a file to update
    (tmp_path / "tiny.yaml").write_text(f"# tiny\nmodel: {tiny_with_tokenizer}\nsurrogate: random:linear:5\n"
                                        "threshold: -9.0\nwindow: 16\n")
    monkeypatch.setenv("KVZAP_TRT_BUILD_CONFIGS", str(tmp_path))
    assert main(["calibrate", "--model", "tiny", "--corpus", str(corpus), "--target", "0.4", "--max-tokens", "96",
                 "--min-tokens", "32", "--write-preset", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compression_mean"] == pytest.approx(0.4, abs=0.01)
    assert result["compression_min"] <= result["compression_mean"] <= result["compression_max"]
    cfg = resolve_config("tiny", max_new_tokens=0)
    assert cfg.threshold == pytest.approx(result["threshold"], abs=1e-4) and "# tiny" in (tmp_path / "tiny.yaml").read_text()
    assert main(["calibrate", "--model", "tiny", "--corpus", str(corpus), "--target", "0.4", "--max-tokens", "96",
                 "--min-tokens", "32", "--max-texts", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == 5

    rt = Runtime.from_config(cfg)
    from kvzap_trt.oracle.kvzip import context_ids

    texts = [rt.decode(ids[:96]) for ids in (rt.encode(t.strip()) for _, t in read_corpus(corpus)) if len(ids) >= 32]
    assert result["prompts"] == len(texts) < len(read_corpus(corpus))  # the short text is skipped
    kvs = [rt.generate([context_ids(rt.tokenizer, t)[0]], positions=True)[0].kv for t in texts]
    got = [kv["compression_ratio"] for kv in kvs]
    assert sum(got) / len(got) == pytest.approx(result["compression_mean"], abs=2e-3)
    assert max(got) == pytest.approx(result["compression_max"], abs=2e-3)
    # The share of the positions older than the window that the real cache dropped, per prompt.
    past = []
    for kv in kvs:
        old = kv["tokens"] - 16
        held = sum(p < old for layer in kv["positions"] for head in layer for p in head)
        past.append(1 - held / (old * len(kv["positions"]) * len(kv["positions"][0])))
    assert result["evicted_past_window_mean"] == pytest.approx(sum(past) / len(past), abs=2e-3)
    assert result["evicted_past_window_mean"] > result["compression_mean"]  # the window is not counted

    assert main(["calibrate", "--model", "tiny", "--corpus", str(corpus), "--target", "0.99"]) == 2
    assert "is reachable" in capsys.readouterr().err


@pytest.mark.slow
def test_train_with_the_kvzap_data_oracle(tiny_with_tokenizer, corpus, tmp_path):
    """`train --oracle kvzap-data`: the dataset records its oracle, its targets are the log of
    that oracle's scores at the sampled positions (not KVzipPress's), and a surrogate is written."""
    from kvzap_trt.oracle.kvzip import context_ids, kvzip_plus_scores
    from kvzap_trt.oracle.repeat_once import repeat_once_scores

    ds_dir = tmp_path / "ds"
    args = ["train", "--model", str(tiny_with_tokenizer), "--corpus", str(corpus), "--kind", "linear", "--out",
            str(tmp_path / "s"), "--dataset", str(ds_dir), "--n-tokens", "400", "--min-tokens", "32",
            "--max-tokens", "64", "--oracle", "kvzap-data"]
    assert main(args) == 0
    ds = Dataset.open(ds_dir)
    assert ds.meta["oracle"] == "kvzap-data" and (tmp_path / "s" / "config.json").is_file()
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["options"]["oracle"] == "kvzap-data"
    # The first text is held out: with n-tokens above its length every position is sampled.
    loaded = load_model(tiny_with_tokenizer)
    first = ds.meta["texts"][0]
    text = dict(select_texts(loaded.tokenizer, read_corpus(corpus), 32, 64))[first["file"]]
    ids, prefix_len = context_ids(loaded.tokenizer, text)
    _, y = ds.layer("test", 0)
    n = len(ids) - prefix_len
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # the builder's draw for its first text
    want = repeat_once_scores(loaded.model, loaded.tokenizer, ids)[0, :, prefix_len:].log().T[order]  # [n, Hkv]
    got = torch.from_numpy(np.asarray(y[:n], dtype=np.float32))
    assert torch.allclose(got, want, atol=2e-2)  # float16's precision
    press = kvzip_plus_scores(loaded.model, loaded.tokenizer, ids)[0, :, prefix_len:].log().T[order]
    assert not torch.allclose(got, press, atol=2e-2)
