// The host side of cache_index.cuh behind the C ABI: the exact functions the kernels call, so
// tests/test_cache_index.py checks them against the PyTorch references without a GPU.

#include "cache_index.cuh"
#include "kvzap_kernels.h"

using namespace kvzap;

extern "C" void kvzapIndexLeavers(int ctx, int new_tokens, int window, int* lo, int* hi, int* stay_lo) {
    const Leavers r = leavers(ctx, new_tokens, window);
    *lo = r.lo, *hi = r.hi, *stay_lo = r.stay_lo;
}

extern "C" int kvzapIndexRingSlot(int pos, int window) { return ring_slot(pos, window); }

extern "C" void kvzapIndexRingPageSlot(int pos, int window, int block_size, int* column, int* offset) {
    const PageSlot r = ring_page_slot(pos, window, block_size);
    *column = r.column, *offset = r.offset;
}

extern "C" int kvzapIndexRingPages(int ctx, int window, int block_size) { return ring_pages(ctx, window, block_size); }

extern "C" void kvzapIndexPageSlot(int dst, int block_size, int* column, int* offset) {
    const PageSlot r = page_slot(dst, block_size);
    *column = r.column, *offset = r.offset;
}

extern "C" int kvzapIndexRowKeys(int kept, int ctx, int window, int t) { return row_keys(kept, ctx, window, t); }

extern "C" void kvzapIndexLocateKey(int j, int kept, int ring, int* source, int* index) {
    const KeyRef r = locate_key(j, kept, ring);
    *source = r.source, *index = r.index;
}

extern "C" void kvzapIndexSplitKeys(int split, int split_size, int n_keys, int kept, int block_size, int* begin,
                                    int* end, int* page_lo, int* page_hi) {
    const SplitKeys r = split_keys(split, split_size, n_keys, kept, block_size);
    *begin = r.begin, *end = r.end, *page_lo = r.page_lo, *page_hi = r.page_hi;
}

extern "C" int kvzapIndexNumSplits(int max_keys, int split_size) { return num_splits(max_keys, split_size); }

extern "C" void kvzapIndexLeaverChunk(int chunk, int chunk_size, int lo, int hi, int* from, int* to) {
    const Chunk r = leaver_chunk(chunk, chunk_size, lo, hi);
    *from = r.from, *to = r.to;
}

extern "C" int kvzapIndexRowSequence(const int32_t* cu_seqlens, int batch, int row) {
    return row_sequence(cu_seqlens, batch, row);
}

extern "C" int kvzapIndexRowGroups(int num_rows, int batch, int tokens_per_group) {
    return row_groups(num_rows, batch, tokens_per_group);
}

extern "C" void kvzapIndexRowGroup(const int32_t* cu_seqlens, int batch, int tokens_per_group, int group, int* seq,
                                   int* t_lo, int* t_hi) {
    const RowGroup r = row_group(cu_seqlens, batch, tokens_per_group, group);
    *seq = r.seq, *t_lo = r.t_lo, *t_hi = r.t_hi;
}

extern "C" void kvzapIndexStagedKey(int j, int split, int split_size, int n_keys, int kept, int ring, int block_size,
                                    int* source, int* column, int* offset, int* ring_lo, int* ring_hi,
                                    int* max_staged) {
    const SplitKeys keys = split_keys(split, split_size, n_keys, kept, block_size);
    const SplitRing window = split_ring(keys, kept, ring, block_size);
    const KeyRef key = locate_key(j, kept, ring);
    *source = key.source, *ring_lo = window.ring_lo, *ring_hi = window.ring_hi;
    *max_staged = max_staged_pages(split_size, block_size);
    *column = *offset = -1;
    if (key.source != kKeyNew) {
        const PageSlot at = staged_slot(key, keys, window, block_size);
        *column = at.column, *offset = at.offset;
    }
}

// Tile i of a split (the tensor-core path's order): source, first source index, the source's
// valid range [lo, hi), and the split's tile count.
extern "C" void kvzapIndexSplitTile(int i, int split, int split_size, int n_keys, int kept, int ring, int t,
                                    int* source, int* first, int* lo, int* hi, int* num_tiles) {
    const SplitKeys keys = split_keys(split, split_size, n_keys, kept, 1);
    const SplitTiles tiles = split_tiles(keys, kept, ring, t);
    const TileRef tile = tile_ref(tiles, i);
    *source = tile.source, *first = tile.first, *lo = tile.range.lo, *hi = tile.range.hi;
    *num_tiles = tiles.kept_tiles + tiles.ring_tiles + tiles.fresh_tiles;
}
