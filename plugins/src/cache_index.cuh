// Index arithmetic of the kvzap-trt kernels, callable on host and device.
//
// Every position, slot, key and bound the kernels compute goes through these functions, and the
// same functions are exported to the host through the C ABI (kvzapIndex* in index_abi.cu) so that
// CI checks them against the PyTorch references on many random cases without a GPU
// (tests/test_cache_index.py). Semantics: kvzap_trt/ops/evict_append.py and paged_attention.py.
#pragma once

#ifdef __CUDACC__
#define KVZAP_HD __host__ __device__ __forceinline__
#else
#define KVZAP_HD inline
#endif

namespace kvzap {

KVZAP_HD int imax(int a, int b) { return a > b ? a : b; }
KVZAP_HD int imin(int a, int b) { return a < b ? a : b; }

// Pages of `bs` tokens that hold `tokens` tokens.
KVZAP_HD int pages_for(int tokens, int bs) { return (tokens + bs - 1) / bs; }

// A head with c tokens written takes T new ones, window W. Positions [lo, hi) leave the window
// (the first, [lo, min(c, hi)), come from the window's pages; the rest are new tokens); the new
// tokens [stay_lo, c + T) stay in it.
struct Leavers {
    int lo, hi, stay_lo;
};
KVZAP_HD Leavers leavers(int c, int T, int W) {
    return Leavers{imax(0, c - W), imax(0, c + T - W), imax(c, c + T - W)};
}

// Window slot of absolute position pos (W > 0).
KVZAP_HD int ring_slot(int pos, int W) { return pos % W; }

// The dst-th token of a head's kept pages sits in block table column dst / bs, offset dst % bs.
// Likewise window slot i sits in ring table column i / bs, offset i % bs.
struct PageSlot {
    int column, offset;
};
KVZAP_HD PageSlot page_slot(int dst, int bs) { return PageSlot{dst / bs, dst % bs}; }

// The window lives in pool pages too. A head with c tokens written holds ring_pages(c, W, bs)
// window pages, ring table columns [0, ring_pages); a call that brings it from c to c + T tokens
// takes the columns [ring_pages(c), ring_pages(c + T)).
KVZAP_HD int ring_pages(int c, int W, int bs) { return pages_for(imin(c, W), bs); }

// Window position pos (W > 0): ring table column and offset of its window slot pos % W.
KVZAP_HD PageSlot ring_page_slot(int pos, int W, int bs) { return page_slot(ring_slot(pos, W), bs); }

// Keys of attention row t (0-based among its sequence's new tokens) for one kv head, in order:
// [0, kept) kept pages, [kept, kept + r) window slots 0..r-1 (r = min(c, W)), then new tokens 0..t.
enum KeySource { kKeyPage = 0, kKeyRing = 1, kKeyNew = 2 };
struct KeyRef {
    int source;  // KeySource
    int index;   // kept-token index, window slot, or new-token offset
};
KVZAP_HD int ring_keys(int c, int W) { return imin(c, W); }
KVZAP_HD int row_keys(int kept, int c, int W, int t) { return kept + ring_keys(c, W) + t + 1; }
KVZAP_HD KeyRef locate_key(int j, int kept, int r) {
    if (j < kept) return KeyRef{kKeyPage, j};
    if (j < kept + r) return KeyRef{kKeyRing, j - kept};
    return KeyRef{kKeyNew, j - kept - r};
}

// Split `split` of a row covers keys [begin, end) (empty when begin >= end); its kept-page keys
// lie in table columns [page_lo, page_hi), the ids the kernel stages in shared memory.
struct SplitKeys {
    int begin, end, page_lo, page_hi;
};
KVZAP_HD SplitKeys split_keys(int split, int split_size, int n_keys, int kept, int bs) {
    const int begin = split * split_size, end = imin(n_keys, begin + split_size);
    const int page_lo = begin / bs;
    const int page_hi = kept > begin ? (imin(end, kept) - 1) / bs + 1 : page_lo;
    return SplitKeys{begin, end, page_lo, page_hi};
}

// The split's window keys, window slots [max(begin, kept), min(end, kept + r)) - kept, lie in
// ring table columns [ring_lo, ring_hi) (empty: 0, 0).
struct SplitRing {
    int ring_lo, ring_hi;
};
KVZAP_HD SplitRing split_ring(const SplitKeys& keys, int kept, int r, int bs) {
    const int first = imax(keys.begin, kept) - kept, last = imin(keys.end, kept + r) - kept;
    return first < last ? SplitRing{first / bs, (last - 1) / bs + 1} : SplitRing{0, 0};
}

// A split stages the ids of its kept pages (table columns [page_lo, page_hi)) and then of its
// window pages (ring columns [ring_lo, ring_hi)) in one array; a cached key (source kKeyPage or
// kKeyRing) is the pool row staged[column] * bs + offset. At most split_size / bs + 3 ids.
KVZAP_HD PageSlot staged_slot(const KeyRef& key, const SplitKeys& keys, const SplitRing& ring, int bs) {
    const int shift = key.source == kKeyPage ? -keys.page_lo : keys.page_hi - keys.page_lo - ring.ring_lo;
    return page_slot(key.index + shift * bs, bs);
}
KVZAP_HD int max_staged_pages(int split_size, int bs) { return split_size / bs + 3; }

// The tensor-core attention path walks a split's keys in tiles of kTileKeys keys, one source at a
// time (kept pages, then window, then new tokens) so that no per-key branch picks the source.
// Tiles are aligned in the source's own index; a tile's keys outside the split are masked.
constexpr int kTileKeys = 16;

// Split keys [begin, end) of one source whose keys are the row's [from, from + count): source
// indices [lo, hi) (empty: lo >= hi).
struct SourceRange {
    int lo, hi;
};
KVZAP_HD SourceRange source_range(const SplitKeys& keys, int from, int count) {
    return SourceRange{imax(keys.begin, from) - from, imin(keys.end, from + count) - from};
}
KVZAP_HD int range_tiles(const SourceRange& s) { return s.lo < s.hi ? (s.hi - 1) / kTileKeys - s.lo / kTileKeys + 1 : 0; }

// The split's tiles, kept first, then window, then new tokens (row t among its sequence's new
// tokens). Tile i: its source (KeySource), the source index of its first key (a multiple of
// kTileKeys), and the source's range within the split; key first + c is valid for lo <= first + c < hi.
struct SplitTiles {
    SourceRange kept, ring, fresh;
    int kept_tiles, ring_tiles, fresh_tiles;
};
KVZAP_HD SplitTiles split_tiles(const SplitKeys& keys, int kept, int r, int t) {
    SplitTiles s;
    s.kept = source_range(keys, 0, kept);
    s.ring = source_range(keys, kept, r);
    s.fresh = source_range(keys, kept + r, t + 1);
    s.kept_tiles = range_tiles(s.kept), s.ring_tiles = range_tiles(s.ring), s.fresh_tiles = range_tiles(s.fresh);
    return s;
}
struct TileRef {
    int source, first;
    SourceRange range;
};
KVZAP_HD TileRef tile_ref(const SplitTiles& s, int i) {
    if (i < s.kept_tiles) return TileRef{kKeyPage, (s.kept.lo / kTileKeys + i) * kTileKeys, s.kept};
    i -= s.kept_tiles;
    if (i < s.ring_tiles) return TileRef{kKeyRing, (s.ring.lo / kTileKeys + i) * kTileKeys, s.ring};
    i -= s.ring_tiles;
    return TileRef{kKeyNew, (s.fresh.lo / kTileKeys + i) * kTileKeys, s.fresh};
}

// Splits a launch needs so that every row's keys are covered.
KVZAP_HD int num_splits(int max_keys, int split_size) { return imax(1, (max_keys + split_size - 1) / split_size); }

// Chunk `chunk` of a head's leavers [lo, hi) in the chunked evict path: [from, to), empty past hi.
struct Chunk {
    int from, to;
};
KVZAP_HD Chunk leaver_chunk(int chunk, int chunk_size, int lo, int hi) {
    const int from = lo + chunk * chunk_size;
    return Chunk{from, imax(from, imin(hi, from + chunk_size))};
}

// Packed row n -> its sequence: the last b with cu_seqlens[b] <= n (cu_seqlens [batch + 1]).
KVZAP_HD int row_sequence(const int* cu_seqlens, int batch, int n) {
    int lo = 0, hi = batch - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (cu_seqlens[mid] <= n) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Row groups of the tensor-core attention's packed launch (a step where some sequence brings
// several new tokens: prefill, chunks): a thread block takes up to P consecutive new tokens of one
// sequence, so the P x G query rows of its kv head share every key it reads (P = 16 / G fills the
// mma's 16 rows). Sequence b's tokens sit at virtual rows vstart(b) + t, vstart(b) = cu_seqlens[b]
// + b (P - 1), and group i covers virtual rows [i P, i P + P): the P - 1 rows between two sequences
// keep a group inside one, and a decode-only batch (every T_b = 1) gets one group per sequence.
KVZAP_HD int row_groups(int num_rows, int batch, int P) { return (num_rows + batch * (P - 1) + P - 1) / P; }
// Group i: tokens [t_lo, t_hi) of sequence `seq` (none when t_lo >= t_hi: the group lies between
// sequences). P >= 2, batch >= 1.
struct RowGroup {
    int seq, t_lo, t_hi;
};
KVZAP_HD RowGroup row_group(const int* cu_seqlens, int batch, int P, int i) {
    const int v_lo = i * P, v_hi = v_lo + P;
    int lo = 0, hi = batch - 1;  // the last b with vstart(b) < v_hi: no other sequence can reach the group
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (cu_seqlens[mid] + mid * (P - 1) < v_hi) lo = mid; else hi = mid - 1;
    }
    const int start = cu_seqlens[lo] + lo * (P - 1), T = cu_seqlens[lo + 1] - cu_seqlens[lo];
    return RowGroup{lo, imax(v_lo, start) - start, imin(v_hi, start + T) - start};
}

}  // namespace kvzap
