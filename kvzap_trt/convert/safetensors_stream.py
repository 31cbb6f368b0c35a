"""Write a .safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once; a 64 GB rank file does not
fit in 24 GiB. The format is simple enough to stream: an 8-byte little-endian header length, a
JSON header giving each tensor's dtype, shape and byte range, then the tensors' bytes in that
order. Knowing every name, dtype and shape up front, we write the header first and the bytes as
they come. The result is read back by `safetensors.safe_open` in the tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int32: "I32", torch.int64: "I64"}


class StreamingSafetensorsWriter:
    """plan: ordered {name: (dtype, shape)}. Call `write(name, tensor)` in that order, then `close()`."""

    def __init__(self, path: Path, plan: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata or {}}
        offset = 0
        for name, (dtype, shape) in plan.items():
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned
        self.plan, self.order = plan, list(plan)
        self.path, self.sha256 = Path(path), hashlib.sha256()
        self.file: BinaryIO = open(path, "wb")
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha256.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[0] if self.order else None
        if name != expected:
            raise ValueError(f"{self.path.name}: tensor {name!r} written out of order (expected {expected!r})")
        dtype, shape = self.plan[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path.name}: {name} is {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}")
        data = tensor.detach().contiguous().cpu()
        self._put(memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else b"")
        self.order.pop(0)

    def close(self) -> str:
        """Finish the file; returns its SHA-256."""
        if self.order:
            raise ValueError(f"{self.path.name}: {len(self.order)} planned tensors were not written, e.g. {self.order[0]}")
        self.file.close()
        return self.sha256.hexdigest()
