"""The difficulty probe: a small classifier on a prompt's prefill KV representation, fast or slow.

Follows `KVClassifier` of the paper's code (cmd2001/ICLR2026_KV-Embedding,
KVClassifier/kv_classfier.py, with the defaults its training script uses): input `kv_cat` (K and V
side by side), `head_agg="flatten"` (kv heads side by side), `layer_agg="mean"` over the last 4
layers, no L2 normalisation; then `Linear(in, 512) -> ReLU -> Linear(512, 1)`.

Where it differs (and why):
- Token aggregation: the paper sums the K/V of the prompt's last `seq_len` (32 or 64) positions,
  the prompt left-padded to that length with EOS. We average what our cache holds for each head
  (`head_means`: kept pages + window, every prompt token with eviction off): no padding, no cut,
  and under KVzap only the kept pairs. For a prompt of exactly `seq_len` tokens the sum is
  `seq_len` times our mean, which the standardisation below absorbs.
- Standardisation: each input feature is centred and scaled by the training set's mean and
  standard deviation (stored in the probe), as the paper does not: our training sets are small
  (hundreds of prompts, fp32 on a CPU) and the K means of some heads are orders of magnitude
  larger than others.
- Target: a binary label (0 fast, 1 slow) with a logistic loss; the paper regresses a 4-level
  difficulty (0, 25, 75, 100) with MSE and thresholds at 50. `threshold` here is on P(slow).
- `hidden=0` gives logistic regression (the same input, one linear layer).

A probe file is one safetensors file: the weights and `mean`/`std`, and in its metadata, under
`kvzap_probe`, the JSON of `ProbeConfig` (embedding settings, the model's KV shapes it was trained
for, training summary). Loading it for a model with other shapes is an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvzap_trt.atomic import atomic_write_bytes
from kvzap_trt.errors import KvzapError
from kvzap_trt.kvcoe.embedding import HEAD_AGGS, KVEmbedding

PROBE_FORMAT = 1
METADATA_KEY = "kvzap_probe"
LABELS = ("fast", "slow")  # class index 0, 1
SHAPE_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")


def model_shape(model_cfg: Any) -> dict[str, int]:
    """The fields of a ModelConfig a probe is tied to (the KV shapes, and the model's width and vocabulary)."""
    return {k: int(getattr(model_cfg, k)) for k in SHAPE_FIELDS}


@dataclass
class ProbeConfig:
    """model: the model it was trained for, as named when training (preset, path or id).
    shape: that model's `model_shape` (checked when loading).
    last_layers, head_agg: the KV embedding read from the cache (always unnormalised).
    hidden: the MLP's hidden width (0: logistic regression).
    threshold: P(slow) at or above which a prompt is slow.
    prompt_format: "chat" (texts wrapped in the chat template when training) or "raw".
    eviction: surrogate, threshold and window the training embeddings were read under.
    training: what the training run reports (counts, held-out accuracy, data file, seed...)."""

    model: str
    shape: dict[str, int]
    last_layers: int = 4
    head_agg: str = "flatten"
    hidden: int = 512
    threshold: float = 0.5
    prompt_format: str = "chat"
    eviction: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    format: int = PROBE_FORMAT

    def __post_init__(self):
        if self.hidden < 0:
            raise KvzapError(f"probe hidden width must be >= 0 (0: logistic regression), got {self.hidden}")
        if not 0 < self.threshold < 1:
            raise KvzapError(f"probe threshold must be in (0, 1), got {self.threshold}")
        if self.head_agg not in HEAD_AGGS:
            raise KvzapError(f"probe head_agg must be one of {', '.join(HEAD_AGGS)}, got {self.head_agg!r}")
        if self.prompt_format not in ("chat", "raw"):
            raise KvzapError(f"probe prompt_format must be chat or raw, got {self.prompt_format!r}")
        missing = [k for k in SHAPE_FIELDS if k not in self.shape]
        if missing:
            raise KvzapError(f"probe shape lacks {', '.join(missing)}")

    @property
    def embedding(self) -> KVEmbedding:
        return KVEmbedding(last_layers=self.last_layers, head_agg=self.head_agg, normalize=False)

    @property
    def input_dim(self) -> int:
        return self.embedding.dim(self.shape["num_kv_heads"], self.shape["head_dim"])


class Probe(torch.nn.Module):
    """x [N, E] (KV embeddings, `cfg.embedding`) -> logit of "slow" [N]."""

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.input_dim
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        if cfg.hidden:
            self.net = torch.nn.Sequential(torch.nn.Linear(d, cfg.hidden), torch.nn.ReLU(), torch.nn.Linear(cfg.hidden, 1))
        else:
            self.net = torch.nn.Sequential(torch.nn.Linear(d, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, E] -> logits [N] (P(slow) = sigmoid)."""
        if x.shape[-1] != self.cfg.input_dim:
            raise KvzapError(f"probe input has {x.shape[-1]} features, the probe takes {self.cfg.input_dim}")
        return self.net((x.float() - self.mean) / self.std).squeeze(-1)

    @torch.inference_mode()
    def p_slow(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, E] or [E] -> P(slow) [N] or []."""
        return torch.sigmoid(self(x.to(self.mean.device)))

    def choose(self, x: torch.Tensor) -> tuple[str, float]:
        """One prompt's embedding [E] -> ("fast" | "slow", P(slow))."""
        p = float(self.p_slow(x))
        return LABELS[int(p >= self.cfg.threshold)], p

    def check_model(self, model_cfg: Any, what: str) -> None:
        """KvzapError unless `model_cfg` has the shapes this probe was trained for."""
        got = model_shape(model_cfg)
        diff = [f"{k} {self.cfg.shape[k]} vs {got[k]}" for k in SHAPE_FIELDS if self.cfg.shape[k] != got[k]]
        if diff:
            raise KvzapError(f"the probe was trained for model {self.cfg.model} and does not fit {what}: "
                             + ", ".join(diff) + " (probe vs model)")

    def save(self, path: Path) -> Path:
        """One safetensors file, written whole or not at all (kvzap_trt/atomic.py)."""
        from safetensors.torch import save

        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: json.dumps(dataclasses.asdict(self.cfg))}))
        return Path(path)

    @classmethod
    def load(cls, path: Path, model_cfg: Any | None = None, what: str = "this model") -> "Probe":
        """Read a probe file; with `model_cfg`, refuse one trained for other shapes."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get(METADATA_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise KvzapError(f"cannot read probe {path}: {getattr(e, 'strerror', None) or e}") from None
        if meta is None:
            raise KvzapError(f"{path} is not a kvzap-trt probe (no {METADATA_KEY} metadata)")
        try:
            raw = json.loads(meta)
            if raw.get("format") != PROBE_FORMAT:
                raise KvzapError(f"probe {path} has format {raw.get('format')}, this version reads {PROBE_FORMAT}")
            cfg = ProbeConfig(**raw)
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise KvzapError(f"probe {path}: bad {METADATA_KEY} metadata: {e}") from None
        probe = cls(cfg)
        want = probe.state_dict()
        if set(tensors) != set(want) or any(tensors[k].shape != want[k].shape for k in want):
            raise KvzapError(f"probe {path}: tensors do not match its config (hidden {cfg.hidden}, input {cfg.input_dim})")
        probe.load_state_dict(tensors)
        if model_cfg is not None:
            probe.check_model(model_cfg, what)
        return probe.eval()
