// kvzapVarlenPagedAttention: attention over per-head variable-length pages + window pages + new tokens.
// Reference: kvzap_trt/ops/paged_attention.py (same arguments; fp32 accumulation, one rounding).
//
// Keys of row n (sequence b, slot s, t-th new token) for kv head h, in this order:
//   [0, kept)              the head's kept pages   (kept = kept_len[s, h], pages block_table[s, h, :])
//   [kept, kept + r)       the window slots 0..r-1 (r = min(c_b, W), pages ring_table[s, h, :])
//   [kept + r, ... + t+1)  the sequence's new tokens up to n itself (causal)
// Grid (row, kv head, split): one thread block serves the whole query group of its kv head, so
// each key is read once per row for all G query heads (the tensor-core kernel's packed launch:
// per group of up to 16 / G tokens of one sequence, below). A split covers `split_size` keys; the ids
// of its kept pages, then of its window pages, are staged in shared memory first, so a cached key
// of either kind is pool row staged id * bs + offset. Two kernels: bf16 / fp16 on tensor cores
// (attention_mma_kernel, below: 16-key tiles per warp), fp32 on CUDA cores (attention_kernel: a
// warp reads TY keys at a time, TX = D/VEC lanes per key, each lane 16 bytes; UNROLL keys per lane
// are loaded before the first use). The online softmax runs in the log2 domain. Partial results
// of several splits are merged by a log-sum-exp kernel; with one split the block writes the
// output itself.
//
// Decode (T_b = 1) is the fast path the design targets. Prompt rows (prefill, chunks) take the
// tensor-core kernel's packed launch in bf16 / fp16 (each key read once per 16 / G tokens) and the
// fp32 kernel row by row (correct, not tuned).

#include <float.h>

#include <type_traits>

#include "cache_index.cuh"
#include "common.cuh"
#include "mma_fragments.cuh"
#include "kvzap_kernels.h"

namespace kvzap {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kUnroll = 4;
constexpr int kMaxSplit = 4096;  // keys per split at most: bounds the staged page ids (16 KB at page size 1)
constexpr float kLog2e = 1.4426950408889634f;

// Resident blocks per SM pinned by __launch_bounds__. The fp32 kernel for query groups up to GMAX
// on an sm_XY device (sm = XY): up to G = 4, 4 on Hopper and 3 before it; 2 for G = 5..8. The
// tensor-core kernel: 2 (two register buffers of a 16-key tile: ~235 registers at D = 128; D = 64
// needs ~140 and would fit 3, the bound keeps one figure). The split heuristic assumes exactly
// these (kvzapAttentionBlocksPerSm); tests/test_kernels_build.py checks that every instance fits
// them and that none spills.
__host__ __device__ constexpr int blocks_per_sm(int gmax, int sm) { return gmax <= 4 ? (sm >= 90 ? 4 : 3) : 2; }
constexpr int kMmaBlocksPerSm = 2;
#ifdef __CUDA_ARCH__
#define KVZAP_SM (__CUDA_ARCH__ / 10)
#else
#define KVZAP_SM 90  // the host pass parses the attribute but does not use it
#endif

// A split past its rows' keys: an empty partial for each of `rows` query rows from packed row n0
// (row r: token n0 + r / G, query head r % G of the block's kv head h). Split 0 always has keys,
// so a single split never gets here; the early return is a guard.
template <int D>
__device__ __forceinline__ void write_empty_partial(const kvzapAttentionParams& p, int n0, int rows, int h,
                                                    int split) {
    const int Hq = p.num_q_heads, G = Hq / p.num_kv_heads, num_splits = gridDim.z;
    if (num_splits == 1) return;
    float* ws_o = p.workspace;
    float* ws_lse = p.workspace + (int64_t)p.num_rows * Hq * num_splits * D;
    for (int i = threadIdx.x; i < rows * D; i += kThreads) {
        const int r = i / D;
        const int64_t qh = (int64_t)(n0 + r / G) * Hq + h * G + r % G;
        ws_o[(qh * num_splits + split) * D + i % D] = 0.f;
        if (i % D == 0) ws_lse[qh * num_splits + split] = -FLT_MAX;
    }
}

// The block's warps merged for query rows [r0, r1) (row r: token n0 + r / G, query head r % G of
// kv head h): s_acc[w][r - r0][d], s_m[w][r - r0], s_l[w][r - r0] are warp w's unnormalised output,
// running max (log2 domain) and sum (a warp that saw no key of the row holds -FLT_MAX, 0, 0).
// Writes the output itself (one split) or the split's partial and log-sum-exp; a row with no key
// in this split (the packed kernel's causal rows) gets an empty partial.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void write_block_output(const kvzapAttentionParams& p, int n0, int r0, int r1, int h,
                                                   int split, const float (&s_m)[kWarps][ROWS],
                                                   const float (&s_l)[kWarps][ROWS],
                                                   const float (&s_acc)[kWarps][ROWS][D]) {
    const int Hq = p.num_q_heads, G = Hq / p.num_kv_heads, num_splits = gridDim.z;
    float* ws_o = p.workspace;
    float* ws_lse = p.workspace + (int64_t)p.num_rows * Hq * num_splits * D;
    for (int i = threadIdx.x; i < (r1 - r0) * D; i += kThreads) {
        const int g = i / D, d = i % D, r = r0 + g;
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
        const int64_t qh = (int64_t)(n0 + r / G) * Hq + h * G + r % G;
        if (num_splits == 1) {
            static_cast<T*>(p.out)[qh * D + d] = from_float(o / l_all, T());
        } else {
            const bool seen = l_all > 0.f;
            ws_o[(qh * num_splits + split) * D + d] = seen ? o / l_all : 0.f;
            if (d == 0) ws_lse[qh * num_splits + split] = seen ? m_all + log2f(l_all) : -FLT_MAX;
        }
    }
}

// The rows of a thread block: new tokens [t_lo, t_hi) of sequence b, packed rows start + t_lo ..,
// each with the query group of kv head blockIdx.y. One row (the decode and fp32 kernels) or a row
// group of the packed launch (cache_index.cuh's row_group).
struct BlockRows {
    int b, start, t_lo, t_hi;
};
__device__ __forceinline__ BlockRows one_row(const kvzapAttentionParams& p, int n) {
    const int b = row_sequence(p.cu_seqlens, p.batch, n), start = p.cu_seqlens[b];
    return BlockRows{b, start, n - start, n - start + 1};
}

// The keys of this block's rows for (kv head, split): those of its last row, which sees the most
// (the others see the same cached keys and fewer new tokens); the split's page ids staged in
// s_pages: kept pages', then window pages' (staged_slot's order). With `empty` the split is past
// the rows' keys: their empty partials are written and the block returns. Reads made here are the
// block's first; the caller's __syncthreads makes s_pages visible.
struct BlockKeys {
    int start, t, kept, r;  // the rows' sequence's first packed row, the last row's offset t; kept and window keys
    SplitKeys keys;
    SplitRing ring;
    bool empty;
};
template <int D>
__device__ __forceinline__ BlockKeys block_keys(const kvzapAttentionParams& p, const BlockRows& rows, int split_size,
                                                int* s_pages) {
    const int h = blockIdx.y, split = blockIdx.z;
    const int H = p.num_kv_heads, W = p.window, bs = p.block_size, G = p.num_q_heads / H;
    BlockKeys k;
    const int s = p.seq_slots[rows.b], c = p.ctx_lens[rows.b];
    k.start = rows.start, k.t = rows.t_hi - 1;
    k.kept = p.kept_len[(int64_t)s * H + h], k.r = ring_keys(c, W);
    const int n_keys = row_keys(k.kept, c, W, k.t);
    if (split == 0 && threadIdx.x == 0 && n_keys > gridDim.z * split_size)
        atomicOr(p.error, KVZAP_ERR_BOUND_EXCEEDED);  // max_keys was below this row's keys
    k.keys = split_keys(split, split_size, n_keys, k.kept, bs);
    k.ring = split_ring(k.keys, k.kept, k.r, bs);
    k.empty = k.keys.begin >= k.keys.end;
    if (k.empty) {
        write_empty_partial<D>(p, rows.start + rows.t_lo, (rows.t_hi - rows.t_lo) * G, h, split);
        return k;
    }
    const int32_t* table = p.block_table + ((int64_t)s * H + h) * p.max_blocks_per_head;
    const int32_t* ring_table = p.ring_table + ((int64_t)s * H + h) * p.ring_pages;
    const int n_kept_pages = k.keys.page_hi - k.keys.page_lo;
    for (int i = threadIdx.x; i < n_kept_pages; i += kThreads) s_pages[i] = table[k.keys.page_lo + i];
    for (int i = threadIdx.x; i < k.ring.ring_hi - k.ring.ring_lo; i += kThreads)
        s_pages[n_kept_pages + i] = ring_table[k.ring.ring_lo + i];
    return k;
}

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
    const int H = p.num_kv_heads, Hq = p.num_q_heads, G = Hq / H, bs = p.block_size;

    const BlockKeys bk = block_keys<D>(p, one_row(p, n), split_size, s_pages);
    if (bk.empty) return;
    const int start = bk.start, kept = bk.kept, r = bk.r;
    const SplitKeys keys = bk.keys;
    const SplitRing ring = bk.ring;
    const int k_begin = keys.begin, k_end = keys.end;

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

    write_block_output<T, D, GMAX>(p, n, 0, G, h, split, s_m, s_l, s_acc);
}

// ---- Half-precision path: tensor cores (bf16 / fp16, any group size up to 8) -------------------
//
// One warp takes one tile of kTileKeys = 16 keys at a time (tiles of the split, kept pages then
// window then new tokens, dealt round-robin to the warps; cache_index.cuh's split_tiles). Two
// m16n8k16 products per tile, lane = 4 g + t:
//   S   [16 x 8 keys] = Q K^T   rows: the group's query heads (row g = head g; rows 8..15 zero),
//                               2 n-tiles of 8 keys, D/16 k-steps;
//   O^T [16 dims x 8] += V^T P^T  rows: 16 head dims per m-tile (D/16 m-tiles), columns: query
//                               heads, one k-step of the tile's 16 keys.
// The packed launch (attention_mma_kernel<T, D, true>) fills all 16 rows of S with query rows
// r = G x token + head of up to 16 / G tokens and runs O^T += V^T P^T once per half of them (rows
// 0..7, 8..15: S's c0 c1 and c2 c3), with the same V fragment.
// S's accumulator (lane: head g, keys 2t, 2t+1 of each n-tile) is exactly P^T's B fragment
// (keys 2t, 2t+1 / 2t+8, 2t+9, head g): no shuffle between the products. The head dim is permuted
// inside each product so that every lane loads 16-byte vectors of one key row:
//   QK^T: k-index 16 kk + 8 half + 2t + e  <->  dim t*D/4 + 4 kk + 2 half + e
//         (lane (g, t) holds K[keys g, g+8][t*D/4, (t+1)*D/4) and Q[head g][the same dims])
//   PV:   row 16 mm + 8 hi + g  <->  dim g*D/8 + 2 mm + hi
//         (lane (g, t) holds V[keys 2t, 2t+1, 2t+8, 2t+9][g*D/8, (g+1)*D/8))
// The next tile's loads are issued before the current tile's math (two register buffers; the
// packed launch: the next tile's K, and its V once the current math is done).
// Softmax in the log2 domain in fp32. PV takes P in the input type: fp16 rounds it once (2^-11);
// bf16 splits it into a rounded part and the rounded remainder, two mma, so P keeps ~16 bits
// (one bf16 rounding, 2^-9 relative, put rows with few keys and |o| >= 2 past the tests' one
// output rounding; found by emulating the kernel against the reference).

// One tile's K and V as one lane holds them. valid: bit 2j + e set when key 8j + 2t + e (the
// lane's V key 2j + e, and its logit s[j][e]) is a key of the split (the packed kernel: bits
// 4 hf + e, one nibble per mma row half); the other keys of the tile are read from a key of the
// split (finite values: their logits are masked and their P is 0).
template <int D>
struct TileRegs {
    uint4 k[2][D / 32];  // keys g, g + 8: dims [t*D/4, (t+1)*D/4)
    uint4 v[4][D / 64];  // keys 2t, 2t+1, 2t+8, 2t+9: dims [g*D/8, (g+1)*D/8)
    int valid;
};
// Where a lane reads key lane % 16 of a tile: `row` of the pool (fresh: of the new tokens).
struct TileRow {
    int row;
    bool fresh;
};

// The rows a lane reads, shared by the lanes that located them: K's keys g and g + 8, V's keys 2t,
// 2t+1, 2t+8 and 2t+9 of the tile.
__device__ __forceinline__ void k_rows(int row, int g, int (&rk)[2]) {
    rk[0] = __shfl_sync(0xffffffffu, row, g), rk[1] = __shfl_sync(0xffffffffu, row, g + 8);
}
__device__ __forceinline__ void v_rows(int row, int t, int (&rv)[4]) {
    rv[0] = __shfl_sync(0xffffffffu, row, 2 * t), rv[1] = __shfl_sync(0xffffffffu, row, 2 * t + 1);
    rv[2] = __shfl_sync(0xffffffffu, row, 2 * t + 8), rv[3] = __shfl_sync(0xffffffffu, row, 2 * t + 9);
}

// The tile's K (V) from those rows; the element offset of a row is row * D from kbase (vbase).
template <typename T, int D>
__device__ __forceinline__ void load_tile_k(TileRegs<D>& r, const T* kbase, const int (&rk)[2], int t) {
    constexpr int VEC = Vec16<T>::VEC;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const T* src = kbase + (int64_t)rk[j] * D + t * (D / 4);
#pragma unroll
        for (int i = 0; i < D / 32; ++i) r.k[j][i] = load_stream(src + i * VEC);
    }
}
template <typename T, int D>
__device__ __forceinline__ void load_tile_v(TileRegs<D>& r, const T* vbase, const int (&rv)[4], int g) {
    constexpr int VEC = Vec16<T>::VEC;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const T* src = vbase + (int64_t)rv[e] * D + g * (D / 8);
#pragma unroll
        for (int i = 0; i < D / 64; ++i) r.v[e][i] = load_stream(src + i * VEC);
    }
}

// The online softmax and O += P V over one tile, for the lane's HALVES halves of the mma rows (half
// hf: row g + 8 hf; the decode kernel uses rows 0..7 only). qa[kk]: the lane's A fragment of Q for
// k-step kk; m[hf], l[hf]: the running max (log2 domain) and this lane's part of the running sum of
// row g + 8 hf; acc[hf][mm]: O^T of m-tile mm for the query rows of half hf, rows (dims)
// g*D/8 + 2mm + {0: c0 c1, 1: c2 c3}, columns (query rows) 8 hf + 2t (c0, c2) and 8 hf + 2t + 1
// (c1, c3). r.valid bit 4 hf + e: the lane's key e (keys 2t, 2t+1, 2t+8, 2t+9) counts for row g + 8 hf.
template <typename T, int D, int HALVES>
__device__ __forceinline__ void attend_tile(const TileRegs<D>& r, const uint32_t (&qa)[D / 16][4], float scale_log2,
                                            float (&m)[HALVES], float (&l)[HALVES], float (&acc)[HALVES][D / 16][4],
                                            int t) {
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) mma_16816(s[j], qa[kk], word(r.k[j], 2 * kk), word(r.k[j], 2 * kk + 1), T());
    }
    constexpr bool kSplitP = std::is_same<T, __nv_bfloat16>::value;
    uint32_t b0[HALVES], b1[HALVES], rest0[HALVES], rest1[HALVES];
    float corr0[HALVES], corr1[HALVES];
#pragma unroll
    for (int hf = 0; hf < HALVES; ++hf) {
        // s[j][2 hf + e], e < 2: the logit of row g + 8 hf and key 8j + 2t + e (the lane's V key 2j + e)
        float x[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
            x[e] = (r.valid >> (4 * hf + e)) & 1 ? s[e / 2][2 * hf + e % 2] * scale_log2 : -FLT_MAX;
        float tile_max = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));  // the row's max over the tile
        const float m_new = fmaxf(m[hf], tile_max);
        const float corr = exp2f(m[hf] - m_new);
        float pr[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) pr[e] = exp2f(x[e] - m_new);
        if constexpr (HALVES == 2) {
            // A causal row may have seen no key yet (m_new = -FLT_MAX): its masked keys must not weigh 1.
#pragma unroll
            for (int e = 0; e < 4; ++e) pr[e] = (r.valid >> (4 * hf + e)) & 1 ? pr[e] : 0.f;
        }
        float2 r01, r23;
        b0[hf] = pack_pair(pr[0], pr[1], r01, T());  // P^T[2t, 2t+1][row g + 8 hf]
        b1[hf] = pack_pair(pr[2], pr[3], r23, T());  // P^T[2t+8, 2t+9][row g + 8 hf]
        rest0[hf] = rest1[hf] = 0;  // bf16: what the rounding of P left out, rounded
        if constexpr (kSplitP) {
            float2 unused;
            rest0[hf] = pack_pair(pr[0] - r01.x, pr[1] - r01.y, unused, T());
            rest1[hf] = pack_pair(pr[2] - r23.x, pr[3] - r23.y, unused, T());
        }
        l[hf] = l[hf] * corr + (pr[0] + pr[1]) + (pr[2] + pr[3]);
        m[hf] = m_new;
        // The accumulator's columns are rows 8 hf + 2t and 8 hf + 2t + 1: their corrections live in
        // lanes 8t and 8t + 4.
        corr0[hf] = __shfl_sync(0xffffffffu, corr, 8 * t), corr1[hf] = __shfl_sync(0xffffffffu, corr, 8 * t + 4);
    }
#pragma unroll
    for (int mm = 0; mm < D / 16; ++mm) {
#pragma unroll
        for (int hf = 0; hf < HALVES; ++hf) {
            float(&c)[4] = acc[hf][mm];
            c[0] *= corr0[hf], c[1] *= corr1[hf], c[2] *= corr0[hf], c[3] *= corr1[hf];
        }
        const uint32_t v0 = word(r.v[0], mm), v1 = word(r.v[1], mm), v2 = word(r.v[2], mm), v3 = word(r.v[3], mm);
        const uint32_t a[4] = {pair_of_halves(v0, v1, 0), pair_of_halves(v0, v1, 1),   // V^T[dim 2mm, 2mm+1][2t, 2t+1]
                               pair_of_halves(v2, v3, 0), pair_of_halves(v2, v3, 1)};  // V^T[same][2t+8, 2t+9]
#pragma unroll
        for (int hf = 0; hf < HALVES; ++hf) {
            mma_16816(acc[hf][mm], a, b0[hf], b1[hf], T());
            if constexpr (kSplitP) mma_16816(acc[hf][mm], a, rest0[hf], rest1[hf], T());
        }
    }
}

// The tensor-core kernel in two launches. PACK false (decode steps, one token per sequence): a
// block per packed row, the G query heads of its kv head as mma rows 0..G-1 (rows 8..15 zero).
// PACK true (steps where some sequence brings several tokens: prefill and chunks): a block per row
// group (cache_index.cuh's row_group), up to P = 16 / G consecutive tokens of one sequence, query
// row r = G x (token - first token) + head as mma row r, so the group's P x G rows share every key
// read; each row sees the new tokens up to its own (a per-row causal mask on the new-token tiles).
template <typename T, int D, bool PACK>
__global__ void __launch_bounds__(kThreads, kMmaBlocksPerSm) attention_mma_kernel(const kvzapAttentionParams p,
                                                                                   const int split_size) {
    constexpr int VEC = Vec16<T>::VEC;
    constexpr int GMAX = 8;               // query rows per pass of the block's merge (one mma row half)
    constexpr int HALVES = PACK ? 2 : 1;  // mma row halves in use: rows g and g + 8 of the lane
    extern __shared__ int s_pages[];
    __shared__ float s_m[kWarps][GMAX], s_l[kWarps][GMAX];
    __shared__ float s_acc[kWarps][GMAX][D];

    const int h = blockIdx.y, split = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const int H = p.num_kv_heads, Hq = p.num_q_heads, G = Hq / H, bs = p.block_size;

    BlockRows rows;
    if constexpr (PACK) {
        const RowGroup group = row_group(p.cu_seqlens, p.batch, 16 / G, blockIdx.x);
        if (group.t_lo >= group.t_hi) return;  // a group between two sequences: no rows
        rows = BlockRows{group.seq, p.cu_seqlens[group.seq], group.t_lo, group.t_hi};
    } else {
        rows = one_row(p, blockIdx.x);
    }
    const int n0 = rows.start + rows.t_lo, n_rows = (rows.t_hi - rows.t_lo) * G;  // the block's query rows
    const BlockKeys bk = block_keys<D>(p, rows, split_size, s_pages);
    if (bk.empty) return;
    const SplitKeys keys = bk.keys;
    const SplitRing ring = bk.ring;

    // Query row g + 8 hf (token n0 + row / G, head row % G; zeros past the block's rows), the lane's
    // dims [tq*D/4, (tq+1)*D/4), as A fragments a[hf] (k-index 2t..) and a[2 + hf] (2t + 8..); and
    // the last new token the row sees (a row past the block's rows: the last row's).
    uint32_t qa[D / 16][4];
    int fresh_last[HALVES];
#pragma unroll
    for (int hf = 0; hf < HALVES; ++hf) {
        const int row = g + 8 * hf;
        uint4 qv[D / 32];
        const T* qrow = static_cast<const T*>(p.q) + ((int64_t)(n0 + row / G) * Hq + h * G + row % G) * D + tq * (D / 4);
#pragma unroll
        for (int i = 0; i < D / 32; ++i)
            qv[i] = row < n_rows ? *reinterpret_cast<const uint4*>(qrow + i * VEC) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) qa[kk][hf] = word(qv, 2 * kk), qa[kk][2 + hf] = word(qv, 2 * kk + 1);
        fresh_last[hf] = rows.t_lo + imin(row, n_rows - 1) / G;
    }
    if constexpr (!PACK) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) qa[kk][1] = qa[kk][3] = 0u;
    }
    __syncthreads();  // the staged page ids

    const T* k_pool = static_cast<const T*>(p.k_pool);
    const T* v_pool = static_cast<const T*>(p.v_pool);
    const int64_t fresh0 = ((int64_t)bk.start * H + h) * D;
    const T* new_k = static_cast<const T*>(p.k_new) + fresh0;
    const T* new_v = static_cast<const T*>(p.v_new) + fresh0;
    const SplitTiles tiles = split_tiles(keys, bk.kept, bk.r, bk.t);
    const int n_tiles = tiles.kept_tiles + tiles.ring_tiles + tiles.fresh_tiles;
    // Tile i (warp-uniform): each lane locates key lane % 16 once (a key outside the split is
    // replaced by the nearest one inside) and the rows are shared by shuffles when K and V load.
    auto locate = [&](TileRegs<D>& regs, int i) -> TileRow {
        const TileRef tile = tile_ref(tiles, i);
        const int x = imin(imax(tile.first + (lane & (kTileKeys - 1)), tile.range.lo), tile.range.hi - 1);
        TileRow at;
        at.fresh = tile.source == kKeyNew;
        if (at.fresh) {
            at.row = x * H;
        } else {
            const PageSlot slot = staged_slot(KeyRef{tile.source, x}, keys, ring, bs);
            at.row = s_pages[slot.column] * bs + slot.offset;
        }
        int valid = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = tile.first + (e / 2) * 8 + 2 * tq + e % 2;
            const bool in_split = key >= tile.range.lo && key < tile.range.hi;
#pragma unroll
            for (int hf = 0; hf < HALVES; ++hf) {
                const bool seen = PACK ? !at.fresh || key <= fresh_last[hf] : true;
                valid |= (in_split && seen) << (4 * hf + e);
            }
        }
        regs.valid = valid;
        return at;
    };
    auto load_k = [&](TileRegs<D>& regs, TileRow at) {
        int rk[2];
        k_rows(at.row, g, rk);
        load_tile_k<T, D>(regs, at.fresh ? new_k : k_pool, rk, tq);
    };
    auto load_v = [&](TileRegs<D>& regs, TileRow at) {
        int rv[4];
        v_rows(at.row, tq, rv);
        load_tile_v<T, D>(regs, at.fresh ? new_v : v_pool, rv, g);
    };

    const float scale_log2 = p.scale * kLog2e;
    float m[HALVES], l[HALVES], acc[HALVES][D / 16][4];
#pragma unroll
    for (int hf = 0; hf < HALVES; ++hf) {
        m[hf] = -FLT_MAX, l[hf] = 0.f;
#pragma unroll
        for (int mm = 0; mm < D / 16; ++mm) acc[hf][mm][0] = acc[hf][mm][1] = acc[hf][mm][2] = acc[hf][mm][3] = 0.f;
    }
    TileRegs<D> cur, next;
    int i = warp;
    if constexpr (PACK) {
        // The next tile's K loads while the current tile is used, its V once the current tile's
        // math is done (two tiles' K and one V: the second row half's accumulators and Q take the
        // registers of the decode kernel's second V).
        TileRow at_cur{0, false}, at_next{0, false};
        if (i < n_tiles) at_cur = locate(cur, i), load_k(cur, at_cur);
        for (; i < n_tiles; i += 2 * kWarps) {
            load_v(cur, at_cur);
            if (i + kWarps < n_tiles) at_next = locate(next, i + kWarps), load_k(next, at_next);
            attend_tile<T, D, HALVES>(cur, qa, scale_log2, m, l, acc, tq);
            if (i + kWarps >= n_tiles) break;
            load_v(next, at_next);
            if (i + 2 * kWarps < n_tiles) at_cur = locate(cur, i + 2 * kWarps), load_k(cur, at_cur);
            attend_tile<T, D, HALVES>(next, qa, scale_log2, m, l, acc, tq);
        }
    } else {
        auto load = [&](TileRegs<D>& regs, int i) {  // every shuffle before the loads
            const TileRow at = locate(regs, i);
            int rk[2], rv[4];
            k_rows(at.row, g, rk), v_rows(at.row, tq, rv);
            load_tile_k<T, D>(regs, at.fresh ? new_k : k_pool, rk, tq);
            load_tile_v<T, D>(regs, at.fresh ? new_v : v_pool, rv, g);
        };
        if (i < n_tiles) load(cur, i);
        for (; i < n_tiles; i += 2 * kWarps) {  // two tiles per trip, each loaded while the other is used
            if (i + kWarps < n_tiles) load(next, i + kWarps);
            attend_tile<T, D, HALVES>(cur, qa, scale_log2, m, l, acc, tq);
            if (i + kWarps >= n_tiles) break;
            if (i + 2 * kWarps < n_tiles) load(cur, i + 2 * kWarps);
            attend_tile<T, D, HALVES>(next, qa, scale_log2, m, l, acc, tq);
        }
    }

    // The warps merged, one half of the mma rows (8 query rows) per pass through the shared buffers.
    // The decode kernel's row and row count are read again, not kept across the loop (a register
    // more there costs moves in its hot loop).
    const int out_n0 = PACK ? n0 : blockIdx.x, out_rows = PACK ? n_rows : p.num_q_heads / p.num_kv_heads;
#pragma unroll
    for (int hf = 0; hf < HALVES; ++hf) {
        const int r0 = 8 * hf, r1 = imin(out_rows, r0 + 8);
        if (r0 >= r1) break;  // block-uniform
        if (hf > 0) __syncthreads();  // the previous half is written out
        float lsum = l[hf];
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);  // row g + 8 hf's sum over the warp's keys
        if (g < r1 - r0 && tq == 0) {
            s_m[warp][g] = m[hf];
            s_l[warp][g] = lsum;
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {  // columns 2t + e: acc[mm][e] (dim g*D/8 + 2mm), acc[mm][2 + e] (dim + 1)
            const int col = 2 * tq + e;
            if (col >= r1 - r0) continue;
#pragma unroll
            for (int mm = 0; mm < D / 16; ++mm) {
                s_acc[warp][col][g * (D / 8) + 2 * mm] = acc[hf][mm][e];
                s_acc[warp][col][g * (D / 8) + 2 * mm + 1] = acc[hf][mm][2 + e];
            }
        }
        __syncthreads();
        write_block_output<T, D, GMAX>(p, out_n0, r0, r1, h, split, s_m, s_l, s_acc);
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

// Whether a launch packs tokens of a sequence into one block: bf16 / fp16 when some sequence brings
// several tokens for sure (N > B). Then its blocks per (kv head, split) are the row groups of
// P = 16 / G tokens, else the rows. The split heuristic counts the same blocks.
__host__ __device__ inline bool packed_launch(int dtype, int num_rows, int batch) {
    return dtype != KVZAP_FLOAT32 && batch > 0 && num_rows > batch;
}
// (P at least 1: a group above 16 heads, which no kernel takes, must not divide by zero here.)
__host__ __device__ inline int launch_blocks(int dtype, int num_rows, int batch, int group_size) {
    const int P = imax(1, 16 / imax(1, group_size));
    return packed_launch(dtype, num_rows, batch) ? row_groups(num_rows, batch, P) : num_rows;
}

// The launch of either kernel over `blocks` blocks per (kv head, split) (rows, or row groups), and
// the split merge when there are several.
template <typename Kernel>
cudaError_t launch(Kernel kernel, const kvzapAttentionParams& p, int blocks, int split_size, cudaStream_t stream,
                   cudaError_t (*merge)(const kvzapAttentionParams&, int, cudaStream_t)) {
    const int splits = num_splits(p.max_keys, split_size);
    const size_t page_smem = sizeof(int) * max_staged_pages(split_size, p.block_size);
    kernel<<<dim3(blocks, p.num_kv_heads, splits), kThreads, page_smem, stream>>>(p, split_size);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1) return err;
    return merge(p, splits, stream);
}

template <typename T>
cudaError_t launch_merge(const kvzapAttentionParams& p, int splits, cudaStream_t stream) {
    merge_kernel<T><<<dim3(p.num_rows, p.num_q_heads), p.head_dim, 0, stream>>>(p, splits);
    return cudaGetLastError();
}

// fp32: the CUDA-core kernel, instantiated for query groups up to 1, 2, 4 and 8 heads.
template <int D>
cudaError_t dispatch_fp32(const kvzapAttentionParams& p, int split_size, cudaStream_t stream) {
    const int G = p.num_q_heads / p.num_kv_heads;
    auto go = [&](auto kernel) { return launch(kernel, p, p.num_rows, split_size, stream, launch_merge<float>); };
    if (G <= 1) return go(attention_kernel<float, D, 1>);
    if (G <= 2) return go(attention_kernel<float, D, 2>);
    if (G <= 4) return go(attention_kernel<float, D, 4>);
    if (G <= 8) return go(attention_kernel<float, D, 8>);
    return cudaErrorInvalidValue;  // query groups above 8 heads are not instantiated
}

// bf16 / fp16: the tensor-core kernel, two instances per head dim for every group up to 8 heads: a
// block per row when N <= B (decode; also a batch such as T = [2, 0, 1], whose rows it attends
// one by one, correctly), a block per row group of up to 16 / G tokens of one sequence when some
// sequence brings several tokens for sure (N > B).
template <typename T, int D>
cudaError_t dispatch_half(const kvzapAttentionParams& p, int split_size, cudaStream_t stream) {
    const int G = p.num_q_heads / p.num_kv_heads;
    if (G > 8) return cudaErrorInvalidValue;  // a token's query heads fill at most rows 0..7 of the mma
    const int blocks = launch_blocks(p.dtype, p.num_rows, p.batch, G);
    if (packed_launch(p.dtype, p.num_rows, p.batch))
        return launch(attention_mma_kernel<T, D, true>, p, blocks, split_size, stream, launch_merge<T>);
    return launch(attention_mma_kernel<T, D, false>, p, blocks, split_size, stream, launch_merge<T>);
}

template <typename T>
cudaError_t dispatch_dim(const kvzapAttentionParams& p, int split_size, cudaStream_t stream) {
    if constexpr (sizeof(T) == 4) {
        if (p.head_dim == 64) return dispatch_fp32<64>(p, split_size, stream);
        if (p.head_dim == 128) return dispatch_fp32<128>(p, split_size, stream);
    } else {
        if (p.head_dim == 64) return dispatch_half<T, 64>(p, split_size, stream);
        if (p.head_dim == 128) return dispatch_half<T, 128>(p, split_size, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace kvzap

// The group sizes dispatch_fp32 instantiates: 1, 2, 4, 8.
static int instantiated_group(int group_size) { return group_size <= 1 ? 1 : group_size <= 2 ? 2 : group_size <= 4 ? 4 : 8; }

extern "C" int kvzapAttentionBlocksPerSm(int dtype, int group_size, int sm) {
    if (dtype != KVZAP_FLOAT32) return kvzap::kMmaBlocksPerSm;
    return kvzap::blocks_per_sm(instantiated_group(group_size), sm);
}

extern "C" int kvzapAttentionBlocks(int dtype, int num_rows, int batch, int num_q_heads, int num_kv_heads) {
    return kvzap::launch_blocks(dtype, num_rows, batch, num_kv_heads > 0 ? num_q_heads / num_kv_heads : 1);
}

extern "C" int kvzapAttentionSplitSize(int dtype, int num_rows, int batch, int num_q_heads, int num_kv_heads,
                                       int max_keys, int num_sms, int sm) {
    // About one full wave of blocks: (block, kv head) pairs x splits ~ SMs x resident blocks, so
    // that every SM streams keys and no second, nearly empty wave follows; the blocks are the
    // launch's (rows, or row groups of a packed launch). Splits of 256 to kMaxSplit keys, in
    // multiples of 64 (a whole number of steps of either kernel's warps).
    const int pairs = max(1, kvzapAttentionBlocks(dtype, num_rows, batch, num_q_heads, num_kv_heads) * num_kv_heads);
    const int resident = kvzapAttentionBlocksPerSm(dtype, num_kv_heads > 0 ? num_q_heads / num_kv_heads : 1, sm);
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
    // Splits and kv heads are the grid's z and y, query heads the merge's y, at most 65535 each (the
    // split heuristic never comes near: 256-key splits reach it at 16.7 M keys).
    if (kvzap::num_splits(p->max_keys, split_size) > kvzap::kMaxGridYZ || p->num_q_heads > kvzap::kMaxGridYZ)
        return cudaErrorInvalidValue;  // (num_kv_heads divides num_q_heads: no larger)
    if (p->error == nullptr) return cudaErrorInvalidValue;
    switch (p->dtype) {
        case KVZAP_FLOAT32: return kvzap::dispatch_dim<float>(*p, split_size, stream);
        case KVZAP_FLOAT16: return kvzap::dispatch_dim<__half>(*p, split_size, stream);
        case KVZAP_BFLOAT16: return kvzap::dispatch_dim<__nv_bfloat16>(*p, split_size, stream);
    }
    return cudaErrorInvalidValue;
}
