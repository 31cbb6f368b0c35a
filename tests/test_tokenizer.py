"""The FastTokenizer (tokenizers alone) against transformers' tokenizer of the same directory:
identical ids and text, so skipping transformers' import changes nothing but start-up time."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvzap_trt.models.loading import load_tokenizer
from kvzap_trt.models.tokenizer import FastTokenizer

TEXTS = [
    "The capital of France is",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand  double  spaces",
    "Punctuation , before . marks ! and ? quotes ' and contractions : don't , I'm , it's , we've , they're .",
    "Unicode: café, naïve, Zürich, 東京, emoji 🙂🚀, math ∑ x² ≤ ∞",
    "<|im_start|>user\nhi<|im_end|> special tokens written as text",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "",
]


@pytest.fixture(scope="module")
def pair(smollm2_dir):
    from transformers import AutoTokenizer

    fast = load_tokenizer(smollm2_dir)
    assert isinstance(fast, FastTokenizer)
    return fast, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_equal_transformers(pair, text):
    fast, hf = pair
    for special in (False, True):
        ids = fast.encode(text, add_special_tokens=special)
        assert ids == hf.encode(text, add_special_tokens=special)
        for skip in (False, True):
            assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_long_real_text_and_random_ids_decode_equal(pair):
    fast, hf = pair
    text = (Path(__file__).parents[1] / "README.md").read_text()
    ids = fast.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    rng = random.Random(0)
    special = list(range(20))  # SmolLM2's special and extra tokens sit at the start of the vocabulary
    vocab = len(hf)  # ~30 ms a call in transformers 5: once, not per token (it was 80 s of this test)
    for _ in range(200):
        sample = [rng.choice(special) if rng.random() < 0.2 else rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            assert fast.decode(sample, skip_special_tokens=skip) == hf.decode(sample, skip_special_tokens=skip), sample


def test_eos_and_the_rest_come_from_the_same_tokenizer(pair):
    fast, hf = pair
    assert fast.eos_token_id == hf.eos_token_id
    chat = [{"role": "user", "content": "hi"}]
    assert fast.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
