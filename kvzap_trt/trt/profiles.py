"""Optimisation profiles of a kvzap engine: min / opt / max of every dynamic input dimension.

The exported graph (`export/graph.py`) names its dynamic dimensions; each gets a range here:

    symbol               decode profile            prefill profile           why
    num_tokens (N)       1 .. S  (opt S)           1 .. T + S (opt min(T, 2048)) packed new tokens of a step
    batch (B)            1 .. S  (opt S)           1 .. S  (opt 1)           sequences in a step
    batch_plus_1         B + 1                     B + 1                     cu_seqlens
    num_blocks           1 .. P  (opt min(P, 256)) same                      the block pool
    block_size           bs (fixed)                same                      a build setting of the cache
    max_seqs             1 .. S  (opt S)           same                      sequence slots of the cache
    max_blocks_per_head  1 .. ceil(C / bs)         same                      block table columns (C: context)
                         (opt min(that, 256))
    ring_pages           ceil(W / bs) (fixed)      same                      window pages per head
    max_keys (K)         1 .. Mbs + W + S          1 .. Mbs + W + T + S      the step's key bound, carried
                         (opt max)                 (opt max)                 in a shape (M bs = ceil(C / bs) bs)

S = max_seqs, T = max_num_tokens (prompt tokens of a step: a prefill chunk), P = the pool's blocks
(kv_cache_mb's worth), C = max_seq_len. A step packs at most T prompt tokens and one token of every
other running sequence (runtime/scheduler.py), hence T + S.

Why two profiles: the attention plugin sizes its workspace from the profile's largest N
(plugins/trt/kvzapVarlenPagedAttentionPlugin/README.md: `4 * (D + 1) * max(256 * 4 * max(16,
ceil(Hq / H)), N * Hq * ceil(max_keys / 4096))` bytes, max_keys = M * bs + W + N). For Qwen3-8B
(Hq 32, D 128, H 8, C 40960, W 128) that is ~8.5 MB at N = 32 and ~1.8 GB at N = 8192; a decode step runs on the decode
profile's execution context, whose device memory is sized for N <= S only, and TensorRT tunes
its GEMMs for each profile's opt (a full decode batch; a 2k-token prefill chunk). The engine's
scheduler takes T from the engine's profiles (`prompt_tokens_per_step`): longer prompts are
prefilled in chunks of T tokens, so no step exceeds the prefill profile.
The cache dimensions only pass through the plugins (aliased I/O), so their wide ranges cost no
memory inside the engine. Their opt values are small on purpose: the builder configures and may
time the plugins at opt shapes, on inputs it allocates itself, and a pool-sized opt (tens of GB
for an 8B model) would be allocated for that; no kernel's choice depends on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from kvzap_trt.errors import KvzapError

Range = tuple[int, int, int]  # (min, opt, max)
CACHE_OPT = 256  # opt of num_blocks and max_blocks_per_head (module docstring)


@dataclass(frozen=True)
class EngineLimits:
    """What the engine must accept: max_seqs S, max_num_tokens T (prompt tokens of a step),
    max_seq_len C, block_size, window W, num_blocks P (the pool's largest size)."""

    max_seqs: int
    max_num_tokens: int
    max_seq_len: int
    block_size: int
    window: int
    num_blocks: int

    def __post_init__(self):
        for name in ("max_seqs", "max_num_tokens", "max_seq_len", "block_size", "num_blocks"):
            if getattr(self, name) < 1:
                raise KvzapError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window < 0:
            raise KvzapError(f"window must be >= 0, got {self.window}")

    def to_dict(self) -> dict:
        return asdict(self)


def dim_ranges(limits: EngineLimits) -> dict[str, dict[str, Range]]:
    """{"decode": {symbol: range}, "prefill": {...}}: the table of the module docstring."""
    S, T, bs = limits.max_seqs, limits.max_num_tokens, limits.block_size
    M = -(-limits.max_seq_len // bs)
    cache = {
        "num_blocks": (1, min(limits.num_blocks, CACHE_OPT), limits.num_blocks),
        "block_size": (bs, bs, bs),
        "max_seqs": (1, S, S),
        "max_blocks_per_head": (1, min(M, CACHE_OPT), M),
        "ring_pages": (-(-limits.window // bs),) * 3,
    }

    def batch(opt: int) -> dict[str, Range]:
        return {"batch": (1, opt, S), "batch_plus_1": (2, opt + 1, S + 1)}

    def keys(rows: int) -> dict[str, Range]:  # export/plugins.py max_keys_length: at most the capacity bound
        most = cache["max_blocks_per_head"][2] * bs + limits.window + rows
        return {"max_keys": (1, most, most)}

    return {
        "decode": {"num_tokens": (1, S, S), **batch(S), **cache, **keys(S)},
        "prefill": {"num_tokens": (1, min(T, 2048), T + S), **batch(1), **cache, **keys(T + S)},
    }


def graph_inputs(model_path: Path) -> dict[str, list[int | str]]:
    """Each input of an exported graph -> its dims (ints, or the symbol of a dynamic one)."""
    from kvzap_trt.export import load_exported

    m, _ = load_exported(model_path)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}


def profile_shapes(inputs: dict[str, list[int | str]], ranges: dict[str, Range]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input: (min shape, opt shape, max shape)} of one profile for the graph's inputs."""
    shapes = {}
    for name, dims in inputs.items():
        per_dim = []
        for d in dims:
            if isinstance(d, str):
                if d not in ranges:
                    raise KvzapError(f"input {name} has dimension {d!r}, which no optimisation profile covers "
                                     f"(known: {', '.join(sorted(ranges))})")
                per_dim.append(ranges[d])
            else:
                per_dim.append((d, d, d))
        shapes[name] = tuple(tuple(r[k] for r in per_dim) for k in range(3))
    return shapes


def engine_profiles(inputs: dict[str, list[int | str]], limits: EngineLimits) -> list[tuple[str, dict]]:
    """[(profile name, {input: (min, opt, max)})] in the engine's profile order (decode first)."""
    return [(name, profile_shapes(inputs, r)) for name, r in dim_ranges(limits).items()]


def prompt_tokens_per_step(profiles: list[dict[str, tuple[tuple, tuple, tuple]]]) -> int:
    """The scheduler's max_num_tokens for an engine with these profiles ({input: (min, opt, max)
    shapes}, as the engine reports them): the most packed tokens a profile takes less one token
    for each sequence it takes, so a step of a full chunk beside every decode always fits. T for
    an engine built here (prefill N up to T + S); also right for one whose profile stops at T."""
    best = max(p["tokens"][2][0] - p["seq_slots"][2][0] for p in profiles)
    if best < 1:
        raise KvzapError("the engine's profiles take no prompt token beside a full batch of decodes "
                         "(rebuild it with a larger --max-num-tokens)")
    return best


@dataclass(frozen=True)
class CacheBounds:
    """The largest cache every profile of an engine takes: pool blocks (k_pool dim 0), sequence
    slots (block_table dim 1), block table columns (dim 3) and the tokens those columns hold."""

    num_blocks: int
    max_seqs: int
    max_blocks_per_head: int
    block_size: int

    @property
    def max_seq_len(self) -> int:
        return self.max_blocks_per_head * self.block_size


def cache_bounds(profiles: list[dict[str, tuple[tuple, tuple, tuple]]]) -> CacheBounds:
    """CacheBounds of an engine with these profiles ({input: (min, opt, max) shapes}, as the
    engine reports them): a cache past any of them matches no profile, so every step would fail."""

    def most(name: str, dim: int) -> int:
        return min(p[name][2][dim] for p in profiles)

    return CacheBounds(most("k_pool", 0), most("block_table", 1), most("block_table", 3), most("k_pool", 1))


def select_profile(profiles: list[dict[str, tuple[tuple, tuple, tuple]]], shapes: dict[str, tuple]) -> int:
    """Index of the first profile whose [min, max] holds every input shape of a step, else a
    KvzapError naming the input and dimension that no profile holds."""
    why = ""
    for i, prof in enumerate(profiles):
        bad = _outside(prof, shapes)
        if bad is None:
            return i
        why = bad
    raise KvzapError(f"no optimisation profile of the engine fits this step: {why}")


def _outside(profile: dict, shapes: dict[str, tuple]) -> str | None:
    for name, shape in shapes.items():
        if name not in profile:
            raise KvzapError(f"the engine has no input named {name}")
        lo, _, hi = profile[name]
        if len(shape) != len(lo):
            return f"{name} has {len(shape)} dimensions, the engine's {len(lo)}"
        for axis, (n, a, b) in enumerate(zip(shape, lo, hi)):
            if not a <= n <= b:
                return f"{name} dim {axis} is {n}, outside the engine's range [{a}, {b}]"
    return None
