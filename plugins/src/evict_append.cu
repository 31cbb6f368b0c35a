// kvzapEvict: score-threshold eviction into the per-head paged cache.
// Reference: kvzap_trt/ops/evict_append.py (same arguments, same decisions).
//
// One thread block per (kv head, sequence, layer). For sequence b with c tokens written and T new
// ones, the positions leaving the window are [lo, hi) = [max(0, c-W), max(0, c+T-W)): the first
// come from the ring, the rest straight from the new tokens. Then
//   1. count the kept ones (score >= tau), pop the blocks the head's pages now need off the
//      device free stack (one atomicSub per head) and write their ids into the block table;
//   2. walk the leavers in tiles of blockDim: a block-wide scan gives each kept token its page
//      slot (kept_len + rank), and the tile's kept rows are copied in 16-byte vectors;
//   3. after a barrier (the ring slots just read may be overwritten), the new tokens that stay in
//      the window go into the ring with their scores.
// Nothing is ever moved: kept pages are append-only. Decode (T = 1) leaves at most one token per
// head; batching over layers (L > 1) is one launch for the whole step.

#include "common.cuh"
#include "kvzap_kernels.h"

namespace kvzap {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kThreads) evict_kernel(const kvzapEvictParams p) {
    constexpr int VEC = Vec16<T>::VEC;
    const int h = blockIdx.x, b = blockIdx.y, l = blockIdx.z, tid = threadIdx.x;
    const int H = p.num_kv_heads, D = p.head_dim, W = p.window, bs = p.block_size, M = p.max_blocks_per_head;
    const int start = p.cu_seqlens[b], T_new = p.cu_seqlens[b + 1] - start;
    if (T_new <= 0) return;
    const int s = p.seq_slots[b], c = p.ctx_lens[b];

    const int64_t head = ((int64_t)l * p.num_slots + s) * H + h;  // (layer, slot, kv head)
    int32_t* table = p.block_table + head * M;
    T* ring_k = static_cast<T*>(p.ring_k) + head * W * D;
    T* ring_v = static_cast<T*>(p.ring_v) + head * W * D;
    float* ring_score = p.ring_score + head * W;
    const int64_t layer_rows = (int64_t)l * p.num_rows;
    const T* k_new = static_cast<const T*>(p.k_new) + layer_rows * H * D;
    const T* v_new = static_cast<const T*>(p.v_new) + layer_rows * H * D;
    const float* scores = p.scores + layer_rows * H;
    T* k_pool = static_cast<T*>(p.k_pool);
    T* v_pool = static_cast<T*>(p.v_pool);

    const int lo = max(0, c - W), hi = max(0, c + T_new - W), n_leave = hi - lo;
    // Score of the i-th leaver (position lo + i): from the ring while older than the chunk.
    auto leaver_score = [&](int pos) {
        return pos < c ? ring_score[pos % W] : scores[(int64_t)(start + pos - c) * H + h];
    };
    auto leaver_row = [&](int pos, const T* ring, const T* fresh) {
        return pos < c ? ring + (int64_t)(pos % W) * D : fresh + ((int64_t)(start + pos - c) * H + h) * D;
    };

    __shared__ int scratch[32];
    __shared__ int s_old_len, s_first_new_block, s_ok, s_top;
    __shared__ int s_src_pos[kThreads], s_dst[kThreads];

    // 1. Count, then take blocks.
    int mine = 0;
    for (int i = tid; i < n_leave; i += kThreads) mine += leaver_score(lo + i) >= p.threshold;
    const int n_keep = block_sum(mine, scratch);
    if (tid == 0) {
        const int old_len = p.kept_len[head];
        const int old_blocks = (old_len + bs - 1) / bs, new_blocks = (old_len + n_keep + bs - 1) / bs;
        const int need = new_blocks - old_blocks;
        int ok = 1, top = 0;
        if (new_blocks > M) {
            atomicOr(p.error, KVZAP_ERR_BLOCK_TABLE_FULL);
            ok = 0;
        } else if (need > 0) {
            top = atomicSub(p.num_free, need);
            if (top < need) {  // not enough: give them back, report, touch nothing
                atomicAdd(p.num_free, need);
                atomicOr(p.error, KVZAP_ERR_POOL_EXHAUSTED);
                ok = 0;
            }
        }
        s_old_len = old_len;
        s_first_new_block = old_blocks;
        s_top = top - need;  // this head owns free_stack[s_top, s_top + need)
        s_ok = ok;
        if (ok) p.kept_len[head] = old_len + n_keep;
    }
    __syncthreads();
    if (!s_ok) return;
    {
        const int old_blocks = s_first_new_block;
        const int need = (s_old_len + n_keep + bs - 1) / bs - old_blocks;
        for (int j = tid; j < need; j += kThreads) table[old_blocks + j] = p.free_stack[s_top + j];
    }
    __syncthreads();

    // 2. Scan and copy, one tile of kThreads leavers at a time.
    int written = 0;
    for (int tile = 0; tile < n_leave; tile += kThreads) {
        const int i = tile + tid;
        const int pos = lo + i;
        const int keep = i < n_leave && leaver_score(pos) >= p.threshold;
        int tile_kept;
        const int rank = block_exclusive_scan(keep, scratch, &tile_kept);
        if (keep) {
            s_src_pos[rank] = pos;
            s_dst[rank] = s_old_len + written + rank;
        }
        __syncthreads();
        const int vecs_per_row = D / VEC;
        for (int v = tid; v < tile_kept * vecs_per_row; v += kThreads) {
            const int r = v / vecs_per_row, e = (v % vecs_per_row) * VEC;
            const int src = s_src_pos[r], dst = s_dst[r];
            const int64_t slot = (int64_t)table[dst / bs] * bs + dst % bs;
            *reinterpret_cast<uint4*>(k_pool + slot * D + e) =
                *reinterpret_cast<const uint4*>(leaver_row(src, ring_k, k_new) + e);
            *reinterpret_cast<uint4*>(v_pool + slot * D + e) =
                *reinterpret_cast<const uint4*>(leaver_row(src, ring_v, v_new) + e);
            if (e == 0) p.pos_pool[slot] = src;
        }
        written += tile_kept;
        __syncthreads();  // s_src_pos / s_dst reused by the next tile
    }

    // 3. New tokens that stay in the window take the ring slots of those that left.
    const int stay_lo = max(c, c + T_new - W), n_stay = c + T_new - stay_lo;
    const int vecs_per_row = D / VEC;
    for (int v = tid; v < n_stay * vecs_per_row; v += kThreads) {
        const int pos = stay_lo + v / vecs_per_row, e = (v % vecs_per_row) * VEC;
        const int64_t row = ((int64_t)(start + pos - c) * H + h) * D + e;
        const int64_t slot = (int64_t)(pos % W) * D + e;
        *reinterpret_cast<uint4*>(ring_k + slot) = *reinterpret_cast<const uint4*>(k_new + row);
        *reinterpret_cast<uint4*>(ring_v + slot) = *reinterpret_cast<const uint4*>(v_new + row);
        if (e == 0) ring_score[pos % W] = scores[(int64_t)(start + pos - c) * H + h];
    }
}

template <typename T>
cudaError_t launch(const kvzapEvictParams& p, cudaStream_t stream) {
    if (p.head_dim % Vec16<T>::VEC) return cudaErrorInvalidValue;
    dim3 grid(p.num_kv_heads, p.batch, p.num_layers);
    evict_kernel<T><<<grid, kThreads, 0, stream>>>(p);
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
