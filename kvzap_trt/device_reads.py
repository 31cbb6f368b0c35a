"""The one door through which the engine and the cache read device data on the host, counted.

On CUDA every such read is a device-to-host copy that waits for the stream: between two kernel
launches it stalls the pipeline. The engine reads a fixed few times per step (to plan the step,
to take its tokens), never between one layer and the next; `count_reads()` lets a test prove it. Tensors built on
the host from Python lists (cu_seqlens, slots, ctx_lens) are not device data and need no door.

This module imports nothing of the engine, so ops and kernels' wrappers can use it too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(eq=False)  # identity: count_reads() removes its own counter
class Reads:
    n: int = 0  # device-to-host reads made while counting


_counting: list[Reads] = []  # every open count_reads(), of any thread


def to_host(t: torch.Tensor) -> torch.Tensor:
    """t: any shape, on any device -> a CPU copy of the same shape (never a view of `t`).

    One read, counted even when `t` is already on the CPU: the CPU stands in for the GPU in tests.
    """
    for reads in _counting:
        reads.n += 1
    return t.to("cpu", copy=True)


@contextlib.contextmanager
def count_reads() -> Iterator[Reads]:
    """`with count_reads() as reads: ...` -> `reads.n` reads were made inside the block."""
    reads = Reads()
    _counting.append(reads)
    try:
        yield reads
    finally:
        _counting.remove(reads)
