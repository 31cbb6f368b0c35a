"""The report of an evaluation: report.json (everything, per-sample records included), report.md
(tables) and report.png (accuracy against compression, one panel per task), written together into
one directory atomically.

`python -m kvzap_trt.eval.report DIR...` rewrites report.md and report.png from DIR/report.json
(a report written before a table was added gains it; the data are not touched)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from kvzap_trt.atomic import atomic_dir


def full_accuracy(runs: list[dict]) -> dict[tuple[str, int], float]:
    return {(r["task"], r["length"]): r["accuracy"] for r in runs if r["method"] == "full"}


def kvzap_summary(runs: list[dict]) -> list[dict[str, Any]]:
    """Per KVzap configuration, means over the groups it ran on: compression and accuracy of KVzap,
    of the full cache and of both baselines matched to it."""
    full = full_accuracy(runs)
    by_key: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["method"] == "kvzap":
            d = by_key[r["key"]]
            d["kvzap"].append(r["accuracy"])
            d["compression"].append(r["compression"])
            d["full"].append(full[(r["task"], r["length"])])
            d["groups"].append(f"{r['task']}@{r['length']}")
        elif r["matched_to"]:
            by_key[r["matched_to"]][r["method"]].append(r["accuracy"])
            by_key[r["matched_to"]][r["method"] + "_compression"].append(r["compression"])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = []
    for key, d in by_key.items():
        row = {"config": key, "groups": len(d["groups"]), "compression": mean(d["compression"]),
               "accuracy": mean(d["kvzap"]), "full": mean(d["full"]), "window": mean(d["window"]),
               "random": mean(d["random"]), "window_compression": mean(d["window_compression"]),
               "random_compression": mean(d["random_compression"])}
        row["delta_vs_full"] = row["accuracy"] - row["full"]
        out.append(row)
    return out


def paired_difference(a: list[float], b: list[float], resamples: int = 10_000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, 2.5th and 97.5th percentile of that mean over `resamples` bootstrap draws of
    the pairs), in the scores' units. a[i] and b[i] are one sample's scores under two methods;
    resampling pairs keeps what the two share (a sample hard for both stays hard for both)."""
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equally long, non-empty score lists, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[draws].mean(axis=1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def sample_scores(run: dict) -> dict[tuple[str, int, int], float]:
    """{(task, length, sample index): score} of one run."""
    return {(run["task"], run["length"], rec["index"]): rec["score"] for rec in run["records"]}


def paired_summary(runs: list[dict]) -> list[dict[str, Any]]:
    """Per KVzap configuration, its samples paired with the same samples under the full cache and
    under each baseline matched to it (pooled over the groups it ran on): the mean difference in
    points with a 95% bootstrap interval, and how many samples scored lower / higher than the other
    method. The means of kvzap_summary average groups; these average samples (equal when every
    group has as many samples)."""
    full = {(r["task"], r["length"]): r for r in runs if r["method"] == "full"}
    kvzap: dict[str, list[dict]] = defaultdict(list)
    others: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        if r["method"] == "kvzap":
            kvzap[r["key"]].append(r)
            others[(r["key"], "full")].append(full[(r["task"], r["length"])])
        elif r["matched_to"]:
            others[(r["matched_to"], r["method"])].append(r)
    out = []
    for key, mine in kvzap.items():
        ours = {k: v for r in mine for k, v in sample_scores(r).items()}
        row: dict[str, Any] = {"config": key, "samples": len(ours)}
        for name in ("full", "window", "random"):
            theirs = {k: v for r in others.get((key, name), []) for k, v in sample_scores(r).items()}
            if not theirs:
                continue
            if theirs.keys() != ours.keys():
                raise ValueError(f"{key} and its {name} run hold different samples: they cannot be paired")
            keys = sorted(ours)
            a, b = [ours[k] for k in keys], [theirs[k] for k in keys]
            mean, lo, hi = paired_difference(a, b)
            row[name] = {"delta": 100 * mean, "low": 100 * lo, "high": 100 * hi,
                         "lower": sum(x < y for x, y in zip(a, b)), "higher": sum(x > y for x, y in zip(a, b))}
        out.append(row)
    return out


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    runs, meta = report["runs"], report["meta"]
    lines = [f"# Accuracy against compression: {meta['model']}", ""]
    lines += [f"- {k}: " + (", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else str(v))
              for k, v in meta.items() if k != "model"]  # the machine is a dict (kvzap_trt/bench.py)
    full = full_accuracy(runs)
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    lengths = sorted({r["length"] for r in runs})
    lines += ["", "## Full cache (no eviction): accuracy %", "",
              "| task | " + " | ".join(str(n) for n in lengths) + " |", "| --- |" + " --- |" * len(lengths)]
    lines += [f"| {t} | " + " | ".join(_f(full.get((t, n)), ".1f") for n in lengths) + " |" for t in tasks]
    summary = kvzap_summary(runs)
    if summary:
        lines += ["", "## KVzap against its baselines at the same compression (means over the groups it ran on)", "",
                  "| config | groups | compression | KVzap % | full % | KVzap - full | window % (compression) "
                  "| random % (compression) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {s['config']} | {s['groups']} | {s['compression']:.1%} | {s['accuracy']:.1f} | {s['full']:.1f} "
                  f"| {s['delta_vs_full']:+.1f} | {_f(s['window'], '.1f')} ({_f(s['window_compression'], '.1%')}) "
                  f"| {_f(s['random'], '.1f')} ({_f(s['random_compression'], '.1%')}) |" for s in summary]
        lines += ["", "## KVzap against the same samples under the other methods (pooled over its groups)", "",
                  "Difference in points with a 95% bootstrap interval over the paired samples, then how many samples "
                  "KVzap scored lower / higher than the other method (the rest: equal).", "",
                  "| config | samples | KVzap - full | KVzap - window | KVzap - random |", "| --- | --- | --- | --- | --- |"]
        cell = lambda d: "-" if d is None else (  # noqa: E731
            f"{d['delta']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]; {d['lower']} lower / {d['higher']} higher")
        lines += [f"| {p['config']} | {p['samples']} | {cell(p.get('full'))} | {cell(p.get('window'))} "
                  f"| {cell(p.get('random'))} |" for p in paired_summary(runs)]
    lines += ["", "## Every run", "", "| task | length | method | compression | accuracy % | vs full | KV MiB "
              "(dense) | prompt tokens |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['task']} | {r['length']} | {r['key']} | {r['compression']:.1%} | {r['accuracy']:.1f} "
                     f"| {r['accuracy'] - full[(r['task'], r['length'])]:+.1f} | {r['bytes_allocated'] / 2**20:.2f} "
                     f"({r['bytes_dense'] / 2**20:.2f}) | {r['prompt_tokens']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    markers = "osD^v<>"
    lengths = sorted({r["length"] for r in runs})
    for ax, task in zip(axes.flat, tasks):
        series: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
        for r in runs:
            if r["task"] == task:
                name = f"kvzap {r['surrogate']}" if r["method"] == "kvzap" else \
                    f"{r['method']} ~{r['matched_to'].split()[1]}" if r["matched_to"] else r["method"]
                series[(name, r["length"])].append((r["compression"], r["accuracy"]))
        names = sorted({n for n, _ in series})
        for (name, length), pts in sorted(series.items()):
            pts.sort()
            color = f"C{names.index(name)}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[lengths.index(length) % len(markers)],
                    color=color, linestyle="-" if name.startswith("kvzap") else ":", label=f"{name} @{length}")
        ax.set_title(task)
        ax.set_xlabel("compression (evicted fraction)")
        ax.set_ylabel("accuracy %")
        ax.set_xlim(-0.02, 1)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle(f"{report['meta']['model']}: accuracy against compression")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> Path:
    """out/report.json, report.md, report.png, all or none."""
    with atomic_dir(Path(out)) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "report.md").write_text(markdown(report))
        plot(report, tmp / "report.png")
    return Path(out)


def main(argv: list[str]) -> int:
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: python -m kvzap_trt.eval.report DIR... (rewrites DIR/report.md and report.png from "
              "DIR/report.json)", file=sys.stderr)
        return 2
    for d in map(Path, argv):
        if not (d / "report.json").is_file():
            print(f"{d}: no report.json", file=sys.stderr)
            return 2
    for d in map(Path, argv):
        print(write_report(json.loads((d / "report.json").read_text()), d))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
