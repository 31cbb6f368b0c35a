"""KV-CoE self-evaluation: Chain-of-Embedding features of an answer, read from the paged cache.

Chain-of-Embedding (Wang et al., ICLR 2025; its `score.py`, `CoEScoreInfo`) follows one
representation per layer, x_0 .. x_L, each the mean over the answer's positions of that layer's
hidden state, and scores the path it takes:

    mag_i = |x_{i+1} - x_i| / |x_L - x_0|                                  (magnitude change)
    ang_i = arccos(cos(x_{i+1}, x_i)) / arccos(cos(x_L, x_0))              (angle change)
    CoE-R = mean_i mag_i - mean_i ang_i
    CoE-C = | mean_i mag_i * exp(j * ang_i) |      (the normalised angle used as an angle, as there)

Higher means "more likely right" for both (its evaluation feeds them to the ROC as they are).

KV-CoE (Xing et al., ICLR 2026) builds the chain from the KV cache instead of hidden states.
Here, per layer l (the model's L layers: there is no cache for the embeddings or the final norm):

    x_l = mean_h [mean_t K[l, h, t] ; mean_t V[l, h, t]]                                     [2D]

over the answer's positions t >= prompt_len - 1 that head h still holds (kept pages + window):
the positions whose forward produced the answer's tokens (the last prompt token produced the
first one; the last generated token is never fed, so it has no K/V). K/V of layer l at t are
projections of the hidden state entering layer l at t, the state CoE takes for that layer; the
projection is the layer's own. Heads holding none of the answer (possible only with window 0) are
left out of the head mean; a layer none of whose heads holds any gives no score (nan -> None).
"""

from __future__ import annotations

import math

import torch

from kvzap_trt.cache.paged_cache import PagedKVCache
from kvzap_trt.device_reads import to_host
from kvzap_trt.errors import KvzapError
from kvzap_trt.kvcoe.embedding import head_means

FEATURES = ("mag", "ang", "coe_r", "coe_c")
SCORE = "coe_c"  # the one returned as kv_coe_score (chosen before any evaluation: CoE's combined feature)


def answer_trajectory(cache: PagedKVCache, slot: int, prompt_len: int) -> torch.Tensor:
    """The chain x_0 .. x_{L-1} of `slot`'s answer: [L, 2D] float32 on the cache's device (rows of
    a layer whose heads hold no answer position are nan)."""
    if prompt_len < 1:
        raise KvzapError(f"prompt_len must be >= 1, got {prompt_len}")
    if cache.ctx_len[slot] < prompt_len:
        raise KvzapError(f"sequence slot {slot} holds {cache.ctx_len[slot]} tokens, fewer than its "
                         f"{prompt_len}-token prompt")
    means, counts = head_means(cache, slot, list(range(cache.spec.num_layers)), since=prompt_len - 1)  # [L, H, 2, D]
    present = (counts > 0).float()[..., None]  # [L, H, 1]
    return (means.flatten(2) * present).sum(1) / present.sum(1)  # [L, 2D]; 0/0 = nan for an empty layer


def coe_features(x: torch.Tensor) -> torch.Tensor:
    """x: [N, E] the chain (N >= 3) -> [4] float64 (mag, ang, coe_r, coe_c), CoE's formulas above;
    nan where they are undefined (first and last points equal or parallel, an empty layer)."""
    if x.dim() != 2 or x.shape[0] < 3:
        raise KvzapError(f"a chain of embeddings needs [N >= 3, E] points, got {tuple(x.shape)}")
    x = x.double()
    step = x[1:] - x[:-1]  # [N-1, E]
    mag = step.norm(dim=1) / (x[-1] - x[0]).norm()  # [N-1]

    def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        return torch.arccos(cos.clamp(-1.0, 1.0))

    ang = angle(x[1:], x[:-1]) / angle(x[-1], x[0])  # [N-1]
    coe_r = mag.mean() - ang.mean()
    coe_c = torch.stack([(mag * ang.cos()).mean(), (mag * ang.sin()).mean()]).norm()
    return torch.stack([mag.mean(), ang.mean(), coe_r, coe_c])


def check_layers(num_layers: int) -> None:
    """KvzapError unless a model of `num_layers` layers gives a chain CoE can score."""
    if num_layers < 3:
        raise KvzapError(f"KV-CoE needs a chain of >= 3 layers, this model has {num_layers}")


def kv_coe(cache: PagedKVCache, slot: int, prompt_len: int) -> dict[str, float | None]:
    """CoE features of `slot`'s answer as the cache holds it now: {"mag", "ang", "coe_r", "coe_c"},
    host floats (None where undefined). One device read."""
    check_layers(cache.spec.num_layers)
    values = to_host(coe_features(answer_trajectory(cache, slot, prompt_len))).tolist()
    return {k: (v if math.isfinite(v) else None) for k, v in zip(FEATURES, values)}
