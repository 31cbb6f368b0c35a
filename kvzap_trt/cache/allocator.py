"""Block allocator: a stack of free block ids held in tensors, so device code can pop from it too."""

from __future__ import annotations

import torch

from kvzap_trt.device_reads import to_host
from kvzap_trt.errors import CacheFullError


class BlockAllocator:
    """free_stack: [num_blocks] int32, entries [0, num_free) are the free ids; num_free: [1] int32.

    The free count is the truth about memory: a block is in use exactly when it is off the stack.
    A negative count means none free: the decode evict kernel pops one id with a fetch-and-subtract
    (`pop_one`), and a head that finds none leaves the counter below zero; every reader clamps.
    """

    def __init__(self, num_blocks: int, device: torch.device | str = "cpu"):
        self.num_blocks = num_blocks
        # Reversed so that pops hand out 0, 1, 2, ... first: easier to read in a debugger.
        self.free_stack = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32, device=device)
        self.num_free_t = torch.tensor([num_blocks], dtype=torch.int32, device=device)

    @property
    def num_free(self) -> int:
        """One device read: callers read it once per decision, not in a loop. At least 0."""
        return max(int(to_host(self.num_free_t)), 0)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def push(self, ids: torch.Tensor) -> None:
        """Return blocks `ids` ([n] int) to the pool."""
        n, top = ids.numel(), self.num_free
        if top + n > self.num_blocks:
            raise RuntimeError(f"block allocator overflow: {top} free + {n} returned > {self.num_blocks}")
        self.free_stack[top : top + n] = ids.to(self.free_stack)
        self.num_free_t.fill_(top + n)  # not += n: the device count may be below zero (none free)


def pop_blocks(free_stack: torch.Tensor, num_free: torch.Tensor, n: int) -> torch.Tensor:
    """Take `n` ids off the top of the free stack -> [n] int32 (what the evict kernel does on device).

    Part of the reference ops (the oracle, full of host reads by design): its read is not the
    engine's and does not go through `device_reads`; on the kernel path the pop stays on device.
    """
    top = max(int(num_free.item()), 0)  # below zero: none free (BlockAllocator)
    if n > top:
        raise CacheFullError(f"KV block pool exhausted: {n} blocks needed, {top} free")
    num_free -= n
    return free_stack[top - n : top].clone()
