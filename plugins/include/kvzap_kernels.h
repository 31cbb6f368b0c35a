// kvzap-trt CUDA kernels: C ABI.
//
// Framework-free launchers over raw device pointers. The torch ops (plugins/torch/) and the
// TensorRT plugins call these; each has a PyTorch reference with the same arguments and layout in
// kvzap_trt/ops/ (evict_append.py, paged_attention.py), which is also its test oracle.
//
// Layout (DESIGN.md section 3), every tensor contiguous, element type `dtype` unless noted:
//   k_pool, v_pool  [num_blocks, block_size, D]    one block = block_size tokens of one (layer, seq, kv head)
//   pos_pool        [num_blocks, block_size] int32 absolute position of each stored token
//   score_pool      [num_blocks, block_size] float32 its log-score (the window's are read at eviction)
//   block_table     [L, S, H, M] int32             block ids of each head's kept pages; columns at and past
//                                                  ceil(kept_len / block_size) must be -1 (kvzapEvict's
//                                                  chunked path reads them to know whether a head took its
//                                                  blocks): allocate it filled with -1 and refill on release
//   kept_len        [L, S, H] int32                tokens in each head's kept pages
//   ring_table      [L, S, H, R] int32             block ids of each head's window pages, R = ceil(W / block_size):
//                                                  position p lives in window slot p % W, which is column
//                                                  (p % W) / block_size, offset (p % W) % block_size. A head
//                                                  with c tokens written holds ceil(min(c, W) / block_size)
//                                                  window pages (columns past them are -1); kvzapEvict pops
//                                                  them from the pool as the window first fills.
//   free_stack      [num_blocks] int32, entries [0, *num_free) free; num_free [1] int32
// New tokens are packed over the batch: row n of sequence b is n in [cu_seqlens[b], cu_seqlens[b+1]).
// cu_seqlens [B+1], seq_slots [B], ctx_lens [B] are int32 device arrays. L is 1 for a per-layer call.
//
// All launchers are asynchronous on `stream` and return cudaSuccess or the launch error.

#ifndef KVZAP_KERNELS_H_
#define KVZAP_KERNELS_H_

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { KVZAP_FLOAT32 = 0, KVZAP_FLOAT16 = 1, KVZAP_BFLOAT16 = 2 } kvzapDtype;

// Error bits OR-ed into *error by the kernels (they cannot raise). After any of kvzapEvict's the
// cache is invalid; after BOUND_EXCEEDED from kvzapVarlenPagedAttention the output is.
//   POOL_EXHAUSTED    fewer free blocks than a head's new kept and window pages need
//   BLOCK_TABLE_FULL  a head needs more than max_blocks_per_head blocks
//   BOUND_EXCEEDED    a bound the host passed is below the real value: kvzapEvict's max_new_tokens
//                     (below some T_b) or kvzapVarlenPagedAttention's max_keys (so low that some row
//                     has more keys than its ceil(max_keys / split_size) splits cover)
// Must match ERR_* in kvzap_trt/ops/cuda_kernels.py.
enum { KVZAP_ERR_POOL_EXHAUSTED = 1, KVZAP_ERR_BLOCK_TABLE_FULL = 2, KVZAP_ERR_BOUND_EXCEEDED = 4 };

typedef struct {
    kvzapDtype dtype;
    int num_layers;   // L
    int batch;        // B
    int num_slots;    // S
    int num_kv_heads; // H
    int head_dim;     // D
    int window;       // W (0 allowed); no tensor carries it, so a W that differs from the one the cache
                      // was written with but gives the same R cannot be detected: pass the model's
    int block_size;
    int max_blocks_per_head;  // M
    int ring_pages;   // R = ceil(W / block_size)
    int num_rows;     // N = cu_seqlens[B]
    int max_new_tokens;  // max_b T_b if the host knows it, else 0; long prefills take a chunked path.
                         // A head with more new tokens sets KVZAP_ERR_BOUND_EXCEEDED and does nothing.
    float threshold;  // tau: kept iff score >= tau
    const void* k_new;    // [L, N, H, D]
    const void* v_new;    // [L, N, H, D]
    const float* scores;  // [L, N, H]
    const int32_t* cu_seqlens;
    const int32_t* seq_slots;
    const int32_t* ctx_lens;
    void* k_pool;
    void* v_pool;
    int32_t* pos_pool;
    float* score_pool;
    int32_t* block_table;
    int32_t* kept_len;
    int32_t* ring_table;  // [L, S, H, R]
    int32_t* free_stack;
    int32_t* num_free;
    int32_t* error;   // [1], OR-ed with KVZAP_ERR_* bits
} kvzapEvictParams;

// Tokens leaving the window: appended to their head's pages if score >= tau, else forgotten; new
// tokens written into the window pages. The blocks a head needs (new kept pages, then new window
// pages) are popped from the free stack in one pop per head. One warp per (layer, sequence, kv head)
// at decode (max_new_tokens == 1), one thread block per head otherwise; long prefills spread each
// head over blocks of 2048 leavers (three launches).
cudaError_t kvzapEvict(const kvzapEvictParams* p, cudaStream_t stream);

typedef struct {
    kvzapDtype dtype;
    int batch, num_slots, num_q_heads, num_kv_heads, head_dim, window, block_size, max_blocks_per_head;
    int ring_pages;   // R = ceil(W / block_size)
    int num_rows;     // N
    int max_keys;     // an upper bound of keys seen by any row: max_b(ctx_lens[b]) + max_b(T_b); the
                      // launch covers ceil(max_keys / split_size) splits, and a row with more keys than
                      // they hold sets KVZAP_ERR_BOUND_EXCEEDED (its output is incomplete)
    float scale;
    const void* q;        // [N, Hq, D]
    const void* k_new;    // [N, H, D]
    const void* v_new;
    const int32_t* cu_seqlens;
    const int32_t* seq_slots;
    const int32_t* ctx_lens;
    const void* k_pool;
    const void* v_pool;
    const int32_t* block_table;  // [S, H, M]
    const int32_t* kept_len;     // [S, H]
    const int32_t* ring_table;   // [S, H, R]
    void* out;                   // [N, Hq, D]
    float* workspace;            // kvzapAttentionWorkspaceBytes(...) bytes, or NULL when it returns 0
    int32_t* error;              // [1], OR-ed with KVZAP_ERR_BOUND_EXCEEDED; required
} kvzapAttentionParams;

// Thread blocks per (kv head, split) of a launch over num_rows rows of `batch` sequences: the rows,
// or for bf16 / fp16 with num_rows > batch (the packed launch) the row groups of up to 16 / G
// tokens of one sequence.
int kvzapAttentionBlocks(int dtype, int num_rows, int batch, int num_q_heads, int num_kv_heads);

// Keys per thread block along each row's keys: about one full wave of the launch's blocks
// (kvzapAttentionBlocks x kv heads x splits) on num_sms SMs of compute capability sm (major * 10 +
// minor), given the resident blocks per SM that the kernel for this dtype (kvzapDtype) and query
// group pins.
int kvzapAttentionSplitSize(int dtype, int num_rows, int batch, int num_q_heads, int num_kv_heads, int max_keys,
                            int num_sms, int sm);

// Thread blocks of the attention kernel resident per SM for `dtype` (kvzapDtype: float32 runs the
// CUDA-core kernel, float16 / bfloat16 the tensor-core one) and query groups of `group_size` heads
// on an sm device: its __launch_bounds__ minimum, which the split heuristic assumes.
int kvzapAttentionBlocksPerSm(int dtype, int group_size, int sm);

// Bytes of float workspace for the split-K partial results (0: one split, no workspace).
size_t kvzapAttentionWorkspaceBytes(int num_rows, int num_q_heads, int head_dim, int max_keys, int split_size);

// Attention of each row's query heads over its kv head's kept pages + window pages + the new tokens
// of its sequence up to itself (causal). GQA: one thread block per (row, kv head, split) serves
// the whole query group (bf16 / fp16 with N > B: per group of up to 16 / G consecutive tokens of a
// sequence); splits merged by log-sum-exp. head_dim 64 or 128.
cudaError_t kvzapVarlenPagedAttention(const kvzapAttentionParams* p, int split_size, cudaStream_t stream);

// The kernels' index arithmetic (src/cache_index.cuh) on the host, for tests against the
// references. Each writes its results through the pointers.
void kvzapIndexLeavers(int ctx, int new_tokens, int window, int* lo, int* hi, int* stay_lo);
int kvzapIndexRingSlot(int pos, int window);
void kvzapIndexRingPageSlot(int pos, int window, int block_size, int* column, int* offset);
int kvzapIndexRingPages(int ctx, int window, int block_size);
void kvzapIndexPageSlot(int dst, int block_size, int* column, int* offset);
int kvzapIndexRowKeys(int kept, int ctx, int window, int t);
void kvzapIndexLocateKey(int j, int kept, int ring, int* source, int* index);
void kvzapIndexSplitKeys(int split, int split_size, int n_keys, int kept, int block_size, int* begin, int* end,
                         int* page_lo, int* page_hi);
int kvzapIndexNumSplits(int max_keys, int split_size);
// Where the attention kernel finds key j of a row in split `split`: its source (0 kept page, 1
// window, 2 new token) and, for a cached key, the column and offset in the split's staged page
// ids (kept pages' table columns [page_lo, page_hi), then window pages' ring columns
// [ring_lo, ring_hi)); ring_lo / ring_hi and the staged-ids bound come back too.
void kvzapIndexStagedKey(int j, int split, int split_size, int n_keys, int kept, int ring, int block_size,
                         int* source, int* column, int* offset, int* ring_lo, int* ring_hi, int* max_staged);
// Tile i of a split in the tensor-core attention path (16 keys, kept then window then new tokens,
// aligned in the source's index): its source, first source index, the source's range [lo, hi) in
// the split (key first + c is read when lo <= first + c < hi), and the split's number of tiles.
void kvzapIndexSplitTile(int i, int split, int split_size, int n_keys, int kept, int ring, int t, int* source,
                         int* first, int* lo, int* hi, int* num_tiles);
void kvzapIndexLeaverChunk(int chunk, int chunk_size, int lo, int hi, int* from, int* to);
int kvzapIndexRowSequence(const int32_t* cu_seqlens, int batch, int row);
// The tensor-core attention's packed launch (steps where some sequence brings several tokens):
// its number of row groups of up to tokens_per_group tokens, and group `group`'s tokens
// [t_lo, t_hi) of sequence `seq` (none when t_lo >= t_hi).
int kvzapIndexRowGroups(int num_rows, int batch, int tokens_per_group);
void kvzapIndexRowGroup(const int32_t* cu_seqlens, int batch, int tokens_per_group, int group, int* seq, int* t_lo,
                        int* t_hi);

#ifdef __cplusplus
}
#endif

#endif  // KVZAP_KERNELS_H_
