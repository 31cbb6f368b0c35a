// Host-side logic of the kvzap-trt TensorRT plugins that needs no TensorRT: field parsing into
// plain structs, the I/O tables (dtype class, aliasing, which input an output's shape and type
// follow), shape checks, output shapes, the bounds the kernels need from the host, the attention
// split and workspace. The plugins (kvzapVarlenPagedAttentionPlugin/, kvzapEvictPlugin/) are thin
// shells over these; tests/test_trt_plugins.py compiles this file without TensorRT and checks it.
//
// Every check returns "" on success or the error message (the plugins report it through
// TensorRT's error recorder / logger). Shapes are plain arrays; the cache layout is that of
// include/kvzap_kernels.h with the leading layer dimension L always present on the per-layer
// cache tensors (block_table, kept_len, ring_table): a plugin works on layer `layer` of them
// (evict: every layer when layer == -1 and k_new has a leading L). The window W is a field, not a
// shape: its tokens live in pool blocks listed by ring_table, whose last dimension must be
// ceil(W / block_size).

#ifndef KVZAP_PLUGIN_HOST_H_
#define KVZAP_PLUGIN_HOST_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvzap_trt {

// nvinfer1::PluginFieldType values of the field types used here (NvInferPluginBase.h); the
// TensorRT shells static_assert that they match.
enum FieldTypeCode : int32_t { kFIELD_FLOAT32 = 1, kFIELD_INT32 = 5 };
// nvinfer1::DataType values of the dtypes the kernels take (NvInferRuntimeBase.h), asserted too.
enum DTypeCode : int32_t { kDTYPE_FLOAT = 0, kDTYPE_HALF = 1, kDTYPE_INT32 = 3, kDTYPE_BF16 = 7 };

// A plugin field as TensorRT hands it over (name, data, PluginFieldType, number of values).
struct Field {
    char const* name;
    void const* data;
    int32_t type;
    int32_t length;
};

struct AttentionFields {
    int32_t layer = 0;   // layer of the [L, ...] cache tensors, >= 0
    int32_t window = 0;  // W, >= 0
    float scale = 0.f;   // softmax scale, > 0 and finite
};

struct EvictFields {
    int32_t layer = 0;      // >= 0: one layer (k_new [N, H, D]); -1: all layers (k_new [L, N, H, D])
    int32_t window = 0;     // W, >= 0
    float threshold = 0.f;  // tau: a leaver is kept iff its score >= tau; +-inf allowed, NaN not
};

// Each required field exactly once, with its type and one value; unknown names are errors.
std::string parseAttentionFields(Field const* fields, int32_t nbFields, AttentionFields& out);
std::string parseEvictFields(Field const* fields, int32_t nbFields, EvictFields& out);

// The fields to serialize (and the creator's field list): name, type, length 1, pointing into `f`.
std::vector<Field> attentionFieldsOf(AttentionFields const& f);
std::vector<Field> evictFieldsOf(EvictFields const& f);

// The dtype class of an I/O tensor: the K/V dtype of the call (float32/float16/bfloat16, the same
// for every kDATA tensor), int32, or float32 whatever the K/V dtype.
enum class Kind { kDATA, kINT32, kFLOAT32 };

struct IoSpec {
    char const* name;
    Kind kind;
    int32_t aliasedInput;  // outputs: the input whose memory the output is (-1: none)
    int32_t followsInput;  // outputs: the input whose shape and dtype the output has
};

struct PluginIo {
    std::vector<IoSpec> inputs;
    std::vector<IoSpec> outputs;
};

// Input order = kvzapAttentionParams / kvzapEvictParams order; outputs: attention's `out`, then
// the cache tensors it was given, each aliased to its input; evict: every cache tensor, aliased.
PluginIo const& attentionIo();
PluginIo const& evictIo();

namespace attn {
enum Input { kQ, kK_NEW, kV_NEW, kCU_SEQLENS, kSEQ_SLOTS, kCTX_LENS, kK_POOL, kV_POOL, kBLOCK_TABLE, kKEPT_LEN,
             kRING_TABLE, kERROR, kMAX_KEYS, kNB_INPUTS };
enum Output { kOUT, kNB_OUTPUTS = 7 };
}  // namespace attn

namespace evict {
enum Input { kK_NEW, kV_NEW, kSCORES, kCU_SEQLENS, kSEQ_SLOTS, kCTX_LENS, kK_POOL, kV_POOL, kPOS_POOL, kSCORE_POOL,
             kBLOCK_TABLE, kKEPT_LEN, kRING_TABLE, kFREE_STACK, kNUM_FREE, kERROR, kNB_INPUTS };
enum Output { kNB_OUTPUTS = 10 };
}  // namespace evict

// supportsFormatCombination without TensorRT: may tensor `pos` (inputs, then outputs) have dtype
// `dtype` given that the first tensor (q or k_new, which fixes the K/V dtype) has `dataDtype`?
// Layouts other than linear are refused by the shells.
bool supportsDtype(PluginIo const& io, int32_t pos, int32_t dtype, int32_t dataDtype);

// Size in bytes of a K/V dtype (0 if not one the kernels take).
int32_t dtypeBytes(int32_t dtype);

constexpr int32_t kMAX_RANK = 8;
struct Shape {
    int32_t nbDims = 0;
    int64_t d[kMAX_RANK] = {};
};

// enqueue's aliasing check without TensorRT: "" when every aliased output of a call with these
// input shapes and pointers is its input's memory (zero-element tensors excepted: their addresses
// mean nothing), else a message naming the first output that is not.
std::string aliasingProblem(PluginIo const& io, Shape const* inputShapes, void const* const* inputs,
                            void* const* outputs);

// enqueue's alignment check without TensorRT: "" when every K/V-typed (Kind::kDATA) input and
// output with elements starts on a 16-byte boundary (the kernels move them 16 bytes at a time; a
// misaligned one would fault on the device), else a message naming the first that does not.
std::string alignmentProblem(PluginIo const& io, Shape const* inputShapes, void const* const* inputs,
                             void* const* outputs);

// The dimensions of one call, resolved from the input shapes.
struct CallDims {
    int64_t N = 0;   // packed rows (new tokens of the batch)
    int64_t Hq = 0;  // query heads (attention)
    int64_t H = 0;   // kv heads
    int64_t D = 0;   // head_dim
    int64_t B = 0;   // sequences in the batch
    int64_t L = 0;   // layers of the cache tensors
    int64_t S = 0;   // sequence slots
    int64_t M = 0;   // block table columns per head
    int64_t NB = 0;  // pool blocks
    int64_t BS = 0;  // tokens per block
    int64_t W = 0;   // window tokens per head (the `window` field)
    int64_t R = 0;   // window pages per head: ring_table columns, ceil(W / BS)
    int64_t layers = 1;  // evict: layers this call works on (L when layer == -1)
    int64_t K = -1;      // attention: the length of the max_keys input, the step's key bound (-1: none)
};

// Every input's rank and dimensions against the others (what torch_ops.cpp checks), ring_table's
// columns against ceil(window / block_size), the layer index against L, head_dim and group size
// against what the kernels are built for, and that the host bounds below fit an int. `dtype` is
// the K/V dtype (DTypeCode).
std::string checkAttentionShapes(Shape const* inputs, int32_t nbInputs, AttentionFields const& f, int32_t dtype,
                                 CallDims& dims);
std::string checkEvictShapes(Shape const* inputs, int32_t nbInputs, EvictFields const& f, int32_t dtype,
                             CallDims& dims);

// Output shapes: each output has the shape of the input it follows (out: q's [N, Hq, D]).
std::vector<Shape> outputShapes(PluginIo const& io, Shape const* inputs, int32_t nbInputs);

// Host bounds, from shapes only (a plugin cannot read device data on the host, and TensorRT hands
// a plugin no host inputs):
//   attention max_keys = min(K, M * block_size + W + N): a row sees at most its head's kept pages
//     (<= M blocks), the window (<= W) and its sequence's new tokens (<= N); K, the length of the
//     max_keys input (its contents are never read), is the step's bound from the kept lengths the
//     host's scheduler knows, so that splits follow the compressed cache, not its capacity;
//   evict max_new_tokens = N - B + 1: every sequence of a step brings at least one new token (the
//     engine schedules no idle sequence), so none has more; 1 at decode (N == B), which takes the
//     warp-per-head kernel. (N when B == 0 or N < B: the precondition is broken, N still bounds.)
// The kernels set KVZAP_ERR_BOUND_EXCEEDED when a bound is below what they meet and their grid
// misses work: attention, only with a host K below a row's keys whose whole splits (>= 256 keys)
// miss some; evict, only when a sequence has more than N - B + 1 new tokens, which needs an idle
// sequence in the step (an idle head itself does nothing, exactly).
int64_t attentionMaxKeys(CallDims const& d);
int64_t evictMaxNewTokens(CallDims const& d);

// SM counts above this are clamped before the split heuristic, so that the workspace bound
// below holds on any device (no GPU has this many SMs yet; the split only changes speed).
constexpr int32_t kMAX_SMS = 256;
// Resident attention blocks per SM never exceed this (kvzapAttentionBlocksPerSm; tested).
constexpr int32_t kMAX_BLOCKS_PER_SM = 4;
// kMaxSplit in src/paged_attention.cu: the heuristic's largest split.
constexpr int32_t kMAX_SPLIT = 4096;

// The split kvzapVarlenPagedAttention's launcher would pick (kvzapAttentionSplitSize) for this
// call in `kernelDtype` (kvzapDtype) on `numSms` SMs (clamped to kMAX_SMS) of compute capability
// `sm`, and the workspace it needs.
int32_t attentionSplit(CallDims const& d, int32_t kernelDtype, int32_t numSms, int32_t sm);
size_t attentionWorkspaceBytes(CallDims const& d, int32_t splitSize);

// An upper bound of attentionWorkspaceBytes(d, attentionSplit(d, dtype, sms, sm)) over every dtype and device
// (any SM count, any sm) and every call with at most d.N rows and d.Hq query heads, d.D head_dim,
// max_keys at most attentionMaxKeys(d), at least d.H kv heads: non-decreasing in N, Hq, D, M, BS,
// W. With splits = ceil(K / split): N * Hq * splits <= max(SMs * blocks/SM * max(16, G), N * Hq *
// ceil(K / 4096)) (16: a packed launch's row groups hold up to 16 / G rows, so it asks for up to
// 16 / G times the splits of as many one-row blocks).
// getWorkspaceSize returns it for the profile's largest shapes; enqueue checks the real need
// against it for the real shapes.
size_t attentionWorkspaceBound(CallDims const& d);

// attentionWorkspaceBound over an optimization profile (getWorkspaceSize): the profile's largest
// N, Hq, D, block_size, M, its smallest H, and W = f.window. Ranks are checked; values are not (0
// if a rank is wrong: enqueue then refuses the call).
size_t attentionProfileWorkspace(Shape const* minInputs, Shape const* maxInputs, int32_t nbInputs,
                                 AttentionFields const& f);

}  // namespace kvzap_trt

#endif  // KVZAP_PLUGIN_HOST_H_
