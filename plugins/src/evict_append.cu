// kvzapEvict: score-threshold eviction into the per-head paged cache.
// Reference: kvzap_trt/ops/evict_append.py (same arguments, same decisions).
//
// For sequence b with c tokens written and T new ones, the positions leaving the window of a kv
// head are [lo, hi) = [max(0, c-W), max(0, c+T-W)): the first come from the ring, the rest
// straight from the new tokens. Three steps per (layer, sequence, kv head):
//   take   count the kept ones (score >= tau), pop the blocks the head's pages now need off the
//          device free stack (one atomicSub per head), write their ids into the block table;
//   copy   walk the leavers in tiles of 128: a block-wide scan gives each kept token its page
//          slot (kept_len + rank), the tile's kept rows are copied in 16-byte vectors;
//   ring   after a barrier (the ring slots just read may be overwritten), the new tokens that
//          stay in the window go into the ring with their scores.
// Nothing is ever moved: kept pages are append-only.
//
// Two launch shapes, same decisions:
//   fused    one thread block per (kv head, sequence, layer) does all three. Decode (T = 1: at
//            most one leaver per head) and short chunks; a leading layer dimension makes a
//            decode step one launch.
//   chunked  long prefills (max T >= kChunkedFrom): one head's leavers are spread over blocks of
//            kChunk each. A plan kernel takes the blocks; a copy kernel per (chunk, head) finds
//            its first page slot by counting the kept scores before its chunk (4 bytes a token
//            against the 2 x D x elem bytes it copies); a commit kernel, once every ring read is
//            done, sets kept_len and rewrites the ring.

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
    int64_t index;                // (layer, slot, head) in kept_len / block_table / rings
    int32_t* table;
    T* ring_k;
    T* ring_v;
    float* ring_score;
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
        ring_k = static_cast<T*>(p.ring_k) + index * W * D;
        ring_v = static_cast<T*>(p.ring_v) + index * W * D;
        ring_score = p.ring_score + index * W;
        const int64_t layer_rows = (int64_t)l * p.num_rows;
        k_new = static_cast<const T*>(p.k_new) + (layer_rows * H + h) * D;
        v_new = static_cast<const T*>(p.v_new) + (layer_rows * H + h) * D;
        scores = p.scores + layer_rows * H + h;
    }
    // Leaver at position pos: from the ring while older than the chunk, else a new token.
    __device__ float score(int pos) const {
        return pos < c ? ring_score[ring_slot(pos, W)] : scores[(int64_t)(start + pos - c) * H];
    }
    __device__ int pages(int tokens) const { return pages_for(tokens, bs); }
    __device__ const T* row(int pos, const T* ring, const T* fresh) const {
        return pos < c ? ring + (int64_t)ring_slot(pos, W) * D : fresh + (int64_t)(start + pos - c) * H * D;
    }
    // The host's bound on new tokens (max_new_tokens, 0: unknown) is below this head's count: the
    // chunked grid would miss leavers. The head does nothing and reports it.
    __device__ bool over_bound(const kvzapEvictParams& p) const {
        return p.max_new_tokens > 0 && T_new > p.max_new_tokens;
    }
};

// Takes `need` ids off the free stack: returns the index of the first, free_stack[first, first +
// need), or -1 when fewer are free. The counter never goes below zero and a head that fails never
// writes it, so one head's failure cannot make another's ids look free (an atomicSub that is
// given back on failure can: tests/test_free_stack_protocol.py models both protocols).
__device__ int pop_free(int* num_free, int need) {
    int top = atomicAdd(num_free, 0);
    while (top >= need) {
        const int seen = atomicCAS(num_free, top, top - need);
        if (seen == top) return top - need;
        top = seen;
    }
    return -1;
}

// Kept leavers among positions [from, to), summed over the block (every thread gets it).
template <typename T>
__device__ int count_kept(const Head<T>& v, int from, int to, float tau, int* scratch) {
    int mine = 0;
    for (int pos = from + threadIdx.x; pos < to; pos += kThreads) mine += v.score(pos) >= tau;
    return block_sum(mine, scratch);
}

// Pop the blocks `n_keep` more tokens need and write their ids after the head's pages. Returns
// false (everyone) and sets an error bit when the table or the pool is too small.
template <typename T>
__device__ bool take_blocks(const kvzapEvictParams& p, const Head<T>& v, int n_keep) {
    __shared__ int s_ok, s_first, s_need, s_top;
    if (threadIdx.x == 0) {
        const int old_len = p.kept_len[v.index];
        const int old_blocks = v.pages(old_len), new_blocks = v.pages(old_len + n_keep);
        const int need = new_blocks - old_blocks;
        int ok = 1, first = 0;
        if (new_blocks > v.M) {
            atomicOr(p.error, KVZAP_ERR_BLOCK_TABLE_FULL);
            ok = 0;
        } else if (need > 0) {
            first = pop_free(p.num_free, need);
            if (first < 0) {  // not enough: report, touch nothing
                atomicOr(p.error, KVZAP_ERR_POOL_EXHAUSTED);
                ok = 0;
            }
        }
        s_ok = ok, s_first = old_blocks, s_need = need, s_top = first;  // ids free_stack[s_top, +need)
    }
    __syncthreads();
    if (!s_ok) return false;
    for (int j = threadIdx.x; j < s_need; j += kThreads) v.table[s_first + j] = p.free_stack[s_top + j];
    __syncthreads();
    return true;
}

// Copy the kept leavers of [from, to) to page slots first_dst, first_dst + 1, ... in order.
// A slot whose page is missing (-1, or past the table: its head failed to take blocks) is skipped.
template <typename T>
__device__ void copy_kept(const kvzapEvictParams& p, const Head<T>& v, int from, int to, int first_dst, int* scratch) {
    constexpr int VEC = Vec16<T>::VEC;
    __shared__ int s_src[kThreads], s_dst[kThreads];
    T* k_pool = static_cast<T*>(p.k_pool);
    T* v_pool = static_cast<T*>(p.v_pool);
    const int vecs_per_row = v.D / VEC;
    int written = 0;
    for (int tile = from; tile < to; tile += kThreads) {
        const int pos = tile + threadIdx.x;
        const int keep = pos < to && v.score(pos) >= p.threshold;
        int tile_kept;
        const int rank = block_exclusive_scan(keep, scratch, &tile_kept);
        if (keep) {
            s_src[rank] = pos;
            s_dst[rank] = first_dst + written + rank;
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
            *reinterpret_cast<uint4*>(k_pool + slot * v.D + e) = *reinterpret_cast<const uint4*>(v.row(src, v.ring_k, v.k_new) + e);
            *reinterpret_cast<uint4*>(v_pool + slot * v.D + e) = *reinterpret_cast<const uint4*>(v.row(src, v.ring_v, v.v_new) + e);
            if (e == 0) p.pos_pool[slot] = src;
        }
        written += tile_kept;
        __syncthreads();  // s_src / s_dst reused by the next tile
    }
}

// The new tokens that stay in the window take the ring slots of those that left. Call after a
// barrier that follows every read of the ring's leavers.
template <typename T>
__device__ void write_ring(const Head<T>& v) {
    constexpr int VEC = Vec16<T>::VEC;
    const int stay_lo = leavers(v.c, v.T_new, v.W).stay_lo, n_stay = v.c + v.T_new - stay_lo;
    const int vecs_per_row = v.D / VEC;
    for (int i = threadIdx.x; i < n_stay * vecs_per_row; i += kThreads) {
        const int pos = stay_lo + i / vecs_per_row, e = (i % vecs_per_row) * VEC;
        const int64_t row = (int64_t)(v.start + pos - v.c) * v.H * v.D + e;
        const int64_t slot = (int64_t)ring_slot(pos, v.W) * v.D + e;
        *reinterpret_cast<uint4*>(v.ring_k + slot) = *reinterpret_cast<const uint4*>(v.k_new + row);
        *reinterpret_cast<uint4*>(v.ring_v + slot) = *reinterpret_cast<const uint4*>(v.v_new + row);
        if (e == 0) v.ring_score[ring_slot(pos, v.W)] = v.scores[(int64_t)(v.start + pos - v.c) * v.H];
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
    write_ring(v);  // copy_kept ends with a barrier
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
// ring is only read here (every chunk may count the ring leavers' scores).
template <typename T>
__global__ void __launch_bounds__(kThreads) evict_copy_kernel(const kvzapEvictParams p) {
    const int h = blockIdx.x % p.num_kv_heads, chunk = blockIdx.x / p.num_kv_heads;
    const Head<T> v(p, h, blockIdx.y, blockIdx.z);
    const Chunk mine = leaver_chunk(chunk, kChunk, v.lo, v.hi);
    if (v.T_new <= 0 || v.over_bound(p) || (chunk > 0 && mine.from >= mine.to)) return;
    __shared__ int scratch[32];
    const int before = count_kept(v, v.lo, mine.from, p.threshold, scratch);
    copy_kept(p, v, mine.from, mine.to, p.kept_len[v.index] + before, scratch);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) evict_commit_kernel(const kvzapEvictParams p) {
    const Head<T> v(p, blockIdx.x, blockIdx.y, blockIdx.z);
    if (v.T_new <= 0 || v.over_bound(p)) return;
    __shared__ int scratch[32];
    const int n_keep = count_kept(v, v.lo, v.hi, p.threshold, scratch);
    if (threadIdx.x == 0) {
        const int old_len = p.kept_len[v.index];
        const int old_blocks = v.pages(old_len), new_blocks = v.pages(old_len + n_keep);
        // The plan took the blocks unless it failed, and then the last new page is missing.
        if (new_blocks <= v.M && (new_blocks == old_blocks || v.table[new_blocks - 1] >= 0))
            p.kept_len[v.index] = old_len + n_keep;
    }
    write_ring(v);  // count_kept's barrier follows every ring read of this block
}

template <typename T>
cudaError_t launch(const kvzapEvictParams& p, cudaStream_t stream) {
    if (p.head_dim % Vec16<T>::VEC) return cudaErrorInvalidValue;
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
