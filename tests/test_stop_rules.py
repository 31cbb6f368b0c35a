"""Where generation ends: several stop token ids (Llama-3 has three EOS ids), a stop id on the
last allowed token, several text stop words (the text before the first hit of any of them)."""

from __future__ import annotations

import pytest
import torch

from kvzap_trt.config import RunConfig
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.serve.engine_loop import cut_at_stop_word
from tests.tiny_models import build_tiny


def tiny_runtime(model_dir) -> Runtime:
    cfg = RunConfig(model=str(model_dir), surrogate="random:mlp:3", threshold=0.0, window=16, max_new_tokens=12,
                    block_size=8).validate()
    return Runtime.from_config(cfg)


@pytest.fixture(scope="module")
def runtime(tiny_dirs):
    return tiny_runtime(tiny_dirs["llama"])


PROMPT = torch.randint(0, 160, (30,), generator=torch.Generator().manual_seed(11)).tolist()


@pytest.fixture(scope="module")
def greedy(runtime):
    """The 12 greedy tokens with no stop id, and the index of the first token that appears once
    before it ends (the stop token of these tests), at least 3 tokens in."""
    ids = runtime.generate([PROMPT], runtime.sampling(stop_token_ids=()))[0].token_ids
    i = next(i for i in range(3, len(ids) - 1) if ids.index(ids[i]) == i)
    return ids, i


def unused(ids: list[int], n: int) -> list[int]:
    return [t for t in range(160) if t not in ids][:n]


@pytest.mark.parametrize("where", [0, 1, 2])
def test_any_of_several_stop_ids_ends_generation(runtime, greedy, where):
    ids, i = greedy
    stop = unused(ids, 2)
    stop.insert(where, ids[i])
    got = runtime.generate([PROMPT], runtime.sampling(stop_token_ids=tuple(stop)))[0]
    assert got.token_ids == ids[: i + 1]  # the stop token is part of the output, nothing after it
    assert got.finish_reason == "stop"


def test_three_eos_ids_in_the_model_config_all_stop(greedy, tmp_path):
    """A Llama-3-style config lists several `eos_token_id`s; the one the model emits is listed last."""
    ids, i = greedy
    eos = unused(ids, 2) + [ids[i]]
    model_dir = build_tiny("llama", tmp_path / "llama3", eos_token_id=eos)  # same seed, same weights
    rt = tiny_runtime(model_dir)
    assert rt.generate([PROMPT], rt.sampling(stop_token_ids=()))[0].token_ids == ids
    got = rt.generate([PROMPT])[0]  # the config's stop ids
    assert got.token_ids == ids[: i + 1] and got.finish_reason == "stop"


def test_stop_id_on_the_last_allowed_token(runtime, greedy):
    ids, i = greedy
    last = runtime.generate([PROMPT], runtime.sampling(max_new_tokens=i + 1, stop_token_ids=(ids[i],)))[0]
    assert last.token_ids == ids[: i + 1] and last.finish_reason == "stop"  # stop wins over length
    one_short = runtime.generate([PROMPT], runtime.sampling(max_new_tokens=i, stop_token_ids=(ids[i],)))[0]
    assert one_short.token_ids == ids[:i] and one_short.finish_reason == "length"


# text, stop words, the text returned (written by hand), whether a stop word occurred
STOP_WORD_CASES = [
    ("Apples, pears. Plums; figs.", [";", "."], "Apples, pears", True),   # the earlier hit wins, not the first listed
    ("Apples, pears. Plums; figs.", [".", ";"], "Apples, pears", True),
    ("one. two. three.", ["."], "one", True),                             # first occurrence, not the last
    ("one. two. three.", ["three", "two"], "one. ", True),
    ("Q: hi\nA: hello\nQ: bye", ["\nQ:", "zzz"], "Q: hi\nA: hello", True),
    ("stop here", ["stop"], "", True),
    ("nothing to cut", ["zzz", "yyy"], "nothing to cut", False),
    ("nothing to cut", [], "nothing to cut", False),
]


@pytest.mark.parametrize("text,words,want,hit", STOP_WORD_CASES)
def test_stop_words_cut_at_the_first_hit_of_any(text, words, want, hit):
    assert cut_at_stop_word(text, words) == (want, hit)


def test_forced_ids_are_fed_first_and_their_stop_tokens_do_not_end(runtime, greedy):
    """Request.forced_ids (teacher forcing, as `kvzap-trt eval` asks its question): the first
    outputs are the forced ids even where the model would say otherwise, a stop id among them
    does not end the request, and after them generation is the model's own, which equals a run
    with prompt + forced ids as the prompt when nothing is evicted (window 64 > every length)."""
    ids, i = greedy
    stop = ids[i]
    forced = unused(ids, 2) + [stop]  # tokens the greedy run never makes, then a stop id
    cfg = RunConfig(model=str(runtime.cfg.model), surrogate=None, window=64, max_new_tokens=12, block_size=8).validate()
    rt = Runtime(cfg, runtime.loaded, None)
    engine, (r,) = rt.start([PROMPT], rt.sampling(stop_token_ids=(stop,)))
    r.forced_ids = forced
    engine.run()
    assert r.output_ids[:3] == forced and len(r.output_ids) > 3
    whole = rt.generate([PROMPT + forced], rt.sampling(stop_token_ids=(stop,), max_new_tokens=12 - 3))[0]
    assert r.output_ids[3:] == whole.token_ids
    assert r.finish_reason == whole.finish_reason
