"""How good is a surrogate on held-out data: R² per layer, compression vs tau, overlap with the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kvzap_trt.surrogate import Surrogate
from kvzap_trt.train.dataset import Dataset

TARGETS = (0.5, 0.75)  # compressions at which keep-sets are compared with the oracle's


def held_out(ds: Dataset, s: Surrogate, splits: tuple[str, ...] = ("test",)) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and oracle log-scores on the test split (or on `splits` joined): [L, N, Hkv] each."""
    preds, ys = [], []
    for layer in range(ds.meta["num_layers"]):
        xy = [ds.layer(split, layer) for split in splits]
        x = np.concatenate([np.asarray(x, dtype=np.float32) for x, _ in xy])
        preds.append(s.score(layer, torch.from_numpy(x)))
        ys.append(torch.from_numpy(np.concatenate([np.asarray(y, dtype=np.float32) for _, y in xy])))
    return torch.stack(preds), torch.stack(ys)


def overlap_with_oracle(pred: torch.Tensor, y: torch.Tensor, compression: float) -> float:
    """Fraction of the oracle's kept pairs that the surrogate also keeps, evicting the same number
    (the lowest-scoring `compression` of all pairs, over all layers as KVzap's one tau does).
    A random choice keeps 1 - compression of them on average."""
    n_keep = int(round(pred.numel() * (1 - compression)))
    keep_pred = torch.zeros(pred.numel(), dtype=torch.bool)
    keep_pred[pred.flatten().topk(n_keep).indices] = True
    keep_true = torch.zeros_like(keep_pred)
    keep_true[y.flatten().topk(n_keep).indices] = True
    return float((keep_pred & keep_true).sum() / keep_true.sum())


def build_report(ds: Dataset, s: Surrogate, fit: dict) -> dict:
    pred, y = held_out(ds, s)
    taus = torch.quantile(pred.flatten()[:: max(1, pred.numel() // 200_000)], torch.linspace(0.02, 0.98, 25)).tolist()
    return {
        "kind": s.kind,
        "r2_test": fit["r2_test"],
        "r2_test_mean": fit["r2_test_mean"],
        "test_pairs": int(y[0].numel()),
        "compression_vs_tau": [{"tau": t, "compression": float((pred < t).float().mean())} for t in taus],
        "oracle_overlap": [{"compression": c, "surrogate": overlap_with_oracle(pred, y, c), "random": 1 - c}
                           for c in TARGETS],
    }


def plot_report(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    r2 = report["r2_test"]
    a.bar(range(len(r2)), r2, color="tab:blue")
    a.axhline(report["r2_test_mean"], color="k", lw=1, label=f"mean {report['r2_test_mean']:.2f}")
    a.set_xlabel("layer")
    a.set_ylabel("held-out R² of log KVzip+ score")
    a.legend(fontsize=8)
    cv = report["compression_vs_tau"]
    b.plot([c["tau"] for c in cv], [c["compression"] for c in cv], "o-", ms=3)
    b.set_xlabel("threshold tau (log score)")
    b.set_ylabel("fraction of KV pairs below tau")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
