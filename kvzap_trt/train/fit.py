"""Fit KVzap surrogates layer by layer: closed-form ridge (linear) or an MLP (AdamW, cosine).

Both standardise inputs and targets for the fit and fold the statistics back into the weights,
so the result is a plain released-format surrogate applied to raw hidden states. The ridge
normal equations are accumulated over memory-mapped chunks, so a layer's features never need to
fit in memory. Quality is R² on the held-out split, per layer (mean over kv heads).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kvzap_trt.surrogate import Surrogate
from kvzap_trt.train.dataset import Dataset

CHUNK = 65536  # rows per chunk when streaming a layer's features


def r2_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    """pred, y: [N, H] -> mean over heads of 1 - SSE / SST."""
    sse = ((pred - y) ** 2).sum(0)
    sst = ((y - y.mean(0)) ** 2).sum(0).clamp(min=1e-12)
    return float((1 - sse / sst).mean())


def moments(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and std of a memory-mapped [N, d] array, streamed."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), CHUNK):
        c = torch.from_numpy(np.asarray(x[i : i + CHUNK], dtype=np.float64))
        s += c.sum(0)
        s2 += (c * c).sum(0)
    mean = s / len(x)
    return mean, (s2 / len(x) - mean**2).clamp(min=1e-12).sqrt()


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, d], y: [N, H] -> weight [H, d], bias [H] minimising |xW^T + b - y|^2 + l2 N |W_std|^2."""
    mx, sx = moments(x)
    my = torch.from_numpy(np.asarray(y, dtype=np.float64)).mean(0)
    d = x.shape[1]
    xtx = torch.zeros(d, d, dtype=torch.float64)
    xty = torch.zeros(d, y.shape[1], dtype=torch.float64)
    for i in range(0, len(x), CHUNK):
        xc = (torch.from_numpy(np.asarray(x[i : i + CHUNK], dtype=np.float64)) - mx) / sx
        yc = torch.from_numpy(np.asarray(y[i : i + CHUNK], dtype=np.float64)) - my
        xtx += xc.T @ xc
        xty += xc.T @ yc
    w_std = torch.linalg.solve(xtx + l2 * len(x) * torch.eye(d, dtype=torch.float64), xty).T  # [H, d]
    w = w_std / sx
    return w.float(), (my - w @ mx).float()


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int, epochs: int = 15, lr: float = 2e-3, weight_decay: float = 1e-2,
            batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Linear(d, hidden) -> GELU -> Linear(hidden, H) on standardised data; returns w1, b1, w2, b2 for raw data.

    batch: default about 50 steps an epoch, between 32 and 512 rows.
    """
    torch.manual_seed(seed)
    batch = batch or min(512, max(32, len(x) // 50))
    mx, sx = (t.float() for t in moments(x))
    X = (torch.from_numpy(np.asarray(x, dtype=np.float32)) - mx) / sx
    Y = torch.from_numpy(np.asarray(y, dtype=np.float32))
    my, sy = Y.mean(0), Y.std(0).clamp(min=1e-6)
    Y = (Y - my) / sy
    net = nn.Sequential(nn.Linear(X.shape[1], hidden), nn.GELU(), nn.Linear(hidden, Y.shape[1]))
    steps = epochs * math.ceil(len(X) / batch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(X)).split(batch):
            loss = nn.functional.mse_loss(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        w1 = net[0].weight / sx  # fold the input standardisation into the first layer
        b1 = net[0].bias - w1 @ mx
        w2 = net[2].weight * sy[:, None]  # and the target's into the last
        b2 = net[2].bias * sy + my
    return w1.detach(), b1.detach(), w2.detach(), b2.detach()


def train_surrogate(ds: Dataset, kind: str, l2: float = 1e-2, epochs: int = 15, seed: int = 0) -> tuple[Surrogate, dict]:
    """Fit every layer; returns the surrogate and per-layer held-out R²."""
    L, d = ds.meta["num_layers"], ds.meta["hidden_size"]
    params: dict[str, list[torch.Tensor]] = {}
    r2 = []
    for layer in tqdm(range(L), desc=f"fit {kind}", unit="layer"):
        x, y = ds.layer("train", layer)
        if kind == "linear":
            fitted = fit_ridge(x, y, l2)
            names = ("w1", "b1")
        else:
            fitted = fit_mlp(x, y, max(d // 8, 1), epochs=epochs, seed=seed + layer)
            names = ("w1", "b1", "w2", "b2")
        for n, t in zip(names, fitted):
            params.setdefault(n, []).append(t)
        xt, yt = ds.layer("test", layer)
        s = Surrogate(*(torch.stack(params[n][-1:]) for n in names))
        pred = s.score(0, torch.from_numpy(np.asarray(xt, dtype=np.float32)))
        r2.append(r2_score(pred, torch.from_numpy(np.asarray(yt, dtype=np.float32))))
    st = {n: torch.stack(v) for n, v in params.items()}
    return Surrogate(st["w1"], st["b1"], st.get("w2"), st.get("b2")), {"r2_test": r2, "r2_test_mean": sum(r2) / len(r2)}
