"""The report of an evaluation: report.json (everything, per-sample records included), report.md
(tables) and report.png (accuracy against compression, one panel per task), written together into
one directory atomically.

`python -m kvzap_trt.eval.report DIR...` rewrites report.md and report.png from DIR/report.json
(a report written before a table was added gains it); report.json and any other file in DIR are
left as they are."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from kvzap_trt.atomic import atomic_dir, atomic_save_figure, atomic_write_text
from kvzap_trt.eval.paired import paired_difference


def full_accuracy(runs: list[dict]) -> dict[tuple[str, int], float]:
    return {(r["task"], r["length"]): r["accuracy"] for r in runs if r["method"] == "full"}


def runs_by_config(runs: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{KVzap configuration key: {"kvzap": its runs, "full": the full-cache run of each of their
    groups (same order), "window" / "random": the baseline runs matched to it}}, configurations in
    the order they ran."""
    full = {(r["task"], r["length"]): r for r in runs if r["method"] == "full"}
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["method"] == "kvzap":
            out[r["key"]]["kvzap"].append(r)
            out[r["key"]]["full"].append(full[(r["task"], r["length"])])
        elif r["matched_to"]:
            out[r["matched_to"]][r["method"]].append(r)
    return out


def kvzap_summary(runs: list[dict]) -> list[dict[str, Any]]:
    """Per KVzap configuration, means over the groups it ran on: compression and accuracy of KVzap,
    of the full cache and of the baselines matched to it (None: not run)."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = []
    for key, d in runs_by_config(runs).items():
        acc, comp = ({m: mean([r[field] for r in d[m]]) for m in ("kvzap", "full", "window", "random")}
                     for field in ("accuracy", "compression"))
        row = {"config": key, "groups": len(d["kvzap"]), "compression": comp["kvzap"], "accuracy": acc["kvzap"],
               "full": acc["full"], "window": acc["window"], "random": acc["random"],
               "window_compression": comp["window"], "random_compression": comp["random"]}
        row["delta_vs_full"] = row["accuracy"] - row["full"]
        out.append(row)
    return out


def sample_scores(run: dict) -> dict[tuple[str, int, int], float]:
    """{(task, length, sample index): score} of one run."""
    return {(run["task"], run["length"], rec["index"]): rec["score"] for rec in run["records"]}


def paired_summary(runs: list[dict]) -> list[dict[str, Any]]:
    """Per KVzap configuration, its samples paired with the same samples under the full cache and
    under each baseline matched to it (pooled over the groups it ran on): paired_difference with
    delta, low and high in points. The means of kvzap_summary average groups; these average
    samples (equal when every group has as many samples)."""
    out = []
    for key, d in runs_by_config(runs).items():
        ours = {k: v for r in d["kvzap"] for k, v in sample_scores(r).items()}
        row: dict[str, Any] = {"config": key, "samples": len(ours)}
        for name in ("full", "window", "random"):
            theirs = {k: v for r in d[name] for k, v in sample_scores(r).items()}
            if not theirs:
                continue
            if theirs.keys() != ours.keys():
                raise ValueError(f"{key} and its {name} run hold different samples: they cannot be paired")
            keys = sorted(ours)
            diff = paired_difference([ours[k] for k in keys], [theirs[k] for k in keys])
            row[name] = {**diff, **{k: None if diff[k] is None else 100 * diff[k] for k in ("delta", "low", "high")}}
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
                  "Difference in points with a 95% interval (Newcombe's for paired proportions; none where scores are "
                  "fractions), how many samples KVzap scored lower / higher than the other method (the rest: equal) "
                  "and the exact sign test's two-sided p of that split.", "",
                  "| config | samples | KVzap - full | KVzap - window | KVzap - random |", "| --- | --- | --- | --- | --- |"]
        cell = lambda d: "-" if d is None else (  # noqa: E731
            f"{d['delta']:+.1f}" + ("" if d["low"] is None else f" [{d['low']:+.1f}, {d['high']:+.1f}]")
            + f"; {d['lower']} lower / {d['higher']} higher; p {d['p']:.2g}")
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
    atomic_save_figure(fig, path, dpi=110)
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
    reports = {}
    for d in map(Path, argv):
        try:
            reports[d] = json.loads((d / "report.json").read_text())
        except (OSError, ValueError) as e:
            print(f"{d}: cannot read report.json ({e})", file=sys.stderr)
            return 2
        if not isinstance(reports[d], dict) or not {"meta", "runs"} <= reports[d].keys():
            print(f"{d}/report.json is not a `kvzap-trt eval` report (no meta and runs)", file=sys.stderr)
            return 2
    for d, report in reports.items():
        atomic_write_text(d / "report.md", markdown(report))
        plot(report, d / "report.png")
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
