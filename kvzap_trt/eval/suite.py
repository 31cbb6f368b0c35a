"""The evaluation: the full cache on every task and length, then per surrogate and threshold
KVzap and its baselines matched to it (baselines.py: window-only and random, or those asked), on
the groups (task, length) where the full cache reaches `min_full_accuracy`. Returns the report's
data (report.py writes it)."""

from __future__ import annotations

from typing import Any, Callable

from tqdm import tqdm

from kvzap_trt.errors import KvzapError
from kvzap_trt.eval.baselines import RandomEviction, WindowOnly, leave_rates, matched_window
from kvzap_trt.eval.runner import Method, run_method, summarise
from kvzap_trt.eval.sample import Sample
from kvzap_trt.eval.tasks import make_samples
from kvzap_trt.runtime.generate import Runtime

BASELINES = ("window", "random")


def check_baselines(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The baselines asked for (["none"]: none), or KvzapError naming the unknown one."""
    if list(names) == ["none"]:
        return ()
    for b in names:
        if b not in BASELINES:
            raise KvzapError(f"unknown baseline {b!r}: the baselines are {', '.join(BASELINES)} (or none)")
    return tuple(names)


def baseline(name: str, kvs: list[dict], heads: int, window: int, seed: int, kvzap_key: str) -> Method:
    """The baseline `name` matched to a KVzap run whose requests' `kv` reports are `kvs`: window-only
    at its mean kept tokens per head, or random eviction at its per-head rate."""
    if name == "window":
        return Method("window", WindowOnly(heads), 0.0, matched_window(kvs), matched_to=kvzap_key)
    return Method("random", RandomEviction(leave_rates(kvs, window), seed), 0.0, window, matched_to=kvzap_key)


def evaluate(rt: Runtime, ids: Callable[[Sample], list[int]], text: Callable[[list[int]], str],
             count: Callable[[str], int], tasks: list[str], lengths: list[int], samples: int, seed: int,
             surrogates: dict[str, Any], thresholds: list[float], min_full_accuracy: float = 0.0,
             batch: int = 8, on_group: Callable[[list[dict]], None] | None = None,
             baselines: tuple[str, ...] = BASELINES) -> list[dict[str, Any]]:
    """One entry per (method, task, length): the method's settings, summary and per-sample records.
    on_group(runs so far) is called after each (task, length) group (a partial report). baselines:
    which of BASELINES run beside each KVzap run (each costs what KVzap's run costs)."""
    baselines = check_baselines(baselines)
    runs: list[dict[str, Any]] = []
    window = rt.cfg.window

    def record(method: Method, task: str, length: int, recs: list[dict]) -> None:
        runs.append({"method": method.name, "key": method.key(), "surrogate": method.label,
                     "threshold": method.threshold if method.name == "kvzap" else None, "window": method.window,
                     "matched_to": method.matched_to, "task": task, "length": length, **summarise(recs),
                     "records": recs})
        r = runs[-1]
        tqdm.write(f"{task} @{length} {r['key']}: accuracy {r['accuracy']:.1f}%, compression {r['compression']:.1%}")

    heads = rt.loaded.config.num_kv_heads
    for length in lengths:
        for task in tasks:
            group = make_samples(task, length, samples, seed, count)
            full = Method("full", None, 0.0, window)
            recs = run_method(rt, full, group, ids, text, batch, f"{task} {length} full")
            record(full, task, length, recs)
            if summarise(recs)["accuracy"] < min_full_accuracy:
                if on_group:
                    on_group(runs)
                continue
            for label, surrogate in surrogates.items():
                for tau in thresholds:
                    kvzap = Method("kvzap", surrogate, tau, window, label)
                    recs = run_method(rt, kvzap, group, ids, text, batch, f"{task} {length} {kvzap.key()}")
                    record(kvzap, task, length, recs)
                    kvs = [r["kv"] for r in recs]
                    for base in (baseline(b, kvs, heads, window, seed, kvzap.key()) for b in BASELINES
                                 if b in baselines):
                        record(base, task, length, run_method(rt, base, group, ids, text, batch,
                                                              f"{task} {length} {base.name}"))
            if on_group:
                on_group(runs)
    return runs
