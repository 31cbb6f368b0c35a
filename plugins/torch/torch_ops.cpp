// torch.ops.kvzap_trt.*: the CUDA kernels as PyTorch custom ops, over the C-ABI launchers.
//
// Arguments and layouts are those of the references in kvzap_trt/ops/ (see kvzap_kernels.h),
// except that cu_seqlens, seq_slots and ctx_lens are int32 tensors on the device and the host
// passes what it knows already (max_keys for attention). Every tensor must be contiguous on one
// CUDA device, the current one. The caller passes the stream (torch.cuda.current_stream().cuda_stream):
// the ops need no c10/cuda header, so they compile against any torch wheel, the CPU one included,
// which is how CI checks them.

#include <ATen/ops/empty.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "kvzap_kernels.h"

namespace {

kvzapDtype dtype_of(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return KVZAP_FLOAT32;
        case at::kHalf: return KVZAP_FLOAT16;
        case at::kBFloat16: return KVZAP_BFLOAT16;
        default: TORCH_CHECK(false, "kvzap_trt: unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
    }
}

void check(const at::Tensor& t, const char* name, at::ScalarType type, const at::Tensor& like) {
    TORCH_CHECK(t.is_cuda(), "kvzap_trt: ", name, " must be a CUDA tensor");
    TORCH_CHECK(t.device() == like.device(), "kvzap_trt: ", name, " is on ", t.device(), ", expected ", like.device());
    TORCH_CHECK(t.is_contiguous(), "kvzap_trt: ", name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == type, "kvzap_trt: ", name, " has dtype ", t.scalar_type(), ", expected ", type);
}

void check_cuda(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, "kvzap_trt: ", what, " failed: ", cudaGetErrorString(err));
}

void check_current_device(const at::Tensor& t) {
    int current = -1;
    check_cuda(cudaGetDevice(&current), "cudaGetDevice");
    TORCH_CHECK(current == t.get_device(), "kvzap_trt: tensors are on cuda:", t.get_device(), " but cuda:", current,
                " is current (use `with torch.cuda.device(...)`)");
}

// One layer (block_table [S, H, M], k_new [N, H, D]) or a whole step (leading L on both).
void evict_append(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& scores,
                  const at::Tensor& cu_seqlens, const at::Tensor& seq_slots, const at::Tensor& ctx_lens,
                  const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& pos_pool,
                  const at::Tensor& block_table, const at::Tensor& kept_len, const at::Tensor& ring_k,
                  const at::Tensor& ring_v, const at::Tensor& ring_score, const at::Tensor& free_stack,
                  const at::Tensor& num_free, const at::Tensor& error, double threshold, int64_t max_new_tokens,
                  int64_t stream) {
    const auto dt = k_pool.scalar_type();
    const bool layered = block_table.dim() == 4;
    TORCH_CHECK(block_table.dim() == 3 || layered, "kvzap_trt.evict_append: block_table must be [S, H, M] or [L, S, H, M]");
    const int64_t L = layered ? block_table.size(0) : 1;
    const int off = layered ? 1 : 0;
    TORCH_CHECK(k_new.dim() == 3 + off, "kvzap_trt.evict_append: k_new must be [", layered ? "L, " : "", "N, H, D]");
    for (auto [t, name] : {std::pair{k_new, "k_new"}, {v_new, "v_new"}, {k_pool, "k_pool"}, {v_pool, "v_pool"},
                           {ring_k, "ring_k"}, {ring_v, "ring_v"}})
        check(t, name, dt, k_pool);
    check(scores, "scores", at::kFloat, k_pool);
    check(ring_score, "ring_score", at::kFloat, k_pool);
    for (auto [t, name] : {std::pair{cu_seqlens, "cu_seqlens"}, {seq_slots, "seq_slots"}, {ctx_lens, "ctx_lens"},
                           {pos_pool, "pos_pool"}, {block_table, "block_table"}, {kept_len, "kept_len"},
                           {free_stack, "free_stack"}, {num_free, "num_free"}, {error, "error"}})
        check(t, name, at::kInt, k_pool);

    kvzapEvictParams p{};
    p.dtype = dtype_of(k_pool);
    p.num_layers = static_cast<int>(L);
    p.batch = static_cast<int>(seq_slots.numel());
    p.num_slots = static_cast<int>(block_table.size(off));
    p.num_kv_heads = static_cast<int>(block_table.size(off + 1));
    p.max_blocks_per_head = static_cast<int>(block_table.size(off + 2));
    p.head_dim = static_cast<int>(k_pool.size(2));
    p.block_size = static_cast<int>(k_pool.size(1));
    p.window = static_cast<int>(ring_k.size(off + 2));
    p.num_rows = static_cast<int>(k_new.size(off));
    p.threshold = static_cast<float>(threshold);
    p.max_new_tokens = static_cast<int>(max_new_tokens);
    TORCH_CHECK(cu_seqlens.numel() == p.batch + 1, "kvzap_trt.evict_append: cu_seqlens must have batch + 1 entries");
    TORCH_CHECK(k_new.size(off + 1) == p.num_kv_heads && k_new.size(off + 2) == p.head_dim,
                "kvzap_trt.evict_append: k_new heads/head_dim differ from the cache");
    p.k_new = k_new.data_ptr();
    p.v_new = v_new.data_ptr();
    p.scores = scores.data_ptr<float>();
    p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
    p.seq_slots = seq_slots.data_ptr<int32_t>();
    p.ctx_lens = ctx_lens.data_ptr<int32_t>();
    p.k_pool = k_pool.data_ptr();
    p.v_pool = v_pool.data_ptr();
    p.pos_pool = pos_pool.data_ptr<int32_t>();
    p.block_table = block_table.data_ptr<int32_t>();
    p.kept_len = kept_len.data_ptr<int32_t>();
    p.ring_k = ring_k.data_ptr();
    p.ring_v = ring_v.data_ptr();
    p.ring_score = ring_score.data_ptr<float>();
    p.free_stack = free_stack.data_ptr<int32_t>();
    p.num_free = num_free.data_ptr<int32_t>();
    p.error = error.data_ptr<int32_t>();
    check_current_device(k_pool);
    check_cuda(kvzapEvict(&p, reinterpret_cast<cudaStream_t>(stream)), "kvzapEvict");
}

void paged_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                     const at::Tensor& cu_seqlens, const at::Tensor& seq_slots, const at::Tensor& ctx_lens,
                     const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& block_table,
                     const at::Tensor& kept_len, const at::Tensor& ring_k, const at::Tensor& ring_v, double scale,
                     int64_t max_keys, int64_t split_size, const at::Tensor& out, int64_t stream) {
    const auto dt = q.scalar_type();
    for (auto [t, name] : {std::pair{q, "q"}, {k_new, "k_new"}, {v_new, "v_new"}, {k_pool, "k_pool"},
                           {v_pool, "v_pool"}, {ring_k, "ring_k"}, {ring_v, "ring_v"}, {out, "out"}})
        check(t, name, dt, q);
    for (auto [t, name] : {std::pair{cu_seqlens, "cu_seqlens"}, {seq_slots, "seq_slots"}, {ctx_lens, "ctx_lens"},
                           {block_table, "block_table"}, {kept_len, "kept_len"}})
        check(t, name, at::kInt, q);
    TORCH_CHECK(q.dim() == 3 && block_table.dim() == 3, "kvzap_trt.paged_attention: q [N, Hq, D], block_table [S, H, M]");
    TORCH_CHECK(out.sizes() == q.sizes(), "kvzap_trt.paged_attention: out must have q's shape");

    kvzapAttentionParams p{};
    p.dtype = dtype_of(q);
    p.batch = static_cast<int>(seq_slots.numel());
    p.num_slots = static_cast<int>(block_table.size(0));
    p.num_kv_heads = static_cast<int>(block_table.size(1));
    p.max_blocks_per_head = static_cast<int>(block_table.size(2));
    p.num_q_heads = static_cast<int>(q.size(1));
    p.head_dim = static_cast<int>(q.size(2));
    p.window = static_cast<int>(ring_k.size(2));
    p.block_size = static_cast<int>(k_pool.size(1));
    p.num_rows = static_cast<int>(q.size(0));
    p.max_keys = static_cast<int>(max_keys);
    p.scale = static_cast<float>(scale);
    TORCH_CHECK(p.num_q_heads % p.num_kv_heads == 0 && p.num_q_heads / p.num_kv_heads <= 8,
                "kvzap_trt.paged_attention: query heads per kv head must divide evenly and be at most 8");
    TORCH_CHECK(p.head_dim == 64 || p.head_dim == 128, "kvzap_trt.paged_attention: head_dim must be 64 or 128");
    p.q = q.data_ptr();
    p.k_new = k_new.data_ptr();
    p.v_new = v_new.data_ptr();
    p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
    p.seq_slots = seq_slots.data_ptr<int32_t>();
    p.ctx_lens = ctx_lens.data_ptr<int32_t>();
    p.k_pool = k_pool.data_ptr();
    p.v_pool = v_pool.data_ptr();
    p.block_table = block_table.data_ptr<int32_t>();
    p.kept_len = kept_len.data_ptr<int32_t>();
    p.ring_k = ring_k.data_ptr();
    p.ring_v = ring_v.data_ptr();
    p.out = out.data_ptr();

    check_current_device(q);
    int split = static_cast<int>(split_size);
    if (split <= 0) {
        int sms = 0;
        check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()), "reading the SM count");
        split = kvzapAttentionSplitSize(p.num_rows, p.num_kv_heads, p.max_keys, sms);
    }
    const size_t ws_bytes = kvzapAttentionWorkspaceBytes(p.num_rows, p.num_q_heads, p.head_dim, p.max_keys, split);
    at::Tensor workspace;
    if (ws_bytes) {
        workspace = at::empty({static_cast<int64_t>(ws_bytes / sizeof(float))}, q.options().dtype(at::kFloat));
        p.workspace = workspace.data_ptr<float>();
    }
    check_cuda(kvzapVarlenPagedAttention(&p, split, reinterpret_cast<cudaStream_t>(stream)), "kvzapVarlenPagedAttention");
}

}  // namespace

TORCH_LIBRARY(kvzap_trt, m) {
    m.def("evict_append(Tensor k_new, Tensor v_new, Tensor scores, Tensor cu_seqlens, Tensor seq_slots, "
          "Tensor ctx_lens, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor(c!) pos_pool, Tensor(d!) block_table, "
          "Tensor(e!) kept_len, Tensor(f!) ring_k, Tensor(g!) ring_v, Tensor(h!) ring_score, "
          "Tensor(i!) free_stack, Tensor(j!) num_free, Tensor(k!) error, float threshold, int max_new_tokens, int stream) -> ()");
    m.def("paged_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor cu_seqlens, Tensor seq_slots, "
          "Tensor ctx_lens, Tensor k_pool, Tensor v_pool, Tensor block_table, Tensor kept_len, Tensor ring_k, "
          "Tensor ring_v, float scale, int max_keys, int split_size, Tensor(a!) out, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(kvzap_trt, CUDA, m) {
    m.impl("evict_append", &evict_append);
    m.impl("paged_attention", &paged_attention);
}
