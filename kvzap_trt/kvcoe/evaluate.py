"""KV embeddings against mean-pooled final hidden states, on the standard library's documentation.

    .venv/bin/python scripts/make_corpus.py build/corpus/stdlib-docs-1200 --chars 1200
    .venv/bin/python -m kvzap_trt.kvcoe.evaluate --corpus build/corpus/stdlib-docs-1200 --out docs/kvcoe
    .venv/bin/python -m kvzap_trt.kvcoe.evaluate --replot --out docs/kvcoe   # retrieval.png from retrieval.json

Documents: `--pieces` pieces of each of `--modules` modules (drawn with `--seed` among those with
enough pieces of at least `--min-tokens` tokens), cut to `--max-tokens`. Two tasks:
- clustering by module: for each document, is its nearest other document (cosine) from the same
  module (P@1), and the mean average precision of its module's other pieces;
- title -> section retrieval: the query "Python module NAME" ranks every document; top-1 is a hit when
  the best document is one of NAME's pieces; MRR of the first such document.
Each metric raw (the paper's vectors as they are) and centred (the documents' mean subtracted from
documents, the queries' from queries: a standard remedy for the one common direction mean-pooled
LM states share; reported beside the raw figure, never instead of it).
Representations: the hidden-state baseline (kvcoe/baseline.py), and the KV embedding
(kvcoe/embedding.py, read from the engine's cache after prefill) with eviction off and at the
preset's tau, for the last 4 layers (the paper's setting) and for all layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

from kvzap_trt import bench
from kvzap_trt.atomic import atomic_write_text
from kvzap_trt.config import resolve_config
from kvzap_trt.kvcoe.baseline import mean_final_hidden
from kvzap_trt.kvcoe.embedding import KVEmbedding
from kvzap_trt.runtime.generate import Runtime


def load_documents(corpus: Path, rt: Runtime, modules: int, pieces: int, min_tokens: int, max_tokens: int,
                   seed: int) -> tuple[list[str], list[list[int]]]:
    """-> module label and tokens of each document, `pieces` per module, modules in sorted order."""
    by_module: dict[str, list[list[int]]] = {}
    for f in sorted(corpus.glob("*.txt")):
        ids = rt.encode(f.read_text())
        if len(ids) >= min_tokens:
            by_module.setdefault(f.stem.rsplit("-", 1)[0], []).append(ids[:max_tokens])
    eligible = sorted(m for m, docs in by_module.items() if len(docs) >= pieces)
    if len(eligible) < modules:
        raise SystemExit(f"{corpus}: only {len(eligible)} modules have {pieces} pieces of >= {min_tokens} tokens")
    chosen = sorted(random.Random(seed).sample(eligible, modules))
    labels = [m for m in chosen for _ in range(pieces)]
    return labels, [d for m in chosen for d in by_module[m][:pieces]]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [N, E], b [M, E] -> [N, M]"""
    return torch.nn.functional.normalize(a.double(), dim=1) @ torch.nn.functional.normalize(b.double(), dim=1).T


def metrics(docs: torch.Tensor, queries: torch.Tensor, labels: list[str], names: list[str]) -> dict[str, float]:
    sim = cosine(docs, docs).fill_diagonal_(-2.0)  # [N, N], self excluded
    same = torch.tensor([[a == b for b in labels] for a in labels]).fill_diagonal_(False)
    order = sim.argsort(1, descending=True)[:, :-1]  # [N, N-1], self (last) dropped
    hits = same.gather(1, order).double()  # [N, N-1]
    p_at_1 = hits[:, 0].mean()
    prec = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1)
    ap = (prec * hits).sum(1) / hits.sum(1)
    q = cosine(queries, docs)  # [M, N]
    q_hits = torch.tensor([[lab == n for lab in labels] for n in names]).gather(1, q.argsort(1, descending=True))
    first = q_hits.double().argmax(1) + 1  # rank of the first piece of the named module
    return {"cluster_p_at_1": float(p_at_1), "cluster_map": float(ap.mean()),
            "retrieval_top1": float((first == 1).double().mean()), "retrieval_mrr": float((1 / first).mean())}


def centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0, keepdim=True)


def evaluate(rt: Runtime, labels, docs, names, queries, rep) -> dict:
    """rep(list of token lists) -> ([N, E] tensor, extra dict). Both sets, raw and centred."""
    t0 = time.perf_counter()
    d, extra = rep(docs)
    q, _ = rep(queries)
    out = {"seconds": round(time.perf_counter() - t0, 1), "dim": d.shape[1], **extra}
    out["raw"] = metrics(d, q, labels, names)
    out["centred"] = metrics(centred(d), centred(q), labels, names)
    return out


METRICS = {"cluster_p_at_1": "cluster P@1", "cluster_map": "cluster MAP", "retrieval_top1": "title top-1",
           "retrieval_mrr": "title MRR"}


def plot(report: dict, path: Path) -> None:
    """Grouped bars: each metric (raw, the paper's vectors as they are) for each representation,
    chance marked where it is defined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(METRICS))]
        label = f"{name} ({r.get('kv_compression_ratio', 0):.0%} evicted)" if "KV" in name else name
        ax.bar(xs, [r["raw"][m] for m in METRICS], width, label=label)
    for j, m in enumerate(METRICS):
        if m in report["chance"]:
            ax.hlines(report["chance"][m], j - 0.45, j + 0.45, colors="black", linestyles=":", linewidth=1)
    ax.set_xticks(range(len(METRICS)), list(METRICS.values()))
    ax.set(ylim=(0, 1), ylabel="score (raw vectors; dotted: chance)",
           title=f"KV embedding vs hidden states, {report['documents']} documents ({report['date']})")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    bench.save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, help="a directory of scripts/make_corpus.py (required unless --replot)")
    ap.add_argument("--replot", action="store_true", help="only redraw OUT/retrieval.png from OUT/retrieval.json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modules", type=int, default=16)
    ap.add_argument("--pieces", type=int, default=3)
    ap.add_argument("--min-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/kvcoe"))
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads((args.out / "retrieval.json").read_text()), args.out / "retrieval.png")
        return 0
    if args.corpus is None:
        ap.error("--corpus is required (unless --replot)")
    torch.manual_seed(0)
    cfg = resolve_config(args.model)
    rt_tau = Runtime.from_config(cfg)
    rt_off = Runtime(dataclasses.replace(cfg, surrogate=None), rt_tau.loaded, None)  # same weights, nothing evicted
    labels, docs = load_documents(args.corpus, rt_tau, args.modules, args.pieces, args.min_tokens,
                                  args.max_tokens, args.seed)
    names = sorted(set(labels))
    queries = [rt_tau.encode(f"Python module {n}") for n in names]
    print(f"{len(docs)} documents ({sum(map(len, docs))} tokens), {len(names)} modules", file=sys.stderr)

    def hidden(texts):
        return torch.stack([mean_final_hidden(rt_tau.loaded.model, t) for t in texts]), {}

    def kv(rt, emb):
        def rep(texts):
            reqs = rt.embed(texts, emb, batch=8)
            ratio = sum(r.kv["compression_ratio"] for r in reqs) / len(reqs)
            return torch.stack([r.embedding for r in reqs]), {"kv_compression_ratio": round(ratio, 4)}
        return rep

    runs = {"hidden (final layer, mean)": hidden}
    for layers, tag in ((4, "last 4 layers"), (0, "all layers")):
        emb = KVEmbedding(last_layers=layers)
        runs[f"KV {tag}, eviction off"] = kv(rt_off, emb)
        runs[f"KV {tag}, tau {cfg.threshold}"] = kv(rt_tau, emb)
    results = {}
    for name, rep in runs.items():
        results[name] = evaluate(rt_tau, labels, docs, names, queries, rep)
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    n, p = len(docs), args.pieces
    report = {
        **bench.report_head(bench.module_command("kvzap_trt.kvcoe.evaluate", argv), {**cfg.to_dict(), **bench.options(args)},
                            cfg.device),
        "documents": n, "modules": names, "document_tokens": [len(d) for d in docs],
        "chance": {"cluster_p_at_1": (p - 1) / (n - 1), "retrieval_top1": p / n},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "retrieval.json", json.dumps(report, indent=1) + "\n")
    rows = [f"| {name} | {r['dim']} | {r.get('kv_compression_ratio', 0):.1%} | "
            + " | ".join(f"{r[v][m]:.3f}" for m in ("cluster_p_at_1", "cluster_map", "retrieval_top1", "retrieval_mrr")
                         for v in ("raw", "centred")) + f" | {r['seconds']} |" for name, r in results.items()]
    md = "\n".join([
        "| representation | dim | KV evicted | cluster P@1 raw | centred | cluster MAP raw | centred "
        "| title top-1 raw | centred | title MRR raw | centred | s |",
        "|---|---|---|" + "---|" * 9, *rows])
    atomic_write_text(args.out / "retrieval_table.md", md + "\n")
    plot(report, args.out / "retrieval.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
