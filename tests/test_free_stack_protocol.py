"""The device free-stack pop, modelled on the CPU: every interleaving of the heads' atomic steps.

kvzapEvict's thread blocks pop block ids concurrently: a head that needs `need` ids takes
free_stack[first, first + need) by lowering the shared counter num_free. Each protocol below is
a generator that yields before each atomic operation on the counter, so an explorer can run the
heads in every order (issue 10, defect 1):

  cas_pop  (plugins/src/evict_append.cu pop_free)  read; while top >= need: CAS(top -> top - need)
  sub_pop  (the protocol it replaced)               atomicSub; on failure atomicAdd it back
  decode_pop (evict_decode_kernel)                  need 1: atomicSub, never given back (pop_one);
                                                    more: pop_free's CAS loop

The CAS loop keeps the allocator exact in every interleaving; the old protocol reaches the
issue's state where a head's ids are counted free again and others are lost. The decode pop may
leave the counter below zero, which every reader takes as none free: with that reading it is
exact in every interleaving too, beside CAS pops, and serves every head that some id was left for.
"""

from __future__ import annotations

import random

import pytest


class Counter:
    """num_free, with a log of every atomic operation: (head, value read, value after)."""

    def __init__(self, value: int):
        self.value = value
        self.log: list[tuple[int, int, int]] = []

    def _op(self, head: int, new: int) -> int:
        old, self.value = self.value, new
        self.log.append((head, old, new))
        return old

    def add(self, head: int, n: int) -> int:  # atomicAdd / atomicSub: returns the old value
        return self._op(head, self.value + n)

    def cas(self, head: int, expected: int, new: int) -> int:  # atomicCAS: returns the old value
        return self._op(head, new if self.value == expected else self.value)


def cas_pop(mem: Counter, head: int, need: int):
    """-> first index of the ids taken, or -1 (the kernel's pop_free, step by step)."""
    yield
    top = mem.add(head, 0)  # atomicAdd(num_free, 0): a read
    while top >= need:
        yield
        seen = mem.cas(head, top, top - need)
        if seen == top:
            return top - need
        top = seen
    return -1


def sub_pop(mem: Counter, head: int, need: int):
    """-> first index of the ids taken, or -1 (the protocol before issue 10)."""
    yield
    top = mem.add(head, -need)
    if top < need:
        yield
        mem.add(head, need)  # give the decrement back
        return -1
    return top - need


def decode_pop(mem: Counter, head: int, need: int):
    """-> first index of the ids taken, or -1 (the decode kernel: pop_one for one id, else pop_free)."""
    if need != 1:
        return (yield from cas_pop(mem, head, need))
    yield
    top = mem.add(head, -1)  # atomicSub(num_free, 1), never given back
    return top - 1 if top >= 1 else -1


def reachable(protocol, initial: int, needs: list[int]):
    """Yield (counter, results) once for every state some interleaving of the heads' atomic steps
    reaches, the final ones included; results[i] is head i's return value, None while it runs.

    A state is the counter's value and each head's own history (what it read and wrote decides
    what it does next), so a depth-first search over "which head steps next" that skips states
    already seen still follows every transition of every interleaving. Generators cannot be
    copied: each schedule is replayed from the start, fine for the few heads and steps here.
    """

    def replay(schedule: list[int]):
        mem = Counter(initial)
        heads = [protocol(mem, i, n) for i, n in enumerate(needs)]
        for g in heads:
            next(g)  # to the first atomic operation
        results: list[int | None] = [None] * len(needs)
        for i in schedule:
            try:
                next(heads[i])
            except StopIteration as done:
                results[i] = done.value
        return mem, results

    seen = set()
    stack: list[list[int]] = [[]]
    while stack:
        schedule = stack.pop()
        mem, results = replay(schedule)
        key = (mem.value, tuple(results), tuple(tuple(op for op in mem.log if op[0] == i) for i in range(len(needs))))
        if key in seen:
            continue
        seen.add(key)
        yield mem, results
        stack.extend(schedule + [i] for i, r in enumerate(results) if r is None)


def finals(protocol, initial: int, needs: list[int]):
    """The reachable states in which every head has returned."""
    return [(mem, results) for mem, results in reachable(protocol, initial, needs) if None not in results]


def handed_out(results: list[int | None], needs: list[int]) -> list[int]:
    """Every id taken so far by a successful head (with repeats, if two heads share one)."""
    return [j for first, n in zip(results, needs) if first is not None and first >= 0 for j in range(first, first + n)]


def allocator_exact(mem: Counter, initial: int, results: list[int | None], needs: list[int]) -> bool:
    """Every id of [0, initial) exactly once: free (below the counter) or held by one head."""
    return sorted(handed_out(results, needs) + list(range(max(mem.value, 0)))) == list(range(initial))


ISSUE = (10, [11, 5, 5])  # X needs 11, F and B need 5 each
RANDOM = [(initial, needs) for seed in range(2) for needs in [random.Random(seed).choices(range(1, 6), k=4)]
          for initial in range(9)]


@pytest.mark.parametrize("initial,needs", [ISSUE, (3, [1, 1, 1]), (5, [2, 2, 2])] + RANDOM)
def test_cas_pop_keeps_the_allocator_exact_in_every_interleaving(initial, needs):
    states = list(reachable(cas_pop, initial, needs))
    for mem, results in states:
        assert mem.value >= 0  # never below zero, at any point
        assert allocator_exact(mem, initial, results, needs), (mem.log, results)  # disjoint, in range, none lost
        for head, (first, need) in enumerate(zip(results, needs)):
            ops = [(read, new) for h, read, new in mem.log if h == head]
            if first == -1:
                assert all(read == new for read, new in ops)  # a failed head never wrote the counter
                assert ops[-1][0] < need  # and it failed on reading too few
    ends = [(mem, results) for mem, results in states if None not in results]
    for mem, results in ends:
        assert mem.value == initial - sum(n for r, n in zip(results, needs) if r >= 0)
    assert len(ends) >= 1 and len(states) > len(needs)


def test_cas_pop_on_the_issue_scenario_serves_both_small_heads():
    """10 free; X needs 11, F and B 5: X fails without touching the counter, F and B both succeed."""
    outcomes = {(tuple(results), mem.value) for mem, results in finals(cas_pop, *ISSUE)}
    assert outcomes == {((-1, 5, 0), 0), ((-1, 0, 5), 0)}


def test_sub_pop_reaches_the_double_handout_the_issue_describes():
    """The old protocol: X (11) fails, F (5) fails on the negative counter, X gives back, B takes
    [0, 5), F gives back: the counter says 5 free, so B's ids count as free and [5, 10) are lost."""
    ends = finals(sub_pop, *ISSUE)
    assert any(results == [-1, -1, 0] and mem.value == 5 for mem, results in ends)
    assert not all(allocator_exact(mem, ISSUE[0], results, ISSUE[1]) for mem, results in ends)
    assert any(mem.value < 0 for mem, _ in reachable(sub_pop, *ISSUE))


def test_sub_pop_is_exact_with_two_heads_and_breaks_with_more():
    """The old protocol needs two failures in flight around a success to lose ids: with two heads
    it ends exact (a head may fail spuriously, though); the explorer finds the loss elsewhere."""
    for initial in range(9):
        for needs in ([3, 4], [5, 5], [9, 1]):
            assert all(allocator_exact(m, initial, r, needs) for m, r in finals(sub_pop, initial, needs))
    broken = [(initial, needs) for initial, needs in RANDOM
              if not all(allocator_exact(m, initial, r, needs) for m, r in finals(sub_pop, initial, needs))]
    assert broken


@pytest.mark.parametrize("initial,needs", [(3, [1, 1, 1, 1, 1]), (2, [1, 2, 1, 1]), (0, [1, 1]), (4, [3, 1, 1, 2])]
                         + RANDOM)
def test_decode_pop_is_exact_in_every_interleaving_when_below_zero_reads_as_none(initial, needs):
    states = list(reachable(decode_pop, initial, needs))
    for mem, results in states:
        assert allocator_exact(mem, initial, results, needs), (mem.log, results)  # max(counter, 0) free
        for head, (first, need) in enumerate(zip(results, needs)):
            ops = [(read, new) for h, read, new in mem.log if h == head]
            if first == -1 and need == 1:
                assert ops[-1][0] <= 0  # a one-id head fails only where none was free
            if first == -1 and need > 1:
                assert all(read == new for read, new in ops)  # a CAS head that fails never writes
    ends = [(mem, results) for mem, results in states if None not in results]
    for mem, results in ends:
        served = sum(n for r, n in zip(results, needs) if r >= 0)
        assert max(mem.value, 0) == initial - served
        if all(n == 1 for n in needs):
            assert served == min(initial, len(needs))  # every head some id was left for got one
    if all(n == 1 for n in needs):  # below zero exactly when more heads than ids
        assert any(mem.value < 0 for mem, _ in states) == (len(needs) > initial)
