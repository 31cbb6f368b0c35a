"""Fast/slow switching measured: generated tokens against accuracy, with a probe trained here.

    OMP_NUM_THREADS=1 .venv/bin/python -m kvzap_trt.kvcoe.fastslow --out docs/kvcoe

A local task with checkable answers (`questions`): capitals, opposites and sums (a short answer
suffices when the model gets them at all), counting from 1 to n and naming the members of a fixed
list (the answer needs more tokens the longer the list). Each question runs once, greedy, in
SmolLM2's chat template, with the long budget (`--long`); with greedy decoding the short budget's
(`--short`) answer is the long one's first tokens (the same forward computes them; eviction
during decoding included), so one run gives both. Labels, as the paper's
(prep_kv_classfier_training_data.py): slow when the short answer is wrong, fast otherwise.

A random `--test-frac` of the questions is held out. The probe (probe.py, the paper's MLP; and
logistic regression) is trained on the others' prefill KV embeddings; then on the held-out ones:
- always long, always short;
- probe auto: the engine with `reasoning="auto"` (the probe and a fast budget of `--short`),
  actually run; its answers are checked against the long run's prefixes (`auto_matches_prefix`);
- logistic auto: the same decision rule with the logistic probe, from the long run's prefixes;
- oracle: fast when the short answer is right or the long one is wrong too (fewest tokens at the
  best accuracy of the two);
- random at auto's fast share: the expected figures of a coin with auto's fast rate.
For each eviction setting: off, and the preset's surrogate and tau (with `--evict-window`: these
sequences are shorter than the preset's 128-token window, inside which nothing is ever evicted).

Writes OUT/fastslow.json (date, command, machine, config, per-question rows), fastslow_table.md
and fastslow.png (tokens vs accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kvzap_trt import bench
from kvzap_trt.atomic import atomic_write_text
from kvzap_trt.config import resolve_config
from kvzap_trt.kvcoe.probe import ProbeConfig, model_shape
from kvzap_trt.kvcoe.probe_train import accuracy, embed_prompts, fit
from kvzap_trt.runtime.generate import Runtime

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Canada": "Ottawa",
            "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
            "Poland": "Warsaw", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok",
            "England": "London", "Belgium": "Brussels", "Finland": "Helsinki", "Hungary": "Budapest"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "happy": "sad", "fast": "slow",
             "light": "dark", "wet": "dry", "open": "close", "early": "late", "full": "empty", "hard": "soft",
             "rich": "poor", "strong": "weak", "win": "lose", "push": "pull", "left": "right", "top": "bottom"}
LISTS = {
    "months of the year": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
                           "October", "November", "December"],
    "days of the week": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "planets of the solar system": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "colors of the rainbow": ["red", "orange", "yellow", "green", "blue", "indigo", "violet"],
    "four seasons": ["spring", "summer", "autumn", "winter"],
    "continents": ["Africa", "Antarctica", "Asia", "Europe", "America", "Australia"],
}
LIST_ASKS = ["List the {}.", "Name the {}.", "What are the {}?", "Write the {} in order."]


@dataclass
class Question:
    qid: int
    category: str
    text: str
    check: Callable[[str], bool]


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _counts_to(n: int) -> Callable[[str], bool]:
    def check(text: str) -> bool:  # 1..n appear in order (other numbers may come between)
        want = iter(range(1, n + 1))
        nxt = next(want)
        for x in _ints(text):
            if x == nxt:
                nxt = next(want, None)
                if nxt is None:
                    return True
        return False
    return check


def questions(seed: int) -> list[Question]:
    """The task, in a seeded order: capitals, opposites, sums, counts to 3..14, lists."""
    rng = random.Random(seed)
    qs: list[tuple[str, str, Callable[[str], bool]]] = []
    for country, city in CAPITALS.items():
        qs.append(("capital", f"What is the capital of {country}?", lambda t, c=city: c.lower() in t.lower()))
    for word, opp in OPPOSITES.items():
        qs.append(("opposite", f"What is the opposite of '{word}'?", lambda t, o=opp: o in t.lower()))
    for _ in range(30):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        qs.append(("sum", f"What is {a} + {b}?", lambda t, s=a + b: s in _ints(t)))
    for n in range(3, 15):
        for ask in ("Count from 1 to {}.", "Write the numbers from 1 to {}.", "Count to {}."):
            qs.append(("count", ask.format(n), _counts_to(n)))
    for name, items in LISTS.items():
        for ask in LIST_ASKS:
            qs.append(("list", ask.format(name), lambda t, it=items: all(x.lower() in t.lower() for x in it)))
    rng.shuffle(qs)
    return [Question(i, c, t, f) for i, (c, t, f) in enumerate(qs)]


def run_setting(rt: Runtime, qs: list[Question], train: list[int], test: list[int], short: int, long: int,
                batch: int, seed: int, epochs: int, tmp: Path, name: str, resplits: int = 10) -> dict:
    """One eviction setting: the long run, labels, probes, the auto run, the policies' figures."""
    t0 = time.perf_counter()
    ids = [rt.encode(q.text, chat=True) for q in qs]
    rows, short_texts = [], []
    for i in range(0, len(qs), batch):
        for q, p, r in zip(qs[i:i + batch], ids[i:i + batch],
                           rt.generate(ids[i:i + batch], rt.sampling(max_new_tokens=long))):
            short_ids = r.token_ids[:short]
            short_texts.append(rt.decode(short_ids))
            rows.append({"qid": q.qid, "category": q.category, "question": q.text, "prompt_tokens": len(p),
                         "long_tokens": len(r.token_ids), "long_correct": q.check(r.text),
                         "short_tokens": len(short_ids), "short_correct": q.check(short_texts[-1]),
                         "long_text": r.text, "kv_compression_ratio": r.kv["compression_ratio"]})
        print(f"[{name}] long run: {min(i + batch, len(qs))}/{len(qs)} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    for r in rows:
        r["label"] = "fast" if r["short_correct"] else "slow"
        r["split"] = "train"
    for i in test:
        rows[i]["split"] = "test"
    base = ProbeConfig(model="smollm2-135m", shape=model_shape(rt.loaded.config), prompt_format="chat",
                       eviction={"surrogate": rt.cfg.surrogate, "threshold": rt.cfg.threshold if rt.surrogate else None,
                                 "window": rt.cfg.window})
    x = embed_prompts(rt, ids, base, batch)
    y = torch.tensor([int(r["label"] == "slow") for r in rows])
    probes = {}
    for tag, hidden in (("mlp", 512), ("logistic", 0)):
        probe = fit(dataclasses.replace(base, hidden=hidden), x[train], y[train], epochs=epochs, seed=seed)
        probe.cfg.training = {"train": len(train), "train_accuracy": accuracy(probe, x[train], y[train]),
                              "held_out_accuracy": accuracy(probe, x[test], y[test])}
        probes[tag] = probe
        p = probe.p_slow(x)
        for r, pi in zip(rows, p.tolist()):
            r[f"{tag}_p_slow"] = round(pi, 4)
    # The split's noise: both probes refitted on `resplits` other random splits of the same size.
    again: dict[str, list[float]] = {"mlp": [], "logistic": [], "majority": []}
    for k in range(resplits):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(1000 + k)).tolist()
        va, tr = order[:len(test)], order[len(test):]
        for tag, hidden in (("mlp", 512), ("logistic", 0)):
            p = fit(dataclasses.replace(base, hidden=hidden), x[tr], y[tr], epochs=epochs, seed=seed)
            again[tag].append(accuracy(p, x[va], y[va]))
        again["majority"].append(float((y[va] == int(y[tr].float().mean() >= 0.5)).float().mean()))
    # The engine's own auto run on the held-out questions, with the MLP probe.
    probe_path = probes["mlp"].save(tmp / f"probe-{name}.safetensors")
    auto_rt = Runtime(dataclasses.replace(rt.cfg, probe=str(probe_path), fast_max_new_tokens=short),
                      rt.loaded, rt.surrogate)
    test_ids = [ids[i] for i in test]
    for i in range(0, len(test), batch):
        res = auto_rt.generate(test_ids[i:i + batch], auto_rt.sampling(max_new_tokens=long), reasoning="auto")
        for qi, r in zip(test[i:i + batch], res):
            row, q = rows[qi], qs[qi]
            row.update({"auto_choice": r.reasoning, "auto_tokens": len(r.token_ids), "auto_correct": q.check(r.text),
                        "auto_p_slow": round(r.reasoning_p_slow, 4)})
            # Greedy: the engine's fast answer is the long answer's first `short` tokens, its slow one the long answer.
            row["auto_matches_prefix"] = r.text == (short_texts[qi] if r.reasoning == "fast" else row["long_text"])
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return {"rows": rows, "policies": policies([rows[i] for i in test]),
            "probes": {k: p.cfg.training for k, p in probes.items()},
            "resplit_held_out_accuracy": again,
            "label_slow_share": {"train": float(y[train].float().mean()), "test": float(y[test].float().mean())},
            "seconds": round(time.perf_counter() - t0, 1)}


def policies(test_rows: list[dict]) -> dict[str, dict]:
    """Mean generated tokens and accuracy of each policy over the held-out rows."""
    def pick(r: dict, fast: bool) -> tuple[int, bool]:
        return (r["short_tokens"], r["short_correct"]) if fast else (r["long_tokens"], r["long_correct"])

    choices: dict[str, Callable[[dict], tuple[int, bool]]] = {
        "always long": lambda r: pick(r, False),
        "always short": lambda r: pick(r, True),
        "probe auto (MLP, engine run)": lambda r: (r["auto_tokens"], r["auto_correct"]),
        "probe auto (logistic, from the long run)": lambda r: pick(r, r["logistic_p_slow"] < 0.5),
        "oracle": lambda r: pick(r, r["short_correct"] or not r["long_correct"]),
    }
    n = len(test_rows)
    out = {}
    for name, f in choices.items():
        got = [f(r) for r in test_rows]
        out[name] = {"tokens": sum(t for t, _ in got) / n, "accuracy": sum(c for _, c in got) / n}
    fast_share = sum(r["auto_choice"] == "fast" for r in test_rows) / n
    out["probe auto (MLP, engine run)"]["fast_share"] = fast_share
    out["random at auto's fast share (expected)"] = {
        k: fast_share * out["always short"][k] + (1 - fast_share) * out["always long"][k] for k in ("tokens", "accuracy")}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = dict(zip(next(iter(results.values()))["policies"], "osD^*x"))
    for (setting, res), color in zip(results.items(), ("tab:blue", "tab:orange")):
        for name, p in res["policies"].items():
            ax.scatter(p["tokens"], p["accuracy"], marker=markers[name], color=color, s=60,
                       label=f"{name} ({setting})")
    ax.set_xlabel("generated tokens per question (held-out mean)")
    ax.set_ylabel("accuracy (held-out)")
    ax.set_title("Fast/slow budget switching, SmolLM2-135M-Instruct")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    bench.save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--short", type=int, default=16, help="fast budget (default 16 tokens)")
    ap.add_argument("--long", type=int, default=64, help="slow budget (default 64 tokens)")
    ap.add_argument("--test-frac", type=float, default=0.4)
    ap.add_argument("--evict-window", type=int, default=16, help="window of the eviction-on setting (default 16)")
    ap.add_argument("--no-evict", action="store_true", help="only the eviction-off setting")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N questions (0: all)")
    ap.add_argument("--resplits", type=int, default=10, help="other random splits the probes are refitted on (default 10)")
    ap.add_argument("--out", type=Path, default=Path("docs/kvcoe"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    qs = questions(args.seed)
    if args.limit:
        qs = qs[:args.limit]
    order = list(range(len(qs)))
    random.Random(args.seed + 1).shuffle(order)
    k = round(len(qs) * args.test_frac)
    test, train = sorted(order[:k]), sorted(order[k:])
    cfg = resolve_config(args.model)
    rt_tau = Runtime.from_config(dataclasses.replace(cfg, window=args.evict_window))
    settings = {"eviction off": Runtime(dataclasses.replace(cfg, surrogate=None), rt_tau.loaded, None)}
    if not args.no_evict:
        settings[f"tau {cfg.threshold}, window {args.evict_window}"] = rt_tau
    results = {}
    with tempfile.TemporaryDirectory(prefix="kvzap-fastslow-") as tmp:
        for name, rt in settings.items():
            results[name] = run_setting(rt, qs, train, test, args.short, args.long, args.batch, args.seed,
                                        args.epochs, Path(tmp), name.split(",")[0].replace(" ", "-"), args.resplits)
    report = {
        **bench.report_head(bench.module_command("kvzap_trt.kvcoe.fastslow", argv), {**cfg.to_dict(), **bench.options(args)},
                            cfg.device),
        "questions": len(qs), "train": len(train), "test": len(test),
        "categories": {c: sum(q.category == c for q in qs) for c in sorted({q.category for q in qs})},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "fastslow.json", json.dumps(report, indent=1) + "\n")
    lines = ["| eviction | policy | tokens / question | accuracy | fast share |", "|---|---|---|---|---|"]
    for setting, res in results.items():
        for name, p in res["policies"].items():
            share = f"{p['fast_share']:.0%}" if "fast_share" in p else ""
            lines.append(f"| {setting} | {name} | {p['tokens']:.1f} | {p['accuracy']:.3f} | {share} |")
    lines += ["", "| eviction | probe | train accuracy | held-out accuracy | held-out slow share "
              f"| held-out accuracy over {args.resplits} other splits: mean ± std (min-max) | majority label, same splits |",
              "|---|---|---|---|---|---|---|"]

    def spread(v: list[float]) -> str:
        t = torch.tensor(v, dtype=torch.float64)
        return f"{t.mean():.3f} ± {t.std():.3f} ({t.min():.3f}-{t.max():.3f})" if len(v) > 1 else ""

    for setting, res in results.items():
        again = res["resplit_held_out_accuracy"]
        for tag, t in res["probes"].items():
            lines.append(f"| {setting} | {tag} | {t['train_accuracy']:.3f} | {t['held_out_accuracy']:.3f} | "
                         f"{res['label_slow_share']['test']:.3f} | {spread(again[tag])} | {spread(again['majority'])} |")
    md = "\n".join(lines) + "\n"
    atomic_write_text(args.out / "fastslow_table.md", md)
    plot(results, args.out / "fastslow.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
