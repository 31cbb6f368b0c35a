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
    """A runtime's tokenizer: prompt ids of a sample (chat template around the context when the
    tokenizer has one, then the answer prefix) and the text of output ids."""

    def __init__(self, rt: Runtime):
        self.tok = rt.tokenizer
        self.chat = self.tok is not None and getattr(self.tok, "chat_template", None) is not None

    def ids(self, s: Sample) -> list[int]:
        head = (list(self.tok.apply_chat_template([{"role": "user", "content": s.context}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
                if self.chat else self.tok.encode(s.context + "\n", add_special_tokens=False))
        return head + self.tok.encode(s.answer_prefix, add_special_tokens=False)

    def overhead(self) -> int:
        """Tokens a prompt holds besides its context: the template and about an answer prefix."""
        probe = Sample("", 0, 0, "", "The special magic number for ancient-anchor mentioned in the provided text is",
                       ["x"], 0)
        return len(self.ids(probe))

    def count(self) -> Callable[[str], int]:
        """Prompt tokens for a context: its own tokens plus the overhead."""
        extra = self.overhead()
        return lambda text: len(self.tok.encode(text, add_special_tokens=False)) + extra

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def run_method(rt: Runtime, method: Method, samples: list[Sample], ids: Callable[[Sample], list[int]],
               text: Callable[[list[int]], str], batch: int = 8, desc: str = "") -> list[dict]:
    """One record per sample: output, score, prompt tokens and the `kv` report (compression, bytes).

    Samples go through the engine `batch` at a time (one continuous batch each), greedy, with
    eviction in decoding too (kvpress decoding=True).
    """
    cfg = dataclasses.replace(rt.cfg, threshold=method.threshold, window=method.window, compress_decoding=True,
                              temperature=0.0)
    runtime = Runtime(cfg, rt.loaded, method.surrogate)
    records = []
    with tqdm(total=len(samples), desc=desc or method.key(), unit="sample", leave=False) as bar:
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            by_new: dict[int, list[int]] = {}
            for j, s in enumerate(chunk):
                by_new.setdefault(s.max_new_tokens, []).append(j)
            out: list[Any] = [None] * len(chunk)
            for max_new, idx in by_new.items():
                engine, reqs = runtime.start([ids(chunk[j]) for j in idx], runtime.sampling(max_new_tokens=max_new))
                while engine.has_work():
                    bar.update(len(engine.step()))
                for j, r in zip(idx, reqs):
                    out[j] = runtime.result(r)
            for s, res in zip(chunk, out):
                output = text(res.token_ids)
                records.append({"index": s.index, "prompt_tokens": res.prompt_tokens, "output": output,
                                "answers": s.answers, "score": score(output, s.answers),
                                "finish_reason": res.finish_reason, "kv": res.kv})
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
