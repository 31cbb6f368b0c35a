"""Find and read a directory's safetensors files, with one-line errors."""

from __future__ import annotations

from pathlib import Path

import torch

from kvzap_trt.errors import KvzapError


def safetensors_files(path: Path, what: str, files: list[Path] | None = None) -> list[Path]:
    """`files`, or every `path/*.safetensors` when None; KvzapError when that is none at all
    (`what` names the directory)."""
    files = sorted(Path(path).glob("*.safetensors")) if files is None else files
    if not files:
        raise KvzapError(f"{what} directory {path} has no .safetensors files")
    return files


def read_safetensors_dir(path: Path, what: str, files: list[Path] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of `files` (default: every `path/*.safetensors`) by name; `what` names the
    directory in errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path, what, files):
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise KvzapError(f"cannot read {what} weights {f}: {e}") from None
    return tensors
