"""One evaluation sample and its exact scorer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """context: the document (instructions and haystack); question: asked after it, in the same
    user turn; answer_prefix: what the assistant turn starts with (the model continues it);
    answers: every string a correct output contains.

    The runner prefills the context alone (KVzap evicts in prefill) and feeds the question and the
    answer prefix afterwards over the compressed cache, as kvpress's question-agnostic
    evaluation does: a question inside the prefilled prompt would be read by prefill attention
    over the whole, uncompressed context, and every method would look lossless."""

    task: str
    length: int  # target prompt length in tokens
    index: int
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def user_turn(self) -> str:
        return f"{self.context}\n{self.question}"


def score(output: str, answers: list[str]) -> float:
    """Fraction of `answers` that occur in `output` as whole words, case-insensitively (RULER's
    string_match_all with word boundaries, so that "art" is not found in "party")."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    found = sum(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", output, re.IGNORECASE) is not None for a in answers)
    return found / len(answers)
