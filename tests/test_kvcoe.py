"""KV-CoE embeddings (kvzap_trt/kvcoe): read from the cache itself, equal to the paper's formula on
the K/V a naive model says is held, changed by eviction only through the kept set; the engine's
hook, `kvzap-trt embed` and /v1/embeddings.

Expectations come from the random streams of tests/cache_sim.py and its naive model of KVzap, or
from Hugging Face's own past_key_values, never from the code under test."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import torch

from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.cli import main
from kvzap_trt.config import resolve_config
from kvzap_trt.errors import KvzapError
from kvzap_trt.kvcoe.embedding import KVEmbedding
from kvzap_trt.runtime.generate import Runtime
from tests.cache_sim import make_cache, naive_kept, random_seq, write_chunk


def paper_formula(layers_kv: list[tuple[torch.Tensor, torch.Tensor]], positions=None, flatten=False, normalize=True):
    """The paper's embedding (kv_cat, token mean, head mean, layer mean, L2) written out directly.

    layers_kv: per layer (K, V) [T, H, D]; positions[l][h]: held token indices (None: all)."""
    per_layer = []
    for li, (k, v) in enumerate(layers_kv):
        heads = []
        for h in range(k.shape[1]):
            idx = list(range(k.shape[0])) if positions is None else positions[li][h]
            if idx:
                heads.append(torch.cat([k[idx, h].double().mean(0), v[idx, h].double().mean(0)]))
            elif flatten:
                heads.append(torch.zeros(2 * k.shape[2], dtype=torch.float64))
        per_layer.append(torch.cat(heads) if flatten else torch.stack(heads).mean(0))
    e = torch.stack(per_layer).mean(0)
    return e / e.norm() if normalize else e


# (H, D, W, bs, chunks, tau, dead_head): odd lengths, shorter than the window, window 0 with a head
# that keeps nothing, page sizes 1/4/16, prefill then decode-sized chunks.
CASES = [
    (2, 8, 4, 4, [17], 0.0, None),
    (3, 8, 16, 4, [5], 0.0, None),  # shorter than the window: nothing evicted yet
    (2, 8, 5, 1, [9, 1, 1, 1], 0.3, None),
    (4, 16, 8, 16, [40, 1, 3], -0.2, 1),
    (2, 8, 0, 4, [13], 0.0, 0),  # window 0 and a head holding nothing
]


@pytest.mark.parametrize("H,D,W,bs,chunks,tau,dead", CASES)
@pytest.mark.parametrize("flatten", [False, True])
def test_embedding_equals_the_formula_on_the_naive_kept_set(H, D, W, bs, chunks, tau, dead, flatten):
    cache = make_cache(H=H, D=D, W=W, bs=bs)
    g = torch.Generator().manual_seed(H * 100 + W)
    seqs = [random_seq(cache, sum(chunks), g, dead_head=dead), random_seq(cache, sum(chunks) + 3, g)]
    for n in chunks:
        write_chunk(cache, seqs, [n, n], tau)
    emb = KVEmbedding(last_layers=0, head_agg="flatten" if flatten else "mean")
    for s in seqs:
        kept = naive_kept(s.scores, s.written, W, tau)
        want = paper_formula([(s.k, s.v)], [kept], flatten=flatten)
        got = emb(cache, s.slot)
        assert got.shape == (emb.dim(H, D),) and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_a_changed_kept_entry_changes_it_and_an_evicted_token_leaves():
    H, D, W, bs, tau = 2, 8, 4, 4, 0.0
    cache = make_cache(H=H, D=D, W=W, bs=bs)
    g = torch.Generator().manual_seed(5)
    s = random_seq(cache, 23, g)
    s.scores[3, 0] = 1.0  # position 3 is kept by head 0
    write_chunk(cache, [s], [23], tau)
    emb = KVEmbedding(last_layers=0, normalize=False)
    before = emb(cache, s.slot).clone()
    kept = naive_kept(s.scores, 23, W, tau)
    # A kept entry of head 0 moves by delta: the K half moves by delta / (its count) / H.
    block = int(cache.block_table[0, s.slot, 0, 0])
    delta = torch.arange(D, dtype=torch.float32)
    cache.k_pool[block, 0] += delta
    after = emb(cache, s.slot)
    torch.testing.assert_close(after[:D] - before[:D], delta / len(kept[0]) / H)
    torch.testing.assert_close(after[D:], before[D:])
    cache.k_pool[block, 0] -= delta
    # A pool slot past the head's kept length (not held) changes nothing.
    n0 = int(cache.kept_len[0, s.slot, 0])
    if n0 % bs:
        tail = int(cache.block_table[0, s.slot, 0, n0 // bs])
        cache.k_pool[tail, n0 % bs] += 100.0
        torch.testing.assert_close(emb(cache, s.slot), before)
    # The same stream with position 3 evicted: the embedding is the formula without it.
    other = make_cache(H=H, D=D, W=W, bs=bs)
    s2 = random_seq(other, 23, torch.Generator().manual_seed(5))
    s2.k, s2.v, s2.scores = s.k, s.v, s.scores.clone()
    s2.scores[3, 0] = -1.0
    write_chunk(other, [s2], [23], tau)
    kept2 = naive_kept(s2.scores, 23, W, tau)
    assert kept2[0] == [p for p in kept[0] if p != 3] and kept2[1] == kept[1]
    torch.testing.assert_close(emb(other, s2.slot).double(), paper_formula([(s.k, s.v)], [kept2], normalize=False),
                               atol=1e-6, rtol=1e-5)
    assert not torch.allclose(emb(other, s2.slot), before)


def test_bad_settings_and_an_empty_slot_are_refused():
    with pytest.raises(KvzapError, match="head_agg"):
        KVEmbedding(head_agg="max")
    with pytest.raises(KvzapError, match="last_layers"):
        KVEmbedding(last_layers=-1)
    cache = PagedKVCache(CacheSpec(1, 2, 8, 4, 4, 16, 1, 64))
    with pytest.raises(KvzapError, match="no tokens"):
        KVEmbedding()(cache, cache.add_sequence())


def hf_kv(model_dir, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K after RoPE, V) [T, H, D] from transformers' own forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        pkv = model(torch.tensor([ids]), use_cache=True).past_key_values
    return [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in pkv.layers]


@pytest.fixture(scope="module")
def tiny_rt(tiny_dirs):
    return Runtime.from_config(resolve_config(str(tiny_dirs["llama"]), window=8, block_size=4))


def test_engine_embedding_without_eviction_equals_the_formula_on_hf_kv(tiny_rt, tiny_dirs):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (5, 23, 41)]
    engine, reqs = tiny_rt.start(prompts, tiny_rt.sampling(max_new_tokens=6), embedding=KVEmbedding(last_layers=2))
    engine.run()
    assert engine.cache.allocator.num_used == 0  # recorded before the slots were released
    for p, r in zip(prompts, reqs):
        kv = hf_kv(tiny_dirs["llama"], p)[-2:]
        torch.testing.assert_close(r.prefill_embedding.double(), paper_formula(kv), atol=1e-4, rtol=1e-4)
        # At the end: the cache holds the prompt and every generated token but the last.
        kv = hf_kv(tiny_dirs["llama"], p + r.output_ids[:-1])[-2:]
        torch.testing.assert_close(r.embedding.double(), paper_formula(kv), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(r.embedding, r.prefill_embedding)
    again = tiny_rt.embed(prompts, KVEmbedding(last_layers=2), batch=1)
    for r, a in zip(reqs, again):  # deterministic, whatever the batch
        torch.testing.assert_close(a.embedding, r.prefill_embedding, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a.embedding, b.embedding) for a, b in zip(again, tiny_rt.embed(prompts, KVEmbedding(last_layers=2), batch=1)))


def test_eviction_changes_it_only_through_the_kept_set(tiny_dirs):
    dense = Runtime.from_config(resolve_config(str(tiny_dirs["llama"]), window=8, block_size=4))
    evict = Runtime.from_config(resolve_config(str(tiny_dirs["llama"]), window=8, block_size=4,
                                               surrogate="random:mlp:1", threshold=0.0))
    keep_all = Runtime.from_config(resolve_config(str(tiny_dirs["llama"]), window=8, block_size=4,
                                                  surrogate="random:mlp:1", threshold=-1e9))
    short, long = list(range(3, 10)), list(range(3, 60))  # within the window / past it
    d, e, k = (rt.embed([short, long]) for rt in (dense, evict, keep_all))
    assert torch.equal(e[0].embedding, d[0].embedding)  # nothing left the window: nothing evicted
    assert torch.equal(k[1].embedding, d[1].embedding)  # a tau below every score keeps everything
    assert e[1].kv["compression_ratio"] > 0 and not torch.allclose(e[1].embedding, d[1].embedding, atol=1e-3)


def test_the_hook_off_records_nothing(tiny_rt):
    engine, (r,) = tiny_rt.start([[1, 2, 3]], tiny_rt.sampling(max_new_tokens=2))
    engine.run()
    assert r.embedding is None and r.prefill_embedding is None


# -- kvzap-trt embed and /v1/embeddings on SmolLM2 (the tiny models have no tokenizer) --------------

TEXTS = ["The json module encodes and decodes JSON.", "Sockets", "A heap queue keeps the smallest item first. " * 3]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Runtime.from_config(resolve_config("smollm2-135m", window=8, kv_cache_mb=24, max_seqs=8))


def test_embed_jsonl_keeps_input_order_and_writes_json_lines(smol, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n\n")
    assert main(["embed", "--jsonl", str(src), "--window", "8", "--batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(TEXTS)
    alone = [smol.embed([smol.encode(t)])[0] for t in TEXTS]
    for i, (line, a) in enumerate(zip(lines, alone)):
        obj = json.loads(line)
        assert obj["index"] == i and obj["prompt_tokens"] == len(smol.encode(TEXTS[i]))
        assert len(obj["embedding"]) == 2 * 64
        np.testing.assert_allclose(obj["embedding"], a.embedding.numpy(), atol=1e-5)
    assert json.loads(lines[2])["kv_compression_ratio"] > 0  # window 8: the long text was pruned


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\nnot json\n', "in.jsonl:2: not JSON"),
    ('{"text": ""}\n', 'in.jsonl:1: each line must be an object with a non-empty string "text"'),
    ('["text"]\n', "in.jsonl:1: each line"),
    ("\n", "holds no texts"),
])
def test_embed_bad_jsonl_exits_2_with_one_line(tmp_path, capsys, content, match):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    assert main(["embed", "--jsonl", str(src)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_v1_embeddings_answers_in_the_openai_shape(smol):
    import openai

    from kvzap_trt.serve.engine_loop import EngineLoop
    from kvzap_trt.serve.openai_api import OpenAIServer

    loop = EngineLoop.from_runtime(smol).start()
    server = OpenAIServer(loop, "smollm2-135m").start()
    try:
        alone = smol.embed([smol.encode(t) for t in TEXTS])
        want = [r.embedding.numpy() for r in alone]
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        r = client.embeddings.create(model="smollm2-135m", input=TEXTS)  # the client asks for base64
        assert r.object == "list" and r.model == "smollm2-135m" and [d.index for d in r.data] == [0, 1, 2]
        for d, w in zip(r.data, want):
            assert d.object == "embedding"
            np.testing.assert_allclose(d.embedding, w, atol=1e-5)
        n = sum(len(smol.encode(t)) for t in TEXTS)
        assert r.usage.prompt_tokens == r.usage.total_tokens == n
        ratios = [q.kv["compression_ratio"] for q in alone]
        assert r.usage.model_extra["kv_compression_ratio"] == pytest.approx(sum(ratios) / len(ratios))
        assert r.usage.model_extra["kv_compression_ratio"] > 0  # the texts are longer than the window
        raw = httpx.post(f"{server.url}/embeddings", json={"model": "smollm2-135m", "input": TEXTS[0],
                                                           "encoding_format": "float"}, timeout=120).json()
        assert len(raw["data"]) == 1 and isinstance(raw["data"][0]["embedding"], list)
        np.testing.assert_allclose(raw["data"][0]["embedding"], want[0], atol=1e-5)
        b64 = httpx.post(f"{server.url}/embeddings", json={"model": "smollm2-135m", "input": [smol.encode(TEXTS[1])],
                                                           "encoding_format": "base64"}, timeout=120).json()
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), want[1], atol=1e-5)
        for body, status, param in [({"model": "other", "input": "x"}, 404, "model"),
                                    ({"model": "smollm2-135m", "input": ""}, 400, "input"),
                                    ({"model": "smollm2-135m", "input": []}, 400, "input"),
                                    ({"model": "smollm2-135m", "input": "x", "dimensions": 7}, 400, "dimensions")]:
            resp = httpx.post(f"{server.url}/embeddings", json=body, timeout=60)
            assert resp.status_code == status and resp.json()["error"]["param"] == param, resp.text
        # "evict": false embeds the whole cache: what a runtime without a surrogate gives
        dense = Runtime(smol.cfg, smol.loaded, None).embed([smol.encode(TEXTS[2])])[0]
        whole = httpx.post(f"{server.url}/embeddings", json={"model": "smollm2-135m", "input": TEXTS[2], "evict": False,
                                                             "encoding_format": "float"}, timeout=120).json()
        np.testing.assert_allclose(whole["data"][0]["embedding"], dense.embedding.numpy(), atol=1e-5)
        assert whole["usage"]["kv_compression_ratio"] == 0 and np.abs(dense.embedding.numpy() - want[2]).max() > 1e-3
        assert loop.engine.cache.allocator.num_used == 0
    finally:
        server.stop()
        loop.stop()


def test_retrieval_report_replots_from_its_json(tmp_path):
    """evaluate --replot draws retrieval.png from retrieval.json alone (no model, no corpus),
    written whole (no temporary file left); without --replot the corpus is required."""
    from kvzap_trt.kvcoe import evaluate

    metrics = {m: 0.5 for m in evaluate.METRICS}
    report = {"date": "2026-11-24", "documents": 6, "chance": {"cluster_p_at_1": 0.2, "retrieval_top1": 1 / 3},
              "results": {"hidden (final layer, mean)": {"raw": metrics},
                          "KV last 4 layers, tau 0.5": {"raw": dict(metrics, cluster_map=0.9), "kv_compression_ratio": 0.4}}}
    (tmp_path / "retrieval.json").write_text(json.dumps(report))
    assert evaluate.main(["--replot", "--out", str(tmp_path)]) == 0
    png = (tmp_path / "retrieval.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retrieval.json", "retrieval.png"]
    with pytest.raises(SystemExit):
        evaluate.main(["--out", str(tmp_path)])
