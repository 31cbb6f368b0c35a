"""KV-CoE: the (KVzap-compressed) KV cache reused as a representation (issue 17; Xing et al.,
ICLR 2026, arXiv 2601.20326). No second forward pass: the embedding is read from the pages the
engine already holds, after prefill and when a request finishes (`Engine(record_embedding=...)`
or `Engine.submit(..., embed=True)`).

embedding.py  the KV embedding of one sequence slot (kept pages + window, per-head ragged)
baseline.py   the baseline: mean-pooled final hidden states of the same model (one dense forward)
jsonl.py      the JSON-lines input of `embed --jsonl` and `probe train --data`
evaluate.py   clustering and title retrieval on standard-library docs: KV (eviction off, at tau) vs baseline
coe.py        the KV-CoE self-evaluation score of an answer (Chain-of-Embedding features over the cache's layers)
selfeval.py   its AUROC, right vs wrong, on a generated recall task (eviction off and on)
probe.py      the difficulty probe (fast/slow) on the prefill KV embedding; one safetensors file
probe_train.py  training it from labelled prompts (`kvzap-trt probe train`)
reasoning.py  the request option reasoning auto|fast|slow, applied by the engine after prefill
fastslow.py   tokens vs accuracy of always-long, always-short, probe-auto and the oracle on SmolLM2
"""

from kvzap_trt.kvcoe.embedding import KVEmbedding, head_means

__all__ = ["KVEmbedding", "head_means"]
