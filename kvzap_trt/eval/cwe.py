"""Common-word extraction (RULER cwe): a shuffled numbered list of words in which `top` common
words appear 3k times each and every other word k times, k = max(1, length // 512) (longer
prompts repeat more rather than run out of words: the lists hold 145 words); the answer is the `top` common words."""

from __future__ import annotations

import random
from typing import Callable

from kvzap_trt.eval.haystack import fit_context
from kvzap_trt.eval.words import ADJECTIVES, NOUNS


def generate(rng: random.Random, length: int, count: Callable[[str], int], top: int = 5
             ) -> tuple[str, str, str, list[str], dict]:
    vocab = rng.sample(NOUNS + ADJECTIVES, len(NOUNS) + len(ADJECTIVES))
    common, rare = vocab[:top], vocab[top:]
    k = max(1, length // 512)
    freq_common, freq_rare = 3 * k, k
    seed = rng.randrange(1 << 30)  # the shuffle's seed: lists of any size are drawn the same way
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.")
    question = f"Question: What are the {top} most common words in the above list?"

    def build(n: int) -> str:
        words = common * freq_common + rare[:n] * freq_rare
        random.Random(seed).shuffle(words)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return f"{intro}\n{listing}"

    prefix = f"Answer: The top {top} words that appear most often in the list are:"
    text = fit_context(build, question, count, length, max_units=len(rare))
    return text, question, prefix, common, {"freq_common": freq_common, "freq_rare": freq_rare}
