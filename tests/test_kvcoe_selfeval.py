"""KV-CoE self-evaluation (kvzap_trt/kvcoe/coe.py, selfeval.py): the score read from the cache
itself, CoE's formulas against a direct computation, the AUROC, and the score on each door
(engine, `generate --json --kv-coe`, the OpenAI front).

References are written out here in plain Python over what the cache should hold: transformers'
own past_key_values (eviction off) or the naive kept sets of tests/cache_sim.py (eviction on)."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch

from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.cli import main
from kvzap_trt.config import resolve_config
from kvzap_trt.errors import KvzapError
from kvzap_trt.kvcoe.coe import FEATURES, coe_features, kv_coe
from kvzap_trt.kvcoe.selfeval import auroc, is_right, roc_curve
from kvzap_trt.ops.dispatch import REFERENCE
from kvzap_trt.runtime.generate import Runtime
from tests.cache_sim import naive_kept
from tests.test_kvcoe import hf_kv


def coe_reference(points: list[list[float]]) -> dict[str, float]:
    """CoE-Mag/Ang/R/C of Wang et al.'s score.py, written out on plain lists (float64)."""
    def sub(a, b):
        return [x - y for x, y in zip(a, b)]

    def norm(a):
        return math.sqrt(sum(x * x for x in a))

    def angle(a, b):
        return math.acos(min(1.0, max(-1.0, sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b)))))

    n = len(points)
    mag = [norm(sub(points[i + 1], points[i])) / norm(sub(points[-1], points[0])) for i in range(n - 1)]
    ang = [angle(points[i + 1], points[i]) / angle(points[-1], points[0]) for i in range(n - 1)]
    x = sum(m * math.cos(a) for m, a in zip(mag, ang)) / len(mag)
    y = sum(m * math.sin(a) for m, a in zip(mag, ang)) / len(mag)
    return {"mag": sum(mag) / len(mag), "ang": sum(ang) / len(ang), "coe_r": sum(mag) / len(mag) - sum(ang) / len(ang),
            "coe_c": math.hypot(x, y)}


def chain(layers_kv, held) -> list[list[float]]:
    """layers_kv: per layer (K, V) [T, H, D]; held[l][h]: positions -> per layer mean_h [K-mean; V-mean]."""
    points = []
    for li, (k, v) in enumerate(layers_kv):
        heads = [torch.cat([k[held[li][h], h].double().mean(0), v[held[li][h], h].double().mean(0)])
                 for h in range(k.shape[1]) if held[li][h]]
        points.append(torch.stack(heads).mean(0).tolist())
    return points


def assert_features(got: dict, want: dict) -> None:
    assert set(got) == set(FEATURES)
    for k in FEATURES:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k


# -- the score on the cache, eviction off: transformers' K/V of the answer's positions --------------

@pytest.fixture(scope="module")
def tiny_rt(tiny_dirs):
    return Runtime.from_config(resolve_config(str(tiny_dirs["llama"]), window=8, block_size=4))


@pytest.mark.parametrize("prompt_len,new", [(5, 3), (23, 16), (41, 1)])  # in the window / answer in kept pages / one token
def test_engine_score_equals_coe_on_hf_kv_of_the_answer(tiny_rt, tiny_dirs, prompt_len, new):
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, 160, (prompt_len,), generator=g).tolist()
    engine, (r,) = tiny_rt.start([prompt], tiny_rt.sampling(max_new_tokens=new))
    r.kv_coe = True
    engine.run()
    kv = hf_kv(tiny_dirs["llama"], prompt + r.output_ids[:-1])  # what the cache holds at finish
    answer = list(range(prompt_len - 1, prompt_len + len(r.output_ids) - 1))
    want = coe_reference(chain(kv, [[answer] * kv[0][0].shape[1]] * len(kv)))
    assert_features(r.kv_coe_features, want)
    assert r.kv_coe_score == r.kv_coe_features["coe_c"]
    # Not the whole sequence's chain: the prompt's positions are left out.
    if prompt_len > 5:
        whole = coe_reference(chain(kv, [[list(range(len(prompt) + len(r.output_ids) - 1))] * kv[0][0].shape[1]] * len(kv)))
        assert abs(whole["coe_c"] - r.kv_coe_score) > 1e-4


def test_not_asked_nothing_is_computed(tiny_rt):
    engine, (r,) = tiny_rt.start([[1, 2, 3]], tiny_rt.sampling(max_new_tokens=2))
    engine.run()
    assert r.kv_coe_score is None and r.kv_coe_features is None
    res = tiny_rt.generate([[1, 2, 3]], tiny_rt.sampling(max_new_tokens=2), kv_coe=True)[0]
    assert set(res.kv_coe) == set(FEATURES) and all(math.isfinite(v) for v in res.kv_coe.values())


def test_a_changed_answer_entry_changes_it_a_prompt_entry_does_not(tiny_dirs):
    rt = Runtime.from_config(resolve_config(str(tiny_dirs["llama"]), window=4, block_size=4))
    prompt = list(range(3, 20))  # 17 tokens
    engine, (r,) = rt.start([prompt], rt.sampling(max_new_tokens=20, stop_token_ids=()))
    for _ in range(12):  # prefill + 11 decodes: positions 16..26 of the answer fed, 0..22 out of the window
        engine.step()
    cache, slot = engine.cache, r.slot
    before = kv_coe(cache, slot, len(prompt))
    # A kept-page entry of layer 1, head 2 at an answer position (>= 16) and one at a prompt position.
    blocks = cache.block_table[1, slot, 2]
    pos = cache.pos_pool[blocks[blocks >= 0].long()].flatten()
    n = int(cache.kept_len[1, slot, 2])
    answer_at, prompt_at = int((pos[:n] >= 16).nonzero()[0]), int((pos[:n] < 15).nonzero()[0])
    for at, changes in ((prompt_at, False), (answer_at, True)):
        b, off = int(blocks[at // 4]), at % 4
        orig = cache.v_pool[b, off].clone()
        cache.v_pool[b, off] += 3.0
        after = kv_coe(cache, slot, len(prompt))
        assert (after != before) == changes, (at, before, after)
        cache.v_pool[b, off] = orig
    assert kv_coe(cache, slot, len(prompt)) == before
    cache.k_pool[int(blocks[answer_at // 4]), answer_at % 4] *= -1.0  # K too
    assert kv_coe(cache, slot, len(prompt)) != before


# -- eviction on: the score over the naive kept set of each head ------------------------------------

def write_layers(L=3, H=2, D=8, W=4, bs=4, T=30, tau=0.0, seed=0, scores=None):
    """A random stream of T tokens written to an L-layer cache in one chunk (KVzap at tau) -> cache,
    slot, per layer (K, V) [T, H, D], per layer the naive kept positions per head."""
    cache = PagedKVCache(CacheSpec(L, H, D, W, bs, 4096, 2, 256))
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(L, T, H, D, generator=g), torch.randn(L, T, H, D, generator=g)
    scores = torch.randn(L, T, H, generator=g) if scores is None else scores
    slot, a = cache.add_sequence(), cache.allocator
    cu, slots, ctx = torch.tensor([0, T], dtype=torch.int32), torch.tensor([slot], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    for li in range(L):
        lc = cache.layer(li)
        REFERENCE.evict_append(k[li], v[li], scores[li], cu, slots, ctx, lc.k_pool, lc.v_pool, lc.pos_pool, lc.score_pool,
                               lc.block_table, lc.kept_len, lc.ring_table, a.free_stack, a.num_free_t, W, tau)
    cache.ctx_len[slot] = T
    return cache, slot, [(k[li], v[li]) for li in range(L)], [naive_kept(scores[li], T, W, tau) for li in range(L)], scores


@pytest.mark.parametrize("W,bs,prompt_len", [(4, 4, 12), (5, 1, 20), (0, 4, 10), (16, 4, 8)])
def test_score_is_coe_over_the_held_answer_positions(W, bs, prompt_len):
    cache, slot, kv, kept, _ = write_layers(W=W, bs=bs)
    held = [[[p for p in ps if p >= prompt_len - 1] for ps in layer] for layer in kept]
    assert any(len(h) < 30 - prompt_len + 1 for layer in held for h in layer)  # eviction took answer positions
    assert_features(kv_coe(cache, slot, prompt_len), coe_reference(chain(kv, held)))


def test_evicting_an_answer_entry_changes_the_score():
    cache, slot, kv, kept, scores = write_layers(seed=3)
    scores = scores.clone()
    scores[1, 20, 0] = 5.0  # position 20 (answer: prompt 12) kept by layer 1, head 0
    c1, s1, _, kept1, _ = write_layers(seed=3, scores=scores)
    scores[1, 20, 0] = -5.0  # ... now evicted
    c2, s2, _, kept2, _ = write_layers(seed=3, scores=scores)
    assert 20 in kept1[1][0] and 20 not in kept2[1][0]
    a, b = kv_coe(c1, s1, 12), kv_coe(c2, s2, 12)
    assert a != b
    for got, ks in ((a, kept1), (b, kept2)):
        assert_features(got, coe_reference(chain(kv, [[[p for p in ps if p >= 11] for ps in layer] for layer in ks])))


def test_a_layer_holding_nothing_of_the_answer_gives_none():
    L, T = 3, 20
    scores = torch.full((L, T, 2), 1.0)
    scores[2, 10:] = -1.0  # layer 2 evicts every answer position; window 0 keeps nothing else
    cache, slot, *_ = write_layers(W=0, T=T, scores=scores)
    assert kv_coe(cache, slot, 11) == dict.fromkeys(FEATURES)
    assert all(v is not None for v in kv_coe(cache, slot, 5).values())  # layer 2 still holds 4..9


def test_bad_input_is_refused():
    cache, slot, *_ = write_layers()
    with pytest.raises(KvzapError, match="prompt_len must be >= 1"):
        kv_coe(cache, slot, 0)
    with pytest.raises(KvzapError, match="fewer than its 31-token prompt"):
        kv_coe(cache, slot, 31)
    with pytest.raises(KvzapError, match=r"needs \[N >= 3, E\] points"):
        coe_features(torch.zeros(2, 4))
    two = PagedKVCache(CacheSpec(2, 2, 8, 4, 4, 64, 1, 64))
    with pytest.raises(KvzapError, match="needs a chain of >= 3 layers, this model has 2"):
        kv_coe(two, two.add_sequence(), 1)


def test_a_two_layer_model_refuses_kv_coe_at_submit(tiny_dirs, tmp_path):
    from tests.tiny_models import build_tiny

    rt = Runtime.from_config(resolve_config(str(build_tiny("llama", tmp_path / "two", num_hidden_layers=2)), window=8))
    engine, _ = rt.start([[1, 2, 3]], rt.sampling(max_new_tokens=2))
    with pytest.raises(KvzapError, match="needs a chain of >= 3 layers"):
        engine.submit([1, 2], rt.sampling(max_new_tokens=2), kv_coe=True)
    with pytest.raises(KvzapError, match="needs a chain of >= 3 layers"):
        rt.start([[1, 2, 3]], kv_coe=True)


# -- AUROC ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scores,labels,want", [
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),  # perfect
    ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),  # reversed
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 3 of 4 pairs ordered
    ([1.0, 2.0, 2.0, 3.0], [0, 0, 1, 1], 0.875),  # one tied pair counts 1/2: (1 + 1 + 0.5 + 1) / 4
])
def test_auroc_known_cases(scores, labels, want):
    s, y = torch.tensor(scores), torch.tensor(labels, dtype=torch.bool)
    assert auroc(s, y) == pytest.approx(want)
    fpr, tpr = roc_curve(s, y)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))  # trapezoids
    assert area == pytest.approx(want)


def test_auroc_refuses_one_class_and_bad_shapes():
    with pytest.raises(KvzapError, match="0 right and 3 wrong"):
        auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False] * 3))
    with pytest.raises(KvzapError, match="must be the same"):
        auroc(torch.tensor([1.0, 2.0]), torch.tensor([True]))


def test_answers_are_checked_on_their_first_integer():
    assert is_right("Bob is 42 years old.", 42) and is_right("42", 42)
    assert not is_right("Bob is 24 years old, not 42.", 42) and not is_right("forty-two", 42)


# -- generate --json --kv-coe ---------------------------------------------------------------------

def test_generate_json_carries_the_score_only_when_asked(tiny_dirs, tmp_path, capsys):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(list(range(3, 30))))
    base = ["generate", "--model", str(tiny_dirs["llama"]), "--window", "8", "--block-size", "4",
            "--prompt-ids-file", str(ids), "--max-new-tokens", "6", "--json"]
    assert main(base + ["--kv-coe"]) == 0
    out = json.loads(capsys.readouterr().out)
    rt = Runtime.from_config(resolve_config(str(tiny_dirs["llama"]), window=8, block_size=4))
    want = rt.generate([list(range(3, 30))], rt.sampling(max_new_tokens=6), kv_coe=True)[0]
    assert out["token_ids"] == want.token_ids
    assert out["kv_coe"] == want.kv_coe and out["kv_coe_score"] == want.kv_coe["coe_c"]
    assert main(base) == 0
    out = json.loads(capsys.readouterr().out)
    assert "kv_coe_score" not in out and "kv_coe" not in out
    assert main(base[:-1] + ["--kv-coe"]) == 2
    err = capsys.readouterr().err
    assert "--kv-coe needs --json" in err and err.count("\n") == 1


# -- the OpenAI front (SmolLM2: the tiny models have no tokenizer) ----------------------------------

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def served(smollm2_dir):
    from kvzap_trt.serve.engine_loop import EngineLoop
    from kvzap_trt.serve.openai_api import OpenAIServer

    rt = Runtime.from_config(resolve_config(MODEL, window=8, kv_cache_mb=24, max_seqs=8))
    loop = EngineLoop.from_runtime(rt).start()
    server = OpenAIServer(loop, MODEL).start()
    yield rt, loop, server
    server.stop()
    loop.stop()


def test_openai_choices_carry_kv_coe_score_when_asked(served):
    import openai

    rt, loop, server = served
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    q = "Alice is 31 years old. Bob is 45 years old. How old is Bob?"
    ids = list(rt.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False))
    want = rt.generate([ids], rt.sampling(max_new_tokens=8, temperature=0.0), kv_coe=True)[0]
    msgs = [{"role": "user", "content": q}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, extra_body={"kv_coe": True})
    assert r.choices[0].message.content == want.text
    assert r.choices[0].kv_coe_score == pytest.approx(want.kv_coe["coe_c"], rel=1e-5)
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert "kv_coe_score" not in (plain.choices[0].model_extra or {})
    c = client.completions.create(model=MODEL, prompt=q, max_tokens=5, temperature=0, extra_body={"kv_coe": True})
    assert isinstance(c.choices[0].kv_coe_score, float) and math.isfinite(c.choices[0].kv_coe_score)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                                 extra_body={"kv_coe": True}))
    last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
    assert last.choices[0].kv_coe_score == pytest.approx(r.choices[0].kv_coe_score, rel=1e-5)
    assert all("kv_coe_score" not in (ch.choices[0].model_extra or {}) for ch in chunks if ch.choices and ch is not last)
    resp = httpx.post(f"{server.url}/chat/completions", json={"model": MODEL, "messages": msgs, "kv_coe": "yes"}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "kv_coe", resp.text


def test_within_level_auroc_compares_only_questions_of_one_level():
    from kvzap_trt.kvcoe.selfeval import summarise

    rows = [{"s": s, "right": y} for s, y in ((0.0, False), (1.0, True), (10.0, False), (11.0, True), (5.0, None))]
    rows[-1]["s"], rows[-1]["right"] = None, True  # undefined: left out, counted
    a = summarise(rows, [1, 1, 2, 2, 2], "s", n_boot=50, seed=0)
    assert a["within_level_auroc"] == 1.0 and a["auroc"] == 0.75  # across levels: 1 < 10 is one misordered pair
    assert (a["right"], a["wrong"], a["undefined"]) == (2, 2, 1)
