// kvzapVarlenPagedAttention: attention over per-head variable-length pages + window pages + new tokens.
// Reference: kvzap_trt/ops/paged_attention.py (same arguments; fp32 accumulation, one rounding).
//
// Keys of row n (sequence b, slot s, t-th new token) for kv head h, in this order:
//   [0, kept)              the head's kept pages   (kept = kept_len[s, h], pages block_table[s, h, :])
//   [kept, kept + r)       the window slots 0..r-1 (r = min(c_b, W), pages ring_table[s, h, :])
//   [kept + r, ... + t+1)  the sequence's new tokens up to n itself (causal)
// Grid (row, kv head, split): one thread block serves the whole query group of its kv head, so
// each key is read once per row for all G query heads. A split covers `split_size` keys; the ids
// of its kept pages, then of its window pages, are staged in shared memory first, so a cached key
// of either kind is pool row staged id * bs + offset. Inside, a warp reads TY keys at a time,
// TX = D/VEC lanes per key, each lane 16 bytes; UNROLL keys per lane are loaded before the first
// use. The online softmax runs in the log2 domain. Partial results of several splits are merged
// by a log-sum-exp kernel; with one split the block writes the output itself.
//
// Decode (T_b = 1) is the fast path the design targets. Prefill rows reuse it row by row, which
// re-reads the cache once per row: correct for chunked prefill, not tuned for it.

#include <float.h>

#include "cache_index.cuh"
#include "common.cuh"
#include "kvzap_kernels.h"

namespace kvzap {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kUnroll = 4;
constexpr int kMaxSplit = 4096;  // keys per split at most: bounds the staged page ids (16 KB at page size 1)
constexpr float kLog2e = 1.4426950408889634f;

// Resident blocks per SM pinned by __launch_bounds__ for the kernel of query groups up to GMAX on
// an sm_XY device (sm = XY): up to G = 4, 4 on Hopper (at most 128 registers) and 3 before it
// (sm_80's code needs ~155 registers; forced into 128 it spills); 2 for G = 5..8, whose q and
// accumulators need ~230. The split heuristic assumes exactly these (kvzapAttentionBlocksPerSm);
// tests/test_kernels_build.py checks that no instance spills.
__host__ __device__ constexpr int blocks_per_sm(int gmax, int sm) { return gmax <= 4 ? (sm >= 90 ? 4 : 3) : 2; }
#ifdef __CUDA_ARCH__
#define KVZAP_SM (__CUDA_ARCH__ / 10)
#else
#define KVZAP_SM 90  // the host pass parses the attribute but does not use it
#endif

template <typename T, int D, int GMAX>
__global__ void __launch_bounds__(kThreads, blocks_per_sm(GMAX, KVZAP_SM))
    attention_kernel(const kvzapAttentionParams p, const int split_size) {
    constexpr int VEC = Vec16<T>::VEC;
    constexpr int TX = D / VEC;     // lanes per key
    constexpr int TY = 32 / TX;     // keys per warp step
    static_assert(TX <= 32 && 32 % TX == 0, "head_dim / vector width must divide a warp");
    constexpr int KEYS_PER_STEP = TY * kWarps * kUnroll;

    extern __shared__ int s_pages[];
    __shared__ float s_m[kWarps][GMAX], s_l[kWarps][GMAX];
    __shared__ float s_acc[kWarps][GMAX][D];

    const int n = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tx = lane % TX, ty = lane / TX;
    const int H = p.num_kv_heads, Hq = p.num_q_heads, G = Hq / H, W = p.window, bs = p.block_size;

    const int b = row_sequence(p.cu_seqlens, p.batch, n), start = p.cu_seqlens[b], t = n - start;
    const int s = p.seq_slots[b], c = p.ctx_lens[b];
    const int kept = p.kept_len[(int64_t)s * H + h], r = ring_keys(c, W);
    const int n_keys = row_keys(kept, c, W, t);
    const int num_splits = gridDim.z;
    if (split == 0 && threadIdx.x == 0 && n_keys > num_splits * split_size)
        atomicOr(p.error, KVZAP_ERR_BOUND_EXCEEDED);  // max_keys was below this row's keys
    const SplitKeys keys = split_keys(split, split_size, n_keys, kept, bs);
    const SplitRing ring = split_ring(keys, kept, r, bs);
    const int k_begin = keys.begin, k_end = keys.end;

    float* ws_o = p.workspace;
    float* ws_lse = p.workspace + (int64_t)p.num_rows * Hq * num_splits * D;
    if (k_begin >= k_end) {  // this split is past the row's keys: an empty partial
        if (num_splits > 1) {
            for (int i = threadIdx.x; i < G * D; i += kThreads) {
                const int64_t qh = (int64_t)n * Hq + h * G + i / D;
                ws_o[(qh * num_splits + split) * D + i % D] = 0.f;
                if (i % D == 0) ws_lse[qh * num_splits + split] = -FLT_MAX;
            }
        }
        return;
    }

    // Stage this split's page ids: kept pages', then window pages' (staged_slot's order).
    const int32_t* table = p.block_table + ((int64_t)s * H + h) * p.max_blocks_per_head;
    const int32_t* ring_table = p.ring_table + ((int64_t)s * H + h) * p.ring_pages;
    const int n_kept_pages = keys.page_hi - keys.page_lo;
    for (int i = threadIdx.x; i < n_kept_pages; i += kThreads) s_pages[i] = table[keys.page_lo + i];
    for (int i = threadIdx.x; i < ring.ring_hi - ring.ring_lo; i += kThreads)
        s_pages[n_kept_pages + i] = ring_table[ring.ring_lo + i];

    // Queries of the group, pre-scaled into the log2 domain.
    float q[GMAX][VEC];
    const T* qrow = static_cast<const T*>(p.q) + ((int64_t)n * Hq + h * G) * D + tx * VEC;
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        if (g < G) {
            to_float(*reinterpret_cast<const uint4*>(qrow + g * D), q[g], T());
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[g][e] *= p.scale * kLog2e;
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) q[g][e] = 0.f;
        }
    }
    __syncthreads();

    const int64_t fresh0 = ((int64_t)start * H + h) * D;
    const T* k_pool = static_cast<const T*>(p.k_pool);
    const T* v_pool = static_cast<const T*>(p.v_pool);
    const T* new_k = static_cast<const T*>(p.k_new) + fresh0;
    const T* new_v = static_cast<const T*>(p.v_new) + fresh0;
    // Element offset of key j's row in its source, the pool (kept or window page) or the new
    // tokens, and whether it is the pool.
    auto locate = [&](int j, bool& cached) -> int64_t {
        const KeyRef key = locate_key(j, kept, r);
        cached = key.source != kKeyNew;
        if (cached) {
            const PageSlot at = staged_slot(key, keys, ring, bs);
            return ((int64_t)s_pages[at.column] * bs + at.offset) * D;
        }
        return (int64_t)key.index * H * D;
    };

    float m[GMAX], l[GMAX], acc[GMAX][VEC];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        m[g] = -FLT_MAX;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][e] = 0.f;
    }

    for (int base = k_begin; base < k_end; base += KEYS_PER_STEP) {
        uint4 kraw[kUnroll], vraw[kUnroll];
        bool valid[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int j = base + (u * kWarps + warp) * TY + ty;
            valid[u] = j < k_end;
            kraw[u] = make_uint4(0, 0, 0, 0);
            vraw[u] = make_uint4(0, 0, 0, 0);
            if (valid[u]) {
                bool cached;
                const int64_t off = locate(j, cached) + tx * VEC;
                const T* kp = cached ? k_pool : new_k;
                const T* vp = cached ? v_pool : new_v;
                kraw[u] = load_stream(kp + off);
                vraw[u] = load_stream(vp + off);
            }
        }
        // Logits of the kUnroll keys for every query head, then one softmax update per head:
        // one rescale of the accumulator per step instead of one per key.
        float dots[kUnroll][GMAX];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            float kf[VEC];
            to_float(kraw[u], kf, T());
#pragma unroll
            for (int g = 0; g < GMAX; ++g) {
                float dot = 0.f;
#pragma unroll
                for (int e = 0; e < VEC; ++e) dot += q[g][e] * kf[e];
#pragma unroll
                for (int o = TX / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                dots[u][g] = valid[u] ? dot : -FLT_MAX;
            }
        }
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
            float m_new = m[g];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) m_new = fmaxf(m_new, dots[u][g]);
            const float corr = exp2f(m[g] - m_new);
            l[g] *= corr;
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[g][e] *= corr;
            m[g] = m_new;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (!valid[u]) continue;
            float vf[VEC];
            to_float(vraw[u], vf, T());
#pragma unroll
            for (int g = 0; g < GMAX; ++g) {
                const float pr = g < G ? exp2f(dots[u][g] - m[g]) : 0.f;
                l[g] += pr;
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[g][e] += pr * vf[e];
            }
        }
    }

    // Merge the TY key groups of each warp (lanes with equal tx hold the same dims), then warps.
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
#pragma unroll
        for (int o = TX; o < 32; o <<= 1) {
            const float m_o = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float l_o = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float m_new = fmaxf(m[g], m_o);
            const float a = exp2f(m[g] - m_new), a_o = exp2f(m_o - m_new);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float acc_o = __shfl_xor_sync(0xffffffffu, acc[g][e], o);
                acc[g][e] = acc[g][e] * a + acc_o * a_o;
            }
            l[g] = l[g] * a + l_o * a_o;
            m[g] = m_new;
        }
        if (ty == 0) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) s_acc[warp][g][tx * VEC + e] = acc[g][e];
            if (tx == 0) {
                s_m[warp][g] = m[g];
                s_l[warp][g] = l[g];
            }
        }
    }
    __syncthreads();

    const int num_splits_ = num_splits;
    for (int i = threadIdx.x; i < G * D; i += kThreads) {
        const int g = i / D, d = i % D;
        float m_all = -FLT_MAX;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w][g]);
        float l_all = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float a = exp2f(s_m[w][g] - m_all);
            l_all += s_l[w][g] * a;
            o += s_acc[w][g][d] * a;
        }
        const int64_t qh = (int64_t)n * Hq + h * G + g;
        if (num_splits_ == 1) {
            static_cast<T*>(p.out)[qh * D + d] = from_float(o / l_all, T());
        } else {
            ws_o[(qh * num_splits_ + split) * D + d] = o / l_all;
            if (d == 0) ws_lse[qh * num_splits_ + split] = m_all + log2f(l_all);
        }
    }
}

// out[n, qh, :] = sum_i 2^(lse_i - lse) o_i over the splits.
template <typename T>
__global__ void merge_kernel(const kvzapAttentionParams p, const int num_splits) {
    const int64_t qh = (int64_t)blockIdx.x * p.num_q_heads + blockIdx.y;
    const float* ws_o = p.workspace + qh * num_splits * p.head_dim;
    const float* ws_lse = p.workspace + (int64_t)p.num_rows * p.num_q_heads * num_splits * p.head_dim + qh * num_splits;
    float m = -FLT_MAX;
    for (int i = 0; i < num_splits; ++i) m = fmaxf(m, ws_lse[i]);
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
        float num = 0.f, den = 0.f;
        for (int i = 0; i < num_splits; ++i) {
            const float w = ws_lse[i] == -FLT_MAX ? 0.f : exp2f(ws_lse[i] - m);
            num += w * ws_o[(int64_t)i * p.head_dim + d];
            den += w;
        }
        static_cast<T*>(p.out)[qh * p.head_dim + d] = from_float(num / den, T());
    }
}

template <typename T, int D, int GMAX>
cudaError_t launch_attention(const kvzapAttentionParams& p, int split_size, cudaStream_t stream) {
    const int splits = num_splits(p.max_keys, split_size);
    const size_t page_smem = sizeof(int) * max_staged_pages(split_size, p.block_size);
    dim3 grid(p.num_rows, p.num_kv_heads, splits);
    attention_kernel<T, D, GMAX><<<grid, kThreads, page_smem, stream>>>(p, split_size);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1) return err;
    merge_kernel<T><<<dim3(p.num_rows, p.num_q_heads), D, 0, stream>>>(p, splits);
    return cudaGetLastError();
}

template <typename T, int D>
cudaError_t dispatch_group(const kvzapAttentionParams& p, int split_size, cudaStream_t stream) {
    const int G = p.num_q_heads / p.num_kv_heads;
    if (G <= 1) return launch_attention<T, D, 1>(p, split_size, stream);
    if (G <= 2) return launch_attention<T, D, 2>(p, split_size, stream);
    if (G <= 4) return launch_attention<T, D, 4>(p, split_size, stream);
    if (G <= 8) return launch_attention<T, D, 8>(p, split_size, stream);
    return cudaErrorInvalidValue;  // query groups above 8 heads are not instantiated
}

template <typename T>
cudaError_t dispatch_dim(const kvzapAttentionParams& p, int split_size, cudaStream_t stream) {
    if (p.head_dim == 64) return dispatch_group<T, 64>(p, split_size, stream);
    if (p.head_dim == 128) return dispatch_group<T, 128>(p, split_size, stream);
    return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace kvzap

// The group sizes dispatch_group instantiates: 1, 2, 4, 8.
static int instantiated_group(int group_size) { return group_size <= 1 ? 1 : group_size <= 2 ? 2 : group_size <= 4 ? 4 : 8; }

extern "C" int kvzapAttentionBlocksPerSm(int group_size, int sm) {
    return kvzap::blocks_per_sm(instantiated_group(group_size), sm);
}

extern "C" int kvzapAttentionSplitSize(int num_rows, int num_q_heads, int num_kv_heads, int max_keys, int num_sms,
                                       int sm) {
    // About one full wave of blocks: (row, kv head) pairs x splits ~ SMs x resident blocks, so
    // that every SM streams keys and no second, nearly empty wave follows. Splits of 256 to
    // kMaxSplit keys, in multiples of 64 (a whole number of warp steps).
    const int pairs = max(1, num_rows * num_kv_heads);
    const int resident = kvzapAttentionBlocksPerSm(num_kv_heads > 0 ? num_q_heads / num_kv_heads : 1, sm);
    const int want_splits = max(1, num_sms * resident / pairs);
    int split = (max_keys + want_splits - 1) / want_splits;
    split = ((split + 63) / 64) * 64;
    return min(max(split, 256), kvzap::kMaxSplit);
}

extern "C" size_t kvzapAttentionWorkspaceBytes(int num_rows, int num_q_heads, int head_dim, int max_keys, int split_size) {
    const int splits = kvzap::num_splits(max_keys, split_size);
    if (splits == 1) return 0;
    return sizeof(float) * (size_t)num_rows * num_q_heads * splits * (head_dim + 1);
}

extern "C" cudaError_t kvzapVarlenPagedAttention(const kvzapAttentionParams* p, int split_size, cudaStream_t stream) {
    if (p->num_rows == 0) return cudaSuccess;
    if (p->num_kv_heads <= 0 || p->num_q_heads % p->num_kv_heads || split_size <= 0 || split_size > kvzap::kMaxSplit)
        return cudaErrorInvalidValue;
    if (kvzap::num_splits(p->max_keys, split_size) > 1 && p->workspace == nullptr) return cudaErrorInvalidValue;
    if (p->error == nullptr) return cudaErrorInvalidValue;
    switch (p->dtype) {
        case KVZAP_FLOAT32: return kvzap::dispatch_dim<float>(*p, split_size, stream);
        case KVZAP_FLOAT16: return kvzap::dispatch_dim<__half>(*p, split_size, stream);
        case KVZAP_BFLOAT16: return kvzap::dispatch_dim<__nv_bfloat16>(*p, split_size, stream);
    }
    return cudaErrorInvalidValue;
}
