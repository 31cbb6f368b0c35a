"""Run samples through the engine under one eviction method, batched (continuous batching).

A `Method` says how to evict: the full cache, KVzap (a surrogate and tau), or a baseline object
of baselines.py with its tau and window. `run_method` builds a Runtime over the already loaded
model for it, so every method shares the model, the cache code and the accounting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from tqdm import tqdm

from kvzap_trt.eval.sample import Sample, score
from kvzap_trt.runtime.generate import Runtime


@dataclass
class Method:
    """name: full | kvzap | window | random. surrogate: the object the engine scores with (None:
    nothing is evicted); label: the surrogate's name in reports; matched_to: the KVzap run a
    baseline copies its compression from."""

    name: str
    surrogate: Any
    threshold: float
    window: int
    label: str | None = None
    matched_to: str | None = None

    def key(self) -> str:
        parts = [self.name] + ([self.label] if self.label else [])
        if self.name == "kvzap":
            parts.append(f"tau={self.threshold:g}")
        return " ".join(parts) + (f" ~ {self.matched_to}" if self.matched_to else "")


class Prompter:
    """A runtime's tokenizer: a sample's prompt as (context ids, question ids) and the text of
    output ids. With a chat template the user turn holds context and question and the assistant
    turn starts with the answer prefix; the ids split where the question starts."""

    def __init__(self, rt: Runtime):
        self.tok = rt.tokenizer
        self.chat = self.tok is not None and getattr(self.tok, "chat_template", None) is not None

    def ids(self, s: Sample) -> tuple[list[int], list[int]]:
        whole = s.user_turn + "\n" + s.answer_prefix
        if self.chat:
            whole = self.tok.apply_chat_template([{"role": "user", "content": s.user_turn}], tokenize=False,
                                                 add_generation_prompt=True) + s.answer_prefix
        cut = whole.index(s.question, whole.index(s.context) + len(s.context))
        return [self.tok.encode(part, add_special_tokens=False) for part in (whole[:cut], whole[cut:])]

    def overhead(self) -> int:
        """Tokens a prompt holds besides its context and question: the template, an answer prefix."""
        probe = Sample("", 0, 0, "x", "y", "The special magic number for ancient-anchor mentioned in the provided text is",
                       ["x"], 0)
        return sum(map(len, self.ids(probe))) - 2

    def count(self) -> Callable[[str], int]:
        """Prompt tokens for a context and question: their own tokens plus the overhead."""
        extra = self.overhead()
        return lambda text: len(self.tok.encode(text, add_special_tokens=False)) + extra

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def run_method(rt: Runtime, method: Method, samples: list[Sample],
               ids: Callable[[Sample], tuple[list[int], list[int]]], text: Callable[[list[int]], str],
               batch: int = 8, desc: str = "") -> list[dict]:
    """One record per sample: output, score, prompt tokens and the `kv` report (compression, bytes).

    Samples go through the engine `batch` at a time (one continuous batch each), greedy, with
    eviction in decoding too (kvpress decoding=True). Each request's prompt is its context alone;
    its question ids are then fed one per step as forced "sampled" tokens (over the cache as the
    context's prefill left it, evicting as decoding does), and only the tokens after them are the
    answer (at most the sample's max_new_tokens). Stop tokens end a request only after its question.
    """
    cfg = dataclasses.replace(rt.cfg, threshold=method.threshold, window=method.window, compress_decoding=True,
                              temperature=0.0)
    runtime = Runtime(cfg, rt.loaded, method.surrogate)
    records = []
    with tqdm(total=len(samples), desc=desc or method.key(), unit="sample", leave=False) as bar:
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            prompts = [ids(s) for s in chunk]
            base = runtime.sampling(max_new_tokens=max(len(q) + s.max_new_tokens for s, (_, q) in zip(chunk, prompts)))
            engine, reqs = runtime.start([c for c, _ in prompts], base)
            for r, s, (_, q) in zip(reqs, chunk, prompts):
                r.sampling = dataclasses.replace(base, max_new_tokens=len(q) + s.max_new_tokens)
                r.forced_ids = q  # the question, fed over the compressed context (Request.forced_ids)
            while engine.has_work():
                bar.update(len(engine.step()))
            for s, r, (context, question) in zip(chunk, reqs, prompts):
                answer = r.output_ids[len(question):]
                output = text(answer)
                records.append({"index": s.index, "prompt_tokens": len(context) + len(question), "output": output,
                                "answers": s.answers, "score": score(output, s.answers),
                                "finish_reason": r.finish_reason, "kv": r.kv})
    return records


def summarise(records: list[dict]) -> dict:
    """Means over a group's records: accuracy (%), compression, bytes, prompt tokens."""
    n = len(records)
    mean = lambda f: sum(map(f, records)) / n  # noqa: E731
    return {"samples": n, "accuracy": 100 * mean(lambda r: r["score"]),
            "compression": mean(lambda r: r["kv"]["compression_ratio"]),
            "bytes_allocated": mean(lambda r: r["kv"]["bytes_allocated"]),
            "bytes_dense": mean(lambda r: r["kv"]["bytes_dense"]),
            "prompt_tokens": mean(lambda r: r["prompt_tokens"])}
