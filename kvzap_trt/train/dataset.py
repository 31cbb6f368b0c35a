"""Training data for KVzap surrogates: hidden states entering attention -> log KVzip+ scores.

For each text of a corpus folder (`*.txt`): keep it if it has at least `min_tokens` tokens
(longer ones are cut to `max_tokens`), wrap it in the chat template's user turn, run the KVzip+
oracle (`oracle/kvzip.py`), and sample `n_tokens` positions of the text. Every 10th text is held
out for testing. Features and targets are appended to per-layer files as they come, so memory
holds one text at a time whatever the corpus size:

    <dir>/meta.json                 model, shapes, texts, counts
    <dir>/{train,test}/x{l:03d}.f16   [N, hidden] float16, layer l's input hidden states
    <dir>/{train,test}/y{l:03d}.f16   [N, kv_heads] float16, log KVzip+ scores

The scores are kvpress KVzipPress's by default (softmax over sinks, the repeated chunk and the
repeat tokens, chunked; oracle/kvzip.py), or with oracle="kvzap-data" those of NVIDIA's own
collector, kvpress `kvzap/data.py` (oracle/repeat_once.py). Other differences from data.py:
texts of 128-512 tokens cut to length by default (data.py keeps 750-1250-token texts whole and
drops the rest, so that softmax denominators do not vary with length; --min-tokens 750
--max-tokens 1250 comes close, cutting longer texts instead), and features stored in float16
(data.py: bfloat16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvzap_trt.atomic import atomic_dir
from kvzap_trt.errors import KvzapError
from kvzap_trt.models.loading import LoadedModel
from kvzap_trt.oracle import oracle_scorer
from kvzap_trt.oracle.kvzip import context_ids


def read_corpus(folder: Path) -> list[tuple[str, str]]:
    """(name, text) of every `*.txt` file, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KvzapError(f"corpus {folder} is not a directory")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise KvzapError(f"corpus {folder} has no .txt files")
    out = []
    for f in files:
        try:
            out.append((f.name, f.read_text()))
        except (OSError, UnicodeDecodeError) as e:
            raise KvzapError(f"cannot read corpus file {f}: {e}") from None
    return out


@dataclass
class Dataset:
    path: Path
    meta: dict

    @classmethod
    def open(cls, path: Path) -> "Dataset":
        try:
            return cls(Path(path), json.loads((Path(path) / "meta.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise KvzapError(f"{path} is not a dataset written by kvzap-trt train: {e}") from None

    def layer(self, split: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """X [N, hidden] and y [N, kv_heads] of one layer, memory-mapped float16."""
        d, h = self.meta["hidden_size"], self.meta["num_kv_heads"]
        x = np.memmap(self.path / split / f"x{layer:03d}.f16", dtype=np.float16, mode="r").reshape(-1, d)
        y = np.memmap(self.path / split / f"y{layer:03d}.f16", dtype=np.float16, mode="r").reshape(-1, h)
        return x, y


def select_texts(tokenizer, corpus: list[tuple[str, str]], min_tokens: int, max_tokens: int,
                 max_texts: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """The (name, text) pairs of at least `min_tokens` tokens, each cut to `max_tokens` tokens;
    with `max_texts`, a random choice (by `seed`) of that many of them, in corpus order."""
    texts = []
    for name, text in corpus:
        ids = tokenizer.encode(text.strip(), add_special_tokens=False)
        if len(ids) >= min_tokens:
            texts.append((name, tokenizer.decode(ids[:max_tokens])))
    if not texts:
        raise KvzapError(f"no text of the corpus has {min_tokens} tokens or more ({len(corpus)} texts)")
    if max_texts is not None and len(texts) > max_texts:
        chosen = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:max_texts]
        texts = [texts[i] for i in sorted(chosen.tolist())]
    return texts


def build_dataset(loaded: LoadedModel, corpus: list[tuple[str, str]], out: Path, n_tokens: int = 384,
                  min_tokens: int = 128, max_tokens: int = 512, seed: int = 0, oracle: str = "press",
                  scorer=None, max_texts: int | None = None) -> Dataset:
    """`oracle`: one of oracle.ORACLES, whose scorer(model, tokenizer, ids, hidden=dict) gives the
    scores [L, Hkv, T] and fills `hidden`; `scorer` replaces it (recorded as oracle "custom").
    `max_texts`: score only that many of the texts long enough, chosen at random by `seed`."""
    oracle = oracle if scorer is None else "custom"
    scorer = scorer or oracle_scorer(oracle)
    tok, m = loaded.tokenizer, loaded.config
    if tok is None:
        raise KvzapError(f"model {loaded.model_dir} has no tokenizer: the oracle needs one")
    texts = select_texts(tok, corpus, min_tokens, max_tokens, max_texts, seed)
    g = torch.Generator().manual_seed(seed)
    meta = {"model": str(loaded.model_dir), "num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "num_kv_heads": m.num_kv_heads, "n_tokens": n_tokens, "min_tokens": min_tokens, "max_tokens": max_tokens,
            "max_texts": max_texts,
            "target": "log KVzip+ score", "oracle": oracle, "texts": [], "count": {"train": 0, "test": 0}}
    try:
        with atomic_dir(Path(out)) as tmp:
            files = {}
            for split in ("train", "test"):
                (tmp / split).mkdir()
                for layer in range(m.num_layers):
                    files[split, "x", layer] = open(tmp / split / f"x{layer:03d}.f16", "wb")
                    files[split, "y", layer] = open(tmp / split / f"y{layer:03d}.f16", "wb")
            for i, (name, text) in enumerate(tqdm(texts, desc="oracle scores", unit="text")):
                split = "test" if i % 10 == 0 else "train"
                ids, prefix_len = context_ids(tok, text)
                hidden: dict[int, torch.Tensor] = {}
                scores = scorer(loaded.model, tok, ids, hidden=hidden)  # [L, Hkv, T]
                positions = prefix_len + torch.randperm(len(ids) - prefix_len, generator=g)[:n_tokens]
                for layer in range(m.num_layers):
                    files[split, "x", layer].write(hidden[layer][positions].to(torch.float16).numpy().tobytes())
                    y = scores[layer][:, positions].T.clamp(min=1e-30).log()
                    files[split, "y", layer].write(y.to(torch.float16).numpy().tobytes())
                meta["texts"].append({"file": name, "tokens": len(ids), "split": split})
                meta["count"][split] += len(positions)
            for f in files.values():
                f.close()
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    except PermissionError as e:
        raise KvzapError(f"cannot write the dataset to {out}: {e.strerror}") from None
    return Dataset(Path(out), meta)
