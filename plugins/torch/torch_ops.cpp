// torch.ops.kvzap_trt.*: the CUDA kernels as PyTorch custom ops, over the C-ABI launchers.
//
// Arguments and layouts are those of the references in kvzap_trt/ops/ (see kvzap_kernels.h),
// except that cu_seqlens, seq_slots and ctx_lens are int32 tensors on the device and the host
// passes what it knows already (max_new_tokens for evict, max_keys and split_size for attention).
// The window W is an argument of both: no tensor's shape fixes it (ring_table has ceil(W / bs) columns).
// Every tensor must be contiguous on one CUDA device, the current one; every shape is checked
// against the cache's and every vector-accessed pointer for 16-byte alignment: a mismatch is an
// error naming the argument. Values inside the index tensors (slots, lengths, block ids) are not
// read here (that would sync): kvzap_trt/ops/cuda_kernels.py checks the batch description on its
// host copy; a direct caller must pass valid ones. The caller passes the stream
// (torch.cuda.current_stream().cuda_stream) and owns every buffer the kernels write, the
// attention workspace and error flag included, so they are allocated on the stream the op runs
// on: the ops need no c10/cuda header and compile against any torch wheel, the CPU one included,
// which is how CI checks them. attention_split and attention_workspace_floats (int-only) size
// the workspace.

#include <cuda_runtime.h>
#include <torch/library.h>

#include <climits>
#include <initializer_list>
#include <vector>

#include "kvzap_kernels.h"

namespace {

kvzapDtype kernel_dtype(at::ScalarType type, const char* op) {
    switch (type) {
        case at::kFloat: return KVZAP_FLOAT32;
        case at::kHalf: return KVZAP_FLOAT16;
        case at::kBFloat16: return KVZAP_BFLOAT16;
        default: TORCH_CHECK(false, op, ": unsupported dtype ", type, " (float32, float16, bfloat16)");
    }
}

kvzapDtype dtype_of(const at::Tensor& t) { return kernel_dtype(t.scalar_type(), "kvzap_trt"); }

void check(const char* op, const at::Tensor& t, const char* name, at::ScalarType type, const at::Tensor& like) {
    TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
    TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ", like.device());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == type, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", type);
}

void check_shape(const char* op, const at::Tensor& t, const char* name, std::initializer_list<int64_t> want) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": ", name, " has shape ", t.sizes(), ", expected ",
                at::IntArrayRef(want));
}

// The kernels read and write these in 16-byte vectors.
void check_aligned(const char* op, const at::Tensor& t, const char* name) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
                " must be 16-byte aligned (a view at an offset is not)");
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

// One layer (block_table [S, H, M], k_new [N, H, D]) or a whole step (leading L on every per-layer tensor).
void evict_append(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& scores,
                  const at::Tensor& cu_seqlens, const at::Tensor& seq_slots, const at::Tensor& ctx_lens,
                  const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& pos_pool,
                  const at::Tensor& score_pool, const at::Tensor& block_table, const at::Tensor& kept_len,
                  const at::Tensor& ring_table, const at::Tensor& free_stack, const at::Tensor& num_free,
                  const at::Tensor& error, int64_t window, double threshold, int64_t max_new_tokens, int64_t stream) {
    constexpr const char* op = "kvzap_trt.evict_append";
    const auto dt = k_pool.scalar_type();
    for (auto [t, name] : {std::pair{k_new, "k_new"}, {v_new, "v_new"}, {k_pool, "k_pool"}, {v_pool, "v_pool"}})
        check(op, t, name, dt, k_pool);
    check(op, scores, "scores", at::kFloat, k_pool);
    check(op, score_pool, "score_pool", at::kFloat, k_pool);
    for (auto [t, name] : {std::pair{cu_seqlens, "cu_seqlens"}, {seq_slots, "seq_slots"}, {ctx_lens, "ctx_lens"},
                           {pos_pool, "pos_pool"}, {block_table, "block_table"}, {kept_len, "kept_len"},
                           {ring_table, "ring_table"}, {free_stack, "free_stack"}, {num_free, "num_free"},
                           {error, "error"}})
        check(op, t, name, at::kInt, k_pool);
    TORCH_CHECK(k_pool.dim() == 3, op, ": k_pool must be [num_blocks, block_size, D]");
    TORCH_CHECK(block_table.dim() == 3 || block_table.dim() == 4, op, ": block_table must be [S, H, M] or [L, S, H, M]");
    const bool layered = block_table.dim() == 4;
    const int64_t L = layered ? block_table.size(0) : 1, off = layered ? 1 : 0;
    const int64_t S = block_table.size(off), H = block_table.size(off + 1), M = block_table.size(off + 2);
    const int64_t NB = k_pool.size(0), BS = k_pool.size(1), D = k_pool.size(2);
    TORCH_CHECK(window >= 0 && window <= INT_MAX, op, ": window must be in [0, INT_MAX], got ", window);
    TORCH_CHECK(BS > 0, op, ": block_size must be > 0");
    const int64_t W = window, R = (W + BS - 1) / BS;
    TORCH_CHECK(k_new.dim() == 3 + off, op, ": k_new must be [", layered ? "L, " : "", "N, H, D]");
    const int64_t N = k_new.size(off), B = seq_slots.numel();
    auto per_layer = [&](std::initializer_list<int64_t> dims) {
        std::vector<int64_t> v(dims);
        if (layered) v.insert(v.begin(), L);
        return v;
    };
    auto shape = [&](const at::Tensor& t, const char* name, std::vector<int64_t> want) {
        TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": ", name, " has shape ", t.sizes(), ", expected ",
                    at::IntArrayRef(want));
    };
    shape(k_new, "k_new", per_layer({N, H, D}));
    shape(v_new, "v_new", per_layer({N, H, D}));
    shape(scores, "scores", per_layer({N, H}));
    shape(kept_len, "kept_len", per_layer({S, H}));
    shape(ring_table, "ring_table (R = ceil(window / block_size))", per_layer({S, H, R}));
    check_shape(op, v_pool, "v_pool", {NB, BS, D});
    check_shape(op, pos_pool, "pos_pool", {NB, BS});
    check_shape(op, score_pool, "score_pool", {NB, BS});
    check_shape(op, free_stack, "free_stack", {NB});
    check_shape(op, num_free, "num_free", {1});
    check_shape(op, error, "error", {1});
    check_shape(op, cu_seqlens, "cu_seqlens", {B + 1});
    check_shape(op, ctx_lens, "ctx_lens", {B});
    TORCH_CHECK(D * k_pool.element_size() % 16 == 0, op, ": head_dim ", D, " x ", k_pool.element_size(),
                " bytes must be a multiple of 16 bytes");
    for (auto [t, name] : {std::pair{k_new, "k_new"}, {v_new, "v_new"}, {k_pool, "k_pool"}, {v_pool, "v_pool"}})
        check_aligned(op, t, name);
    TORCH_CHECK(seq_slots.dim() == 1, op, ": seq_slots must be [B]");
    TORCH_CHECK(max_new_tokens >= 0 && max_new_tokens <= N, op, ": max_new_tokens must be in [0, N] (0: unknown), got ",
                max_new_tokens);

    kvzapEvictParams p{};
    p.dtype = dtype_of(k_pool);
    p.num_layers = static_cast<int>(L);
    p.batch = static_cast<int>(B);
    p.num_slots = static_cast<int>(S);
    p.num_kv_heads = static_cast<int>(H);
    p.max_blocks_per_head = static_cast<int>(M);
    p.head_dim = static_cast<int>(D);
    p.block_size = static_cast<int>(BS);
    p.window = static_cast<int>(W);
    p.ring_pages = static_cast<int>(R);
    p.num_rows = static_cast<int>(N);
    p.threshold = static_cast<float>(threshold);
    p.max_new_tokens = static_cast<int>(max_new_tokens);
    p.k_new = k_new.data_ptr();
    p.v_new = v_new.data_ptr();
    p.scores = scores.data_ptr<float>();
    p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
    p.seq_slots = seq_slots.data_ptr<int32_t>();
    p.ctx_lens = ctx_lens.data_ptr<int32_t>();
    p.k_pool = k_pool.data_ptr();
    p.v_pool = v_pool.data_ptr();
    p.pos_pool = pos_pool.data_ptr<int32_t>();
    p.score_pool = score_pool.data_ptr<float>();
    p.block_table = block_table.data_ptr<int32_t>();
    p.kept_len = kept_len.data_ptr<int32_t>();
    p.ring_table = ring_table.data_ptr<int32_t>();
    p.free_stack = free_stack.data_ptr<int32_t>();
    p.num_free = num_free.data_ptr<int32_t>();
    p.error = error.data_ptr<int32_t>();
    check_current_device(k_pool);
    check_cuda(kvzapEvict(&p, reinterpret_cast<cudaStream_t>(stream)), "kvzapEvict");
}

// Keys per thread block for attention of `dtype` K/V over num_rows rows of `batch` sequences on a
// device of num_sms SMs and compute capability sm (XY).
int64_t attention_split(at::ScalarType dtype, int64_t num_rows, int64_t batch, int64_t num_q_heads,
                        int64_t num_kv_heads, int64_t max_keys, int64_t num_sms, int64_t sm) {
    TORCH_CHECK(num_kv_heads > 0 && batch >= 0 && max_keys >= 0 && num_sms > 0, "kvzap_trt.attention_split: bad arguments");
    return kvzapAttentionSplitSize(kernel_dtype(dtype, "kvzap_trt.attention_split"), static_cast<int>(num_rows),
                                   static_cast<int>(batch), static_cast<int>(num_q_heads),
                                   static_cast<int>(num_kv_heads), static_cast<int>(max_keys),
                                   static_cast<int>(num_sms), static_cast<int>(sm));
}

// float32 elements of workspace attention needs with this split (0: one split, none).
int64_t attention_workspace_floats(int64_t num_rows, int64_t num_q_heads, int64_t head_dim, int64_t max_keys,
                                   int64_t split_size) {
    TORCH_CHECK(split_size > 0, "kvzap_trt.attention_workspace_floats: split_size must be > 0");
    return static_cast<int64_t>(kvzapAttentionWorkspaceBytes(static_cast<int>(num_rows), static_cast<int>(num_q_heads),
                                                             static_cast<int>(head_dim), static_cast<int>(max_keys),
                                                             static_cast<int>(split_size)) / sizeof(float));
}

void paged_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                     const at::Tensor& cu_seqlens, const at::Tensor& seq_slots, const at::Tensor& ctx_lens,
                     const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& block_table,
                     const at::Tensor& kept_len, const at::Tensor& ring_table, int64_t window, double scale,
                     int64_t max_keys, int64_t split_size, const at::Tensor& out, const at::Tensor& workspace,
                     const at::Tensor& error, int64_t stream) {
    constexpr const char* op = "kvzap_trt.paged_attention";
    const auto dt = q.scalar_type();
    for (auto [t, name] : {std::pair{q, "q"}, {k_new, "k_new"}, {v_new, "v_new"}, {k_pool, "k_pool"},
                           {v_pool, "v_pool"}, {out, "out"}})
        check(op, t, name, dt, q);
    for (auto [t, name] : {std::pair{cu_seqlens, "cu_seqlens"}, {seq_slots, "seq_slots"}, {ctx_lens, "ctx_lens"},
                           {block_table, "block_table"}, {kept_len, "kept_len"}, {ring_table, "ring_table"},
                           {error, "error"}})
        check(op, t, name, at::kInt, q);
    check(op, workspace, "workspace", at::kFloat, q);
    TORCH_CHECK(q.dim() == 3, op, ": q must be [N, Hq, D]");
    TORCH_CHECK(block_table.dim() == 3, op, ": block_table must be [S, H, M]");
    TORCH_CHECK(k_pool.dim() == 3, op, ": k_pool must be [num_blocks, block_size, D]");
    TORCH_CHECK(seq_slots.dim() == 1, op, ": seq_slots must be [B]");
    const int64_t N = q.size(0), Hq = q.size(1), D = k_pool.size(2), B = seq_slots.numel();
    const int64_t S = block_table.size(0), H = block_table.size(1), BS = k_pool.size(1);
    TORCH_CHECK(BS > 0, op, ": block_size must be > 0");
    TORCH_CHECK(window >= 0 && window <= INT_MAX, op, ": window must be in [0, INT_MAX], got ", window);
    TORCH_CHECK(B > 0 || N == 0, op, ": ", N, " rows of q but no sequence in seq_slots (every row belongs to one)");
    const int64_t R = (window + BS - 1) / BS;
    check_shape(op, q, "q", {N, Hq, D});  // head_dim from the cache
    TORCH_CHECK(H > 0 && Hq % H == 0 && Hq / H <= 8, op, ": q has ", Hq, " heads for ", H,
                " kv heads: query heads per kv head must divide evenly and be at most 8");
    TORCH_CHECK(D == 64 || D == 128, op, ": head_dim must be 64 or 128, got ", D);
    check_shape(op, k_new, "k_new", {N, H, D});
    check_shape(op, v_new, "v_new", {N, H, D});
    check_shape(op, v_pool, "v_pool", {k_pool.size(0), BS, D});
    check_shape(op, kept_len, "kept_len", {S, H});
    check_shape(op, ring_table, "ring_table (R = ceil(window / block_size))", {S, H, R});
    check_shape(op, out, "out", {N, Hq, D});
    check_shape(op, cu_seqlens, "cu_seqlens", {B + 1});
    check_shape(op, ctx_lens, "ctx_lens", {B});
    check_shape(op, error, "error", {1});
    for (auto [t, name] : {std::pair{q, "q"}, {k_new, "k_new"}, {v_new, "v_new"}, {k_pool, "k_pool"},
                           {v_pool, "v_pool"}})
        check_aligned(op, t, name);
    TORCH_CHECK(split_size > 0 && split_size <= 4096, op, ": split_size must be in [1, 4096] (see attention_split), got ",
                split_size);
    TORCH_CHECK(max_keys >= 0 && max_keys <= INT_MAX, op, ": max_keys out of range: ", max_keys);
    TORCH_CHECK((max_keys + split_size - 1) / split_size <= 65535, op, ": ", max_keys, " keys in splits of ", split_size,
                " are more than 65535 splits (the launch grid's z); take attention_split's split size");
    TORCH_CHECK(workspace.numel() >= attention_workspace_floats(N, Hq, D, max_keys, split_size), op, ": workspace has ",
                workspace.numel(), " floats, needs ", attention_workspace_floats(N, Hq, D, max_keys, split_size));

    kvzapAttentionParams p{};
    p.dtype = dtype_of(q);
    p.batch = static_cast<int>(B);
    p.num_slots = static_cast<int>(S);
    p.num_kv_heads = static_cast<int>(H);
    p.max_blocks_per_head = static_cast<int>(block_table.size(2));
    p.num_q_heads = static_cast<int>(Hq);
    p.head_dim = static_cast<int>(D);
    p.window = static_cast<int>(window);
    p.ring_pages = static_cast<int>(R);
    p.block_size = static_cast<int>(BS);
    p.num_rows = static_cast<int>(N);
    p.max_keys = static_cast<int>(max_keys);
    p.scale = static_cast<float>(scale);
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
    p.ring_table = ring_table.data_ptr<int32_t>();
    p.out = out.data_ptr();
    p.workspace = workspace.numel() ? workspace.data_ptr<float>() : nullptr;
    p.error = error.data_ptr<int32_t>();
    check_current_device(q);
    check_cuda(kvzapVarlenPagedAttention(&p, static_cast<int>(split_size), reinterpret_cast<cudaStream_t>(stream)),
               "kvzapVarlenPagedAttention");
}

}  // namespace

TORCH_LIBRARY(kvzap_trt, m) {
    m.def("evict_append(Tensor k_new, Tensor v_new, Tensor scores, Tensor cu_seqlens, Tensor seq_slots, "
          "Tensor ctx_lens, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor(c!) pos_pool, Tensor(d!) score_pool, "
          "Tensor(e!) block_table, Tensor(f!) kept_len, Tensor(g!) ring_table, Tensor(h!) free_stack, "
          "Tensor(i!) num_free, Tensor(j!) error, int window, float threshold, int max_new_tokens, int stream) -> ()");
    m.def("paged_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor cu_seqlens, Tensor seq_slots, "
          "Tensor ctx_lens, Tensor k_pool, Tensor v_pool, Tensor block_table, Tensor kept_len, Tensor ring_table, "
          "int window, float scale, int max_keys, int split_size, Tensor(a!) out, Tensor(b!) workspace, "
          "Tensor(c!) error, int stream) -> ()");
    // No tensor arguments: one kernel for every dispatch key.
    m.def("attention_split(ScalarType dtype, int num_rows, int batch, int num_q_heads, int num_kv_heads, int max_keys, "
          "int num_sms, int sm) -> int",
          &attention_split);
    m.def("attention_workspace_floats(int num_rows, int num_q_heads, int head_dim, int max_keys, int split_size) -> int",
          &attention_workspace_floats);
}

TORCH_LIBRARY_IMPL(kvzap_trt, CUDA, m) {
    m.impl("evict_append", &evict_append);
    m.impl("paged_attention", &paged_attention);
}
