// kvzapEvict: score-threshold eviction into the per-head paged cache.
// Reference: kvzap_trt/ops/evict_append.py (same arguments, same decisions).
//
// For sequence b with c tokens written and T new ones, the positions leaving the window of a kv
// head are [lo, hi) = [max(0, c-W), max(0, c+T-W)): the first come from the window, the rest
// straight from the new tokens. The window is pool pages too: window position p is pool row
// ring_table[(p % W) / bs] * bs + (p % W) % bs. Three steps per (layer, sequence, kv head):
//   take   count the kept ones (score >= tau); in one pop off the device free stack, take the
//          blocks the head's kept pages now need and the window pages the window newly reaches
//          (ring table columns [ring_pages(c), ring_pages(c+T))): the kept pages' ids go into the
//          block table, the window pages' (after them on the stack) into the ring table;
//   copy   walk the leavers in tiles of 128: a block-wide scan gives each kept token its page
//          slot (kept_len + rank), the tile's kept rows are copied in 16-byte vectors with their
//          positions and scores;
//   window after a barrier (the window slots just read may be overwritten), the new tokens that
//          stay in the window go into their window slots with their positions and scores.
// Nothing is ever moved: kept pages are append-only.
//
// Three launch shapes, same decisions:
//   decode   (max_new_tokens == 1) one warp per (kv head, sequence, layer), at most one leaver,
//            its independent loads issued up front; a leading layer dimension makes a decode
//            step one launch.
//   fused    one thread block per (kv head, sequence, layer) does all three: short chunks.
//   chunked  long prefills (max T >= kChunkedFrom): one head's leavers are spread over blocks of
//            kChunk each. A plan kernel takes the blocks; a copy kernel per (chunk, head) finds
//            its first page slot by counting the kept scores before its chunk (4 bytes a token
//            against the 2 x D x elem bytes it copies); a commit kernel, once every window read
//            is done, sets kept_len and writes the window.

#include "cache_index.cuh"
#include "common.cuh"
#include "kvzap_kernels.h"

namespace kvzap {
namespace {

constexpr int kThreads = 128;
constexpr int kChunk = 2048;        // leavers per block in the chunked path
constexpr int kChunkedFrom = 4096;  // max new tokens per sequence from which the chunked path runs

// One (layer, sequence, kv head) of a call: its place in every tensor.
template <typename T>
struct Head {
    int start, T_new, c, lo, hi;  // packed row of the first new token; new tokens; context; leavers
    int64_t index;                // (layer, slot, head) in kept_len / block_table / ring_table
    int32_t* table;               // [M] block ids of the kept pages
    int32_t* ring;                // [R] block ids of the window pages
    const float* score_pool;
    const T* k_new;  // this layer's new tokens, row 0, this head
    const T* v_new;
    const float* scores;
    int H, D, W, bs, M;

    __device__ Head(const kvzapEvictParams& p, int h, int b, int l) {
        H = p.num_kv_heads, D = p.head_dim, W = p.window, bs = p.block_size, M = p.max_blocks_per_head;
        start = p.cu_seqlens[b];
        T_new = p.cu_seqlens[b + 1] - start;
        c = p.ctx_lens[b];
        const Leavers leaving = leavers(c, T_new, W);
        lo = leaving.lo;
        hi = leaving.hi;
        index = ((int64_t)l * p.num_slots + p.seq_slots[b]) * H + h;
        table = p.block_table + index * M;
        ring = p.ring_table + index * p.ring_pages;
        score_pool = p.score_pool;
        const int64_t layer_rows = (int64_t)l * p.num_rows;
        k_new = static_cast<const T*>(p.k_new) + (layer_rows * H + h) * D;
        v_new = static_cast<const T*>(p.v_new) + (layer_rows * H + h) * D;
        scores = p.scores + layer_rows * H + h;
    }
    // Pool row of window position pos, whose window page the head holds.
    __device__ int64_t window_row(int pos) const {
        const PageSlot at = ring_page_slot(pos, W, bs);
        return (int64_t)ring[at.column] * bs + at.offset;
    }
    // Leaver at position pos: from the window while older than the chunk, else a new token.
    __device__ float score(int pos) const {
        return pos < c ? score_pool[window_row(pos)] : scores[(int64_t)(start + pos - c) * H];
    }
    __device__ const T* row(int pos, const T* pool, const T* fresh) const {
        return pos < c ? pool + window_row(pos) * D : fresh + (int64_t)(start + pos - c) * H * D;
    }
    __device__ int pages(int tokens) const { return pages_for(tokens, bs); }
    // This call's new window pages are ring table columns [ring_lo(), ring_hi()).
    __device__ int ring_lo() const { return ring_pages(c, W, bs); }
    __device__ int ring_hi() const { return ring_pages(c + T_new, W, bs); }
    // The host's bound on new tokens (max_new_tokens, 0: unknown) is below this head's count: the
    // chunked grid would miss leavers. The head does nothing and reports it.
    __device__ bool over_bound(const kvzapEvictParams& p) const {
        return p.max_new_tokens > 0 && T_new > p.max_new_tokens;
    }
};

// Takes `need` ids off the free stack: returns the index of the first, free_stack[first, first +
// need), or -1 when fewer are free. This loop never takes the counter below zero and a head that
// fails never writes it, so one head's failure cannot make another's ids look free (an atomicSub
// that is given back on failure can: tests/test_free_stack_protocol.py models the protocols). A
// negative count (pop_one's, below) reads as none free.
__device__ int pop_free(int* num_free, int need) {
    int top = atomicAdd(num_free, 0);
    while (top >= need) {
        const int seen = atomicCAS(num_free, top, top - need);
        if (seen == top) return top - need;
        top = seen;
    }
    return -1;
}

// Takes one id (every pop at decode): the index of free_stack[index], or -1 when none is free. One
// fetch-and-subtract per head, where pop_free's loop lets one contending head through per L2
// round trip (thousands of decode heads pop at once at a window page boundary). A head that finds
// none leaves the counter one lower, below zero, and writes nothing; nothing is ever given back, so
// no id is counted free twice, and every reader takes a negative count for what it is, none free
// (the ids below a count that went through zero were all handed out): pop_free's loop, and
// BlockAllocator.num_free / push on the host.
__device__ int pop_one(int* num_free) {
    const int top = atomicSub(num_free, 1);
    return top >= 1 ? top - 1 : -1;
}

// Kept leavers among positions [from, to), summed over the block (every thread gets it).
template <typename T>
__device__ int count_kept(const Head<T>& v, int from, int to, float tau, int* scratch) {
    int mine = 0;
    for (int pos = from + threadIdx.x; pos < to; pos += kThreads) mine += v.score(pos) >= tau;
    return block_sum(mine, scratch);
}

// One pop for the blocks `n_keep` more kept tokens need and the window pages the window newly
// reaches: ids free_stack[top, top + kept_need) go after the head's kept pages in the block
// table, the next ring_hi - ring_lo into ring table columns [ring_lo, ring_hi). Returns false
// (everyone) and sets an error bit, writing nothing, when the table or the pool is too small.
template <typename T>
__device__ bool take_blocks(const kvzapEvictParams& p, const Head<T>& v, int n_keep) {
    __shared__ int s_ok, s_first, s_kept_need, s_need, s_top;
    if (threadIdx.x == 0) {
        const int old_len = p.kept_len[v.index];
        const int old_blocks = v.pages(old_len), new_blocks = v.pages(old_len + n_keep);
        const int kept_need = new_blocks - old_blocks, need = kept_need + v.ring_hi() - v.ring_lo();
        int ok = 1, top = 0;
        if (new_blocks > v.M) {
            atomicOr(p.error, KVZAP_ERR_BLOCK_TABLE_FULL);
            ok = 0;
        } else if (need > 0) {
            top = pop_free(p.num_free, need);
            if (top < 0) {  // not enough: report, touch nothing
                atomicOr(p.error, KVZAP_ERR_POOL_EXHAUSTED);
                ok = 0;
            }
        }
        s_ok = ok, s_first = old_blocks, s_kept_need = kept_need, s_need = need, s_top = top;
    }
    __syncthreads();
    if (!s_ok) return false;
    const int ring_lo = v.ring_lo();
    for (int j = threadIdx.x; j < s_need; j += kThreads) {
        const int32_t id = p.free_stack[s_top + j];
        if (j < s_kept_need) v.table[s_first + j] = id;
        else v.ring[ring_lo + j - s_kept_need] = id;
    }
    __syncthreads();
    return true;
}

// Whether the plan kernel took this head's blocks: it pops the kept and the window pages at once,
// so the last new one (a column past a head's pages is -1) is there unless it failed.
template <typename T>
__device__ bool took_blocks(const Head<T>& v, int old_len, int n_keep) {
    const int old_blocks = v.pages(old_len), new_blocks = v.pages(old_len + n_keep);
    if (new_blocks > v.M) return false;
    if (new_blocks > old_blocks) return v.table[new_blocks - 1] >= 0;
    return v.ring_hi() == v.ring_lo() || v.ring[v.ring_hi() - 1] >= 0;
}

// Copy the kept leavers of [from, to) to page slots first_dst, first_dst + 1, ... in order, with
// their positions and scores. Callers reach it only for heads that took their blocks (the fused
// kernel returns after a failed take_blocks, the copy kernel checks took_blocks); a slot whose
// page is missing (-1, or past the table) is still skipped, as a guard that never fires then.
template <typename T>
__device__ void copy_kept(const kvzapEvictParams& p, const Head<T>& v, int from, int to, int first_dst, int* scratch) {
    constexpr int VEC = Vec16<T>::VEC;
    __shared__ int s_src[kThreads], s_dst[kThreads];
    __shared__ float s_score[kThreads];
    T* k_pool = static_cast<T*>(p.k_pool);
    T* v_pool = static_cast<T*>(p.v_pool);
    const int vecs_per_row = v.D / VEC;
    int written = 0;
    for (int tile = from; tile < to; tile += kThreads) {
        const int pos = tile + threadIdx.x;
        const float score = pos < to ? v.score(pos) : 0.f;
        const int keep = pos < to && score >= p.threshold;
        int tile_kept;
        const int rank = block_exclusive_scan(keep, scratch, &tile_kept);
        if (keep) {
            s_src[rank] = pos;
            s_dst[rank] = first_dst + written + rank;
            s_score[rank] = score;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < tile_kept * vecs_per_row; i += kThreads) {
            const int r = i / vecs_per_row, e = (i % vecs_per_row) * VEC;
            const int src = s_src[r];
            const PageSlot dst = page_slot(s_dst[r], v.bs);
            if (dst.column >= v.M) continue;
            const int32_t block = v.table[dst.column];
            if (block < 0) continue;
            const int64_t slot = (int64_t)block * v.bs + dst.offset;
            *reinterpret_cast<uint4*>(k_pool + slot * v.D + e) = *reinterpret_cast<const uint4*>(v.row(src, k_pool, v.k_new) + e);
            *reinterpret_cast<uint4*>(v_pool + slot * v.D + e) = *reinterpret_cast<const uint4*>(v.row(src, v_pool, v.v_new) + e);
            if (e == 0) {
                p.pos_pool[slot] = src;
                p.score_pool[slot] = s_score[r];
            }
        }
        written += tile_kept;
        __syncthreads();  // s_src / s_dst / s_score reused by the next tile
    }
}

// The new tokens that stay in the window take the window slots of those that left: K, V, position
// and score at their slot's pool row. Call once the head holds its window pages, after a barrier
// that follows every read of the window's leavers.
template <typename T>
__device__ void write_window(const kvzapEvictParams& p, const Head<T>& v) {
    constexpr int VEC = Vec16<T>::VEC;
    T* k_pool = static_cast<T*>(p.k_pool);
    T* v_pool = static_cast<T*>(p.v_pool);
    const int stay_lo = leavers(v.c, v.T_new, v.W).stay_lo, n_stay = v.c + v.T_new - stay_lo;
    const int vecs_per_row = v.D / VEC;
    for (int i = threadIdx.x; i < n_stay * vecs_per_row; i += kThreads) {
        const int pos = stay_lo + i / vecs_per_row, e = (i % vecs_per_row) * VEC;
        const int64_t fresh = v.start + pos - v.c;  // its packed row
        const int64_t slot = v.window_row(pos), src = fresh * v.H * v.D + e;
        *reinterpret_cast<uint4*>(k_pool + slot * v.D + e) = *reinterpret_cast<const uint4*>(v.k_new + src);
        *reinterpret_cast<uint4*>(v_pool + slot * v.D + e) = *reinterpret_cast<const uint4*>(v.v_new + src);
        if (e == 0) {
            p.pos_pool[slot] = pos;
            p.score_pool[slot] = v.scores[fresh * v.H];
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) evict_fused_kernel(const kvzapEvictParams p) {
    const Head<T> v(p, blockIdx.x, blockIdx.y, blockIdx.z);
    if (v.T_new <= 0) return;
    if (v.over_bound(p)) {
        if (threadIdx.x == 0) atomicOr(p.error, KVZAP_ERR_BOUND_EXCEEDED);
        return;
    }
    __shared__ int scratch[32];
    const int n_keep = count_kept(v, v.lo, v.hi, p.threshold, scratch);
    const int old_len = p.kept_len[v.index];
    if (!take_blocks(p, v, n_keep)) return;
    copy_kept(p, v, v.lo, v.hi, old_len, scratch);
    if (threadIdx.x == 0) p.kept_len[v.index] = old_len + n_keep;
    write_window(p, v);  // after a barrier: copy_kept's last one, or take_blocks' with no leavers
}

// Decode: every sequence brings at most one token (max_new_tokens == 1), so a head has at most
// one leaver, needs at most one kept page or one window page (never both: a kept page needs
// c >= W, a window page c < W), and copies at most one row. A warp per (layer, sequence, kv head),
// kThreads / 32 heads per block: every read (kept_len and the kept page the row would go to; the
// leaver's window page id, then its score and row) is issued before any decision, lane 0 pops
// the free stack, and the row is copied one 16-byte vector per lane. Same decisions, pops and
// writes as evict_fused_kernel (an independent review emulated both against the reference).
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kDecodeVecs = 2;  // 16-byte vectors of a row per lane: head_dim up to 64 x VEC (the launcher checks)

template <typename T>
__global__ void __launch_bounds__(kThreads) evict_decode_kernel(const kvzapEvictParams p) {
    constexpr int VEC = Vec16<T>::VEC;
    const int lane = threadIdx.x & 31, H = p.num_kv_heads;
    const int64_t head = (int64_t)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);  // warp-uniform
    if (head >= (int64_t)p.num_layers * p.batch * H) return;
    const Head<T> v(p, (int)(head % H), (int)(head / H % p.batch), (int)(head / ((int64_t)H * p.batch)));
    if (v.T_new <= 0) return;
    if (v.T_new > 1) {  // the host said decode: a longer chunk would be missed
        if (lane == 0) atomicOr(p.error, KVZAP_ERR_BOUND_EXCEEDED);
        return;
    }
    // Everything read before anything is written (the new token's window slot is the leaver's).
    const int old_len = p.kept_len[v.index];
    const bool leaves = v.hi > v.lo;  // position lo leaves: from the window (c >= W > 0) or the new token (W = 0)
    const float score = leaves ? v.score(v.lo) : 0.f;
    const bool keep = leaves && score >= p.threshold;
    const PageSlot dst = page_slot(old_len, v.bs);  // where a kept row goes
    const int kept_need = keep && dst.offset == 0;  // a new kept page
    const int ring_need = v.ring_hi() - v.ring_lo();  // 0 or 1: the window reaches a new page
    const int32_t old_page = keep && !kept_need && dst.column < v.M ? v.table[dst.column] : -1;
    uint4 k_row[kDecodeVecs], v_row[kDecodeVecs];  // the leaver's row, vectors lane, lane + 32
    if (keep) {
        const T* k_src = v.row(v.lo, static_cast<const T*>(p.k_pool), v.k_new);
        const T* v_src = v.row(v.lo, static_cast<const T*>(p.v_pool), v.v_new);
#pragma unroll
        for (int i = 0; i < kDecodeVecs; ++i) {
            const int e = (lane + 32 * i) * VEC;
            if (e < v.D) {
                k_row[i] = *reinterpret_cast<const uint4*>(k_src + e);
                v_row[i] = *reinterpret_cast<const uint4*>(v_src + e);
            }
        }
    }
    __syncwarp();  // every read of the leaver (its window slot is the new token's) before any write

    int top = 0, ok = 1;
    if (lane == 0) {
        if (keep && dst.column >= v.M) {
            atomicOr(p.error, KVZAP_ERR_BLOCK_TABLE_FULL);
            ok = 0;
        } else if (kept_need + ring_need > 0) {  // one page (never both: kept needs c >= W, window c < W)
            top = kept_need + ring_need == 1 ? pop_one(p.num_free) : pop_free(p.num_free, kept_need + ring_need);
            if (top < 0) {  // not enough: report, touch nothing
                atomicOr(p.error, KVZAP_ERR_POOL_EXHAUSTED);
                ok = 0;
            }
        }
    }
    ok = __shfl_sync(0xffffffffu, ok, 0);
    if (!ok) return;
    top = __shfl_sync(0xffffffffu, top, 0);
    const int32_t kept_page = kept_need ? p.free_stack[top] : old_page;
    const int32_t ring_page = ring_need ? p.free_stack[top + kept_need] : -1;
    if (lane == 0) {
        if (kept_need) v.table[dst.column] = kept_page;
        if (ring_need) v.ring[v.ring_lo()] = ring_page;
        p.kept_len[v.index] = old_len + keep;
    }
    T* k_pool = static_cast<T*>(p.k_pool);
    T* v_pool = static_cast<T*>(p.v_pool);
    if (keep) {
        const int64_t slot = (int64_t)kept_page * v.bs + dst.offset;
#pragma unroll
        for (int i = 0; i < kDecodeVecs; ++i) {
            const int e = (lane + 32 * i) * VEC;
            if (e < v.D) {
                *reinterpret_cast<uint4*>(k_pool + slot * v.D + e) = k_row[i];
                *reinterpret_cast<uint4*>(v_pool + slot * v.D + e) = v_row[i];
            }
        }
        if (lane == 0) {
            p.pos_pool[slot] = v.lo;
            p.score_pool[slot] = score;
        }
    }
    if (v.W > 0) {  // the new token (position c) takes window slot c % W
        const PageSlot at = ring_page_slot(v.c, v.W, v.bs);
        const int32_t page = ring_need && at.column == v.ring_lo() ? ring_page : v.ring[at.column];
        const int64_t slot = (int64_t)page * v.bs + at.offset;
        for (int e = lane * VEC; e < v.D; e += 32 * VEC) {
            *reinterpret_cast<uint4*>(k_pool + slot * v.D + e) =
                *reinterpret_cast<const uint4*>(v.k_new + (int64_t)v.start * v.H * v.D + e);
            *reinterpret_cast<uint4*>(v_pool + slot * v.D + e) =
                *reinterpret_cast<const uint4*>(v.v_new + (int64_t)v.start * v.H * v.D + e);
        }
        if (lane == 0) {
            p.pos_pool[slot] = v.c;
            p.score_pool[slot] = v.scores[(int64_t)v.start * v.H];
        }
    }
}

// (kThreads, 1): with the default occupancy target ptxas spilled 4 bytes here.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) evict_plan_kernel(const kvzapEvictParams p) {
    const Head<T> v(p, blockIdx.x, blockIdx.y, blockIdx.z);
    if (v.T_new <= 0) return;
    if (v.over_bound(p)) {  // copy and commit skip this head too
        if (threadIdx.x == 0) atomicOr(p.error, KVZAP_ERR_BOUND_EXCEEDED);
        return;
    }
    __shared__ int scratch[32];
    take_blocks(p, v, count_kept(v, v.lo, v.hi, p.threshold, scratch));
}

// grid.x = heads x chunks: block (h, chunk) copies leavers [lo + chunk * kChunk, +kChunk). The
// window is only read here (every chunk may count the window leavers' scores).
// (kThreads, 8) here and in commit: with the default occupancy target, ptxas (nvcc 13, sm_90a)
// held these to 32 registers and spilled.
template <typename T>
__global__ void __launch_bounds__(kThreads, 8) evict_copy_kernel(const kvzapEvictParams p) {
    const int h = blockIdx.x % p.num_kv_heads, chunk = blockIdx.x / p.num_kv_heads;
    const Head<T> v(p, h, blockIdx.y, blockIdx.z);
    const Chunk mine = leaver_chunk(chunk, kChunk, v.lo, v.hi);
    if (v.T_new <= 0 || v.over_bound(p) || (chunk > 0 && mine.from >= mine.to)) return;
    __shared__ int scratch[32];
    // A head whose plan failed writes nothing, not even into its partly filled last page (the
    // reference takes and writes nothing): count all its leavers (4 bytes each) to know.
    const int old_len = p.kept_len[v.index];  // commit, a later launch, updates it
    if (!took_blocks(v, old_len, count_kept(v, v.lo, v.hi, p.threshold, scratch))) return;
    const int before = count_kept(v, v.lo, mine.from, p.threshold, scratch);
    copy_kept(p, v, mine.from, mine.to, old_len + before, scratch);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 8) evict_commit_kernel(const kvzapEvictParams p) {
    const Head<T> v(p, blockIdx.x, blockIdx.y, blockIdx.z);
    if (v.T_new <= 0 || v.over_bound(p)) return;
    __shared__ int scratch[32];
    __shared__ int s_took;
    const int n_keep = count_kept(v, v.lo, v.hi, p.threshold, scratch);
    if (threadIdx.x == 0) {
        const int old_len = p.kept_len[v.index];
        s_took = took_blocks(v, old_len, n_keep);
        if (s_took) p.kept_len[v.index] = old_len + n_keep;
    }
    __syncthreads();  // also after every window read of this block (count_kept)
    if (s_took) write_window(p, v);  // a head whose plan failed writes nothing
}

template <typename T>
cudaError_t launch(const kvzapEvictParams& p, cudaStream_t stream) {
    if (p.head_dim % Vec16<T>::VEC) return cudaErrorInvalidValue;
    if (p.max_new_tokens == 1 && p.head_dim <= kDecodeVecs * 32 * Vec16<T>::VEC) {  // decode: a 1-D grid
        const int64_t heads = (int64_t)p.num_layers * p.batch * p.num_kv_heads;
        evict_decode_kernel<T><<<(unsigned)((heads + kWarpsPerBlock - 1) / kWarpsPerBlock), kThreads, 0, stream>>>(p);
        return cudaGetLastError();
    }
    if (p.batch > kMaxGridYZ || p.num_layers > kMaxGridYZ) return cudaErrorInvalidValue;  // the grid's y and z
    const dim3 grid(p.num_kv_heads, p.batch, p.num_layers);
    if (p.max_new_tokens < kChunkedFrom) {
        evict_fused_kernel<T><<<grid, kThreads, 0, stream>>>(p);
        return cudaGetLastError();
    }
    const int chunks = (p.max_new_tokens + kChunk - 1) / kChunk;
    evict_plan_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    evict_copy_kernel<T><<<dim3(p.num_kv_heads * chunks, p.batch, p.num_layers), kThreads, 0, stream>>>(p);
    evict_commit_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace
}  // namespace kvzap

extern "C" cudaError_t kvzapEvict(const kvzapEvictParams* p, cudaStream_t stream) {
    if (p->batch == 0 || p->num_layers == 0 || p->num_kv_heads == 0) return cudaSuccess;
    switch (p->dtype) {
        case KVZAP_FLOAT32: return kvzap::launch<float>(*p, stream);
        case KVZAP_FLOAT16: return kvzap::launch<__half>(*p, stream);
        case KVZAP_BFLOAT16: return kvzap::launch<__nv_bfloat16>(*p, stream);
    }
    return cudaErrorInvalidValue;
}
