"""Training the difficulty probe (probe.py) from labelled prompts, embeddings read through the engine.

Prompts -> `Runtime.embed` (prefill only, the configured eviction) -> `ProbeConfig.embedding` per
prompt [N, E] -> a random held-out split (`val_frac`, seeded; the paper holds out 10% at random)
-> full-batch Adam on the logistic loss over the rest -> held-out accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvzap_trt.errors import KvzapError
from kvzap_trt.kvcoe.jsonl import read_jsonl
from kvzap_trt.kvcoe.probe import LABELS, Probe, ProbeConfig, model_shape


def parse_label(value: Any) -> int:
    """"fast" | "slow" | 0 | 1 -> 0 | 1; anything else raises ValueError."""
    if isinstance(value, str) and value in LABELS:
        return LABELS.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    raise ValueError(f'label must be "fast", "slow", 0 or 1, got {value!r}')


def read_labelled(path: Path) -> tuple[list[str], list[int]]:
    """Lines {"text": ..., "label": "fast"|"slow"|0|1} (blank lines skipped) -> texts, labels (1: slow)."""
    texts, labels = [], []
    for n, obj in read_jsonl(path, ' and a "label"'):
        try:
            labels.append(parse_label(obj.get("label")))
        except ValueError as e:
            raise KvzapError(f"{path}:{n}: {e}") from None
        texts.append(obj["text"])
    return texts, labels


def embed_prompts(rt, ids: list[list[int]], cfg: ProbeConfig, batch: int = 16, progress: bool = True) -> torch.Tensor:
    """Token lists -> the probe's input [N, E] float32 (host), read from the engine's cache after prefill."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(ids), desc="embedding prompts", unit="prompt", disable=not progress) as bar:
        for i in range(0, len(ids), batch):
            out += [r.embedding for r in rt.embed(ids[i:i + batch], cfg.embedding, batch)]
            bar.update(len(ids[i:i + batch]))
    return torch.stack(out).float()


def split(n: int, val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random (train, held-out) split of range(n); held-out has round(n * val_frac) items."""
    if not 0 <= val_frac < 1:
        raise KvzapError(f"val_frac must be in [0, 1), got {val_frac}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = round(n * val_frac)
    return sorted(order[k:]), sorted(order[:k])


def fit(cfg: ProbeConfig, x: torch.Tensor, y: torch.Tensor, epochs: int = 300, lr: float = 1e-3,
        weight_decay: float = 1e-4, seed: int = 0) -> Probe:
    """x [N, E] float32, y [N] (0 fast, 1 slow) -> a trained probe (standardisation from x)."""
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise KvzapError(f"fit needs x [N, E] and y [N] with N > 0, got {list(x.shape)} and {list(y.shape)}")
    if len(set(y.tolist())) < 2:
        raise KvzapError(f"the training set holds only {LABELS[int(y[0])]!r} prompts: a probe needs both labels")
    if epochs < 1:
        raise KvzapError(f"epochs must be >= 1, got {epochs}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = Probe(cfg)
    probe.mean.copy_(x.mean(0))
    probe.std.copy_(x.std(0, unbiased=False).clamp(min=1e-6) if len(x) > 1 else torch.ones(x.shape[1]))
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    # Classes weighted to count equally, so a skewed set does not teach "always the majority".
    pos = float(y.float().mean())
    weight = torch.where(y.bool(), 0.5 / pos, 0.5 / (1 - pos))
    probe.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x), y.float(), weight=weight)
        loss.backward()
        opt.step()
    return probe.eval()


def accuracy(probe: Probe, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Share of prompts whose choice equals their label (None for an empty set)."""
    if len(y) == 0:
        return None
    pred = (probe.p_slow(x) >= probe.cfg.threshold).long()
    return float((pred == y.long()).float().mean())


def train_probe(rt, texts: list[str], labels: list[int], model_name: str, chat: bool = True, hidden: int = 512,
                val_frac: float = 0.2, epochs: int = 300, lr: float = 1e-3, seed: int = 0, batch: int = 16,
                progress: bool = True, source: str | None = None) -> tuple[Probe, dict[str, Any]]:
    """Embed `texts` through `rt`'s engine, split, fit, evaluate -> (probe, report)."""
    m = rt.loaded.config
    cfg = ProbeConfig(model=model_name, shape=model_shape(m), hidden=hidden, prompt_format="chat" if chat else "raw",
                      eviction={"surrogate": rt.cfg.surrogate if rt.surrogate is not None else None,
                                "threshold": rt.cfg.threshold if rt.surrogate is not None else None,
                                "window": rt.cfg.window})
    ids = [rt.encode(t, chat=chat) for t in texts]
    for i, t in enumerate(ids):
        if not t:
            raise KvzapError(f"text {i} has no tokens")
    x = embed_prompts(rt, ids, cfg, batch, progress)
    y = torch.tensor(labels, dtype=torch.long)
    tr, va = split(len(texts), val_frac, seed)
    probe = fit(cfg, x[tr], y[tr], epochs, lr, seed=seed)
    majority = int(y[tr].float().mean() >= 0.5)
    report = {
        "data": source, "prompts": len(texts), "train": len(tr), "held_out": len(va),
        "slow_share": float(y.float().mean()),
        "train_accuracy": accuracy(probe, x[tr], y[tr]),
        "held_out_accuracy": accuracy(probe, x[va], y[va]),
        "held_out_majority_accuracy": float((y[va] == majority).float().mean()) if va else None,
        "epochs": epochs, "lr": lr, "seed": seed, "val_frac": val_frac,
    }
    probe.cfg.training = report
    return probe, report
