"""A model directory's tokenizer without importing transformers on every command's start-up.

transformers' fast tokenizers are the `tokenizers` library plus a little Python, and importing
transformers costs seconds (3-4 s on the 2-core machines here) before the first token. Encoding
and decoding here call `tokenizers` on the directory's tokenizer.json and apply the clean-up of
spaces that transformers applies when tokenizer_config.json asks for it. Anything else (chat
templates, the oracle's framing) goes to transformers' own tokenizer, loaded on first use.
tests/test_tokenizer.py checks both paths give the same ids and text on many inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (PreTrainedTokenizerBase): spaces before punctuation
    and English contractions removed."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class FastTokenizer:
    """encode / decode / eos_token_id through `tokenizers`; other attributes from transformers."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self.model_dir = model_dir
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config_file = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self._tokenizer.token_to_id(eos) if eos else None
        # transformers skips every special token it knows of, tokenizer.json's and the config's extras
        self._special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}
        self._special.update(t for t in config.get("extra_special_tokens", []) if isinstance(t, str))
        self._special_ids = {i for i in map(self._tokenizer.token_to_id, self._special) if i is not None}
        self._transformers = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = [i for i in ids if i not in self._special_ids] if skip_special_tokens else list(ids)
        text = self._tokenizer.decode(ids, skip_special_tokens=False)
        return clean_up_tokenization(text) if self._clean_up else text

    def __getattr__(self, name: str) -> Any:
        """Chat templates and the rest: transformers' tokenizer of the same directory."""
        if name.startswith("_"):
            raise AttributeError(name)
        if self._transformers is None:
            from transformers import AutoTokenizer

            self._transformers = AutoTokenizer.from_pretrained(self.model_dir)
        return getattr(self._transformers, name)
