"""KV-CoE self-evaluation on a locally generated recall task: AUROC of the score, right vs wrong.

    OMP_NUM_THREADS=1 .venv/bin/python -m kvzap_trt.kvcoe.selfeval --out docs/kvcoe

Task: `--records` lines "NAME is AGE years old." (names and ages drawn with `--seed`), then
"How old is NAME? Answer with the number only." in the chat template; greedy, at most
`--max-new-tokens` tokens. An answer is right when the first integer it contains is the age.
Difficulty is graded by the number of records (`--per-level` questions at each count); the longer
prompts exceed the preset's window, so eviction acts on them.

Scores (higher: more likely right), each sample under each run:
- KV-CoE (kvcoe/coe.py, recorded by the engine at finish): CoE-C (the `kv_coe_score`), CoE-R,
  and their magnitude and angle terms, with the eviction off, at the preset's tau, and at the
  preset's tau with `--small-window` (more of each prompt evicted).
- Hidden-state CoE (the original's input, eviction off): the same features over x_0 .. x_L, the
  residual stream entering each layer and the final normed state, averaged over the same answer
  positions, from one dense forward of prompt + answer (a reference the cache-based score is
  compared with; it is what KV-CoE avoids storing).
- A difficulty proxy that reads no model state: minus the prompt's length (more records, longer).
AUROC with a 95% bootstrap interval (`--bootstrap` resamples of the questions), and the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

from kvzap_trt import bench
from kvzap_trt.atomic import atomic_write_text
from kvzap_trt.config import resolve_config
from kvzap_trt.errors import KvzapError
from kvzap_trt.kvcoe.coe import FEATURES, coe_features
from kvzap_trt.models.transformer import Transformer
from kvzap_trt.ops.fresh_prompts import causal_self_attention
from kvzap_trt.runtime.generate import Runtime

NAMES = ("Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nick Olga Paul Quinn Rosa "
         "Sam Tina Uma Victor Wendy Xavier Yara Zoe Adam Bella Chris Diana Ethan Fiona").split()


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scores [N] float, labels [N] bool (True: right) -> P(score of a right > score of a wrong), ties
    counting one half (the Mann-Whitney U / (n_right * n_wrong)). KvzapError without both classes."""
    if scores.shape != labels.shape or scores.dim() != 1:
        raise KvzapError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must be the same [N]")
    pos, neg = scores[labels].double(), scores[~labels].double()
    if not len(pos) or not len(neg):
        raise KvzapError(f"AUROC needs right and wrong samples, got {len(pos)} right and {len(neg)} wrong")
    diff = pos[:, None] - neg[None, :]  # [P, N]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    """-> (false positive rates, true positive rates) from (0, 0) to (1, 1), one point per distinct
    score (thresholds from high to low)."""
    order = scores.double().argsort(descending=True)
    s, y = scores.double()[order], labels[order].double()
    last = torch.cat([s[1:] != s[:-1], torch.tensor([True])])  # the end of each run of equal scores
    tp, fp = y.cumsum(0)[last], (1 - y).cumsum(0)[last]
    return [0.0] + (fp / fp[-1]).tolist(), [0.0] + (tp / tp[-1]).tolist()


def bootstrap_ci(scores: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the AUROC over `n` resamples of the samples (with replacement;
    resamples holding one class only are skipped)."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n):
        i = torch.randint(0, len(scores), (len(scores),), generator=g)
        if 0 < int(labels[i].sum()) < len(i):
            vals.append(auroc(scores[i], labels[i]))
    v = torch.tensor(vals)
    return float(v.quantile(0.025)), float(v.quantile(0.975))


def make_questions(levels: list[int], per_level: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for n in levels:
        if not 1 <= n <= len(NAMES):
            raise KvzapError(f"records must be in [1, {len(NAMES)}], got {n}")
        for _ in range(per_level):
            names, ages = rng.sample(NAMES, n), [rng.randint(10, 99) for _ in range(n)]
            i = rng.randrange(n)
            facts = "\n".join(f"{a} is {b} years old." for a, b in zip(names, ages))
            out.append({"records": n, "question": f"{facts}\nHow old is {names[i]}? Answer with the number only.",
                        "answer": ages[i]})
    return out


def is_right(text: str, answer: int) -> bool:
    m = re.search(r"-?\d+", text)
    return m is not None and int(m.group()) == answer


@torch.inference_mode()
def hidden_coe(model: Transformer, ids: list[int], prompt_len: int) -> list[float]:
    """CoE features of the original method: x_0 .. x_L (the residual stream entering each layer, then
    the final normed state) averaged over positions >= prompt_len - 1 of one dense forward of `ids`
    (prompt + answer but its last token). -> [mag, ang, coe_r, coe_c]."""
    device = model.embed_tokens.weight.device
    states: list[torch.Tensor] = []
    hooks = [layer.input_layernorm.register_forward_pre_hook(lambda _m, args: states.append(args[0]))
             for layer in model.layers]
    hooks.append(model.norm.register_forward_hook(lambda _m, _i, out: states.append(out)))
    scale = model.cfg.head_dim**-0.5
    try:
        model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device),
              lambda _layer, _h, q, k, v: causal_self_attention(q, k, v, scale))
    finally:
        for h in hooks:
            h.remove()
    x = torch.stack([s[prompt_len - 1:].float().mean(0) for s in states])  # [L + 1, hidden]
    return coe_features(x).tolist()


def run(rt: Runtime, qs: list[dict], ids: list[list[int]], max_new: int, batch: int, hidden: bool) -> list[dict]:
    out = []
    for i in range(0, len(ids), batch):
        engine, reqs = rt.start(ids[i:i + batch], rt.sampling(max_new_tokens=max_new, temperature=0.0), kv_coe=True)
        engine.run()
        for q, p, r in zip(qs[i:i + batch], ids[i:i + batch], reqs):
            text = rt.decode(r.output_ids) or ""
            row = {"text": text, "right": is_right(text, q["answer"]), "answer_tokens": len(r.output_ids),
                   "minus_prompt_tokens": -len(p),
                   "kv_evicted": round(r.kv["compression_ratio"], 4), **{f"kv_{k}": v for k, v in r.kv_coe_features.items()}}
            if hidden:
                row.update(zip([f"hidden_{k}" for k in FEATURES], hidden_coe(rt.loaded.model, p + r.output_ids[:-1], len(p))))
            out.append(row)
    return out


def summarise(rows: list[dict], records: list[int], key: str, n_boot: int, seed: int) -> dict:
    """AUROC of `key` over `rows` (samples where it is defined), its bootstrap interval, the counts,
    and the within-level AUROC: per record count, weighted by its right x wrong pairs (what the
    score tells apart among questions of equal difficulty and about equal length)."""
    kept = [(r, n) for r, n in zip(rows, records) if r[key] is not None]
    s = torch.tensor([r[key] for r, _ in kept], dtype=torch.float64)
    y = torch.tensor([r["right"] for r, _ in kept])
    lvl = torch.tensor([n for _, n in kept])
    lo, hi = bootstrap_ci(s, y, n_boot, seed)
    num = pairs = 0
    for n in lvl.unique().tolist():
        m = lvl == n
        p = int(y[m].sum()) * int((~y[m]).sum())
        if p:
            num, pairs = num + auroc(s[m], y[m]) * p, pairs + p
    return {"auroc": auroc(s, y), "ci95": [lo, hi], "right": int(y.sum()), "wrong": int((~y).sum()),
            "undefined": len(rows) - len(kept), "within_level_auroc": num / pairs if pairs else None}


def plot(curves: dict[str, tuple[list[float], list[float], float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr, a) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {a:.3f})")  # straight segments: the area the AUROC is
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate (wrong answers scored as right)", ylabel="true positive rate", title=title)
    ax.legend(fontsize=7, loc="lower right")
    bench.save_plot(fig, path, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--records", default="3,4,6,8,12,16,24", help="comma-separated record counts (difficulty levels)")
    ap.add_argument("--per-level", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--small-window", type=int, default=32, help="window of the third run (preset tau)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/kvcoe"))
    ap.add_argument("--resummarise", action="store_true",
                    help="recompute the summary, table and PNG from OUT/selfeval.json's samples; run no model")
    args = ap.parse_args(argv)
    if args.resummarise:
        report = json.loads((args.out / "selfeval.json").read_text())
        report["resummarised"] = f"{bench.today()}: --resummarise --bootstrap {args.bootstrap} --seed {args.seed}"
        write_report(report, args.out, args.bootstrap, args.seed)
        return 0
    try:
        levels = [int(x) for x in args.records.split(",")]
    except ValueError:
        raise SystemExit(f"--records must be comma-separated integers, got {args.records!r}") from None
    torch.manual_seed(0)
    cfg = resolve_config(args.model)
    rt_tau = Runtime.from_config(cfg)
    runs = {
        "eviction off": Runtime(dataclasses.replace(cfg, surrogate=None), rt_tau.loaded, None),
        f"tau {cfg.threshold}, window {cfg.window}": rt_tau,
        f"tau {cfg.threshold}, window {args.small_window}": Runtime(dataclasses.replace(cfg, window=args.small_window),
                                                                    rt_tau.loaded, rt_tau.surrogate),
    }
    qs = make_questions(levels, args.per_level, args.seed)
    ids = [rt_tau.encode(q["question"], chat=True) for q in qs]
    print(f"{len(qs)} questions, prompts {min(map(len, ids))}-{max(map(len, ids))} tokens", file=sys.stderr)
    results, timing = {}, {}
    for i, (name, rt) in enumerate(runs.items()):
        t0 = time.perf_counter()
        results[name] = run(rt, qs, ids, args.max_new_tokens, args.batch, hidden=i == 0)
        timing[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {sum(r['right'] for r in results[name])}/{len(qs)} right, {timing[name]} s", file=sys.stderr)

    report = {
        **bench.report_head(bench.module_command("kvzap_trt.kvcoe.selfeval", argv), {**cfg.to_dict(), **bench.options(args)},
                            cfg.device),
        "score": "kv_coe_c (kv_coe_score); higher: more likely right",
        "seconds": timing,
        "samples": [{**q, "prompt_tokens": len(p), "runs": {name: rows[i] for name, rows in results.items()}}
                    for i, (q, p) in enumerate(zip(qs, ids))],
    }
    write_report(report, args.out, args.bootstrap, args.seed)
    return 0


def write_report(report: dict, out: Path, n_boot: int, seed: int) -> None:
    """Summary (AUROC per run and score), selfeval.json, selfeval_table.md and selfeval_roc.png in `out`,
    from report["samples"]."""
    samples, summary, curves = report["samples"], {}, {}
    records = [q["records"] for q in samples]
    for name in samples[0]["runs"]:
        rows = [q["runs"][name] for q in samples]
        keys = [f"kv_{k}" for k in FEATURES] + ([f"hidden_{k}" for k in FEATURES] if "hidden_coe_c" in rows[0] else [])
        keys.append("minus_prompt_tokens")
        summary[name] = {"accuracy": sum(r["right"] for r in rows) / len(rows),
                         "kv_evicted_mean": sum(r["kv_evicted"] for r in rows) / len(rows),
                         "auroc": {k: summarise(rows, records, k, n_boot, seed) for k in keys}}
        for k, label in (("kv_coe_c", f"KV-CoE-C, {name}"), ("hidden_coe_c", "hidden-state CoE-C, eviction off")):
            if k in keys:
                kept = [r for r in rows if r[k] is not None]
                fpr, tpr = roc_curve(torch.tensor([r[k] for r in kept]), torch.tensor([r["right"] for r in kept]))
                curves[label] = (fpr, tpr, summary[name]["auroc"][k]["auroc"])
    report = {**{k: v for k, v in report.items() if k != "samples"}, "summary": summary, "samples": samples}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "selfeval.json", json.dumps(report, indent=1) + "\n")
    plot(curves, out / "selfeval_roc.png", f"{report['config']['model']}: recall task, {len(samples)} questions")
    md = table(summary)
    atomic_write_text(out / "selfeval_table.md", md + "\n")
    print(md)


def table(summary: dict) -> str:
    rows = ["| run | accuracy (right/wrong) | KV evicted | score | AUROC | 95% bootstrap CI | within-level AUROC |",
            "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        for k, a in s["auroc"].items():
            rows.append(f"| {name} | {s['accuracy']:.3f} ({a['right']}/{a['wrong']}) | {s['kv_evicted_mean']:.1%} | {k} "
                        f"| {a['auroc']:.3f} | {a['ci95'][0]:.3f}-{a['ci95'][1]:.3f} | {a['within_level_auroc']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
