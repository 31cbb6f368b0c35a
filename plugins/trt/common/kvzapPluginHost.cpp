// Host-side logic of the kvzap-trt TensorRT plugins (see kvzapPluginHost.h). No TensorRT header.

#include "kvzapPluginHost.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>

#include "kvzapPluginConstants.h"
#include "kvzap_kernels.h"

namespace kvzap_trt {
namespace {

char const* typeName(int32_t type) {
    switch (type) {
        case kFIELD_FLOAT32: return "float32";
        case kFIELD_INT32: return "int32";
        default: return "another type";
    }
}

// One scalar field: its name among `expected`, its type, one value, not given twice.
struct ScalarSpec {
    char const* name;
    int32_t type;
    void* dest;
    bool seen = false;
};

std::string parseScalars(char const* plugin, Field const* fields, int32_t nbFields, std::vector<ScalarSpec>& specs) {
    if (nbFields < 0 || (nbFields > 0 && fields == nullptr)) return std::string(plugin) + ": no field collection";
    for (int32_t i = 0; i < nbFields; ++i) {
        Field const& f = fields[i];
        if (f.name == nullptr) return std::string(plugin) + ": field " + std::to_string(i) + " has no name";
        auto spec = std::find_if(specs.begin(), specs.end(), [&](ScalarSpec const& s) { return !std::strcmp(s.name, f.name); });
        if (spec == specs.end()) {
            std::string known;
            for (auto const& s : specs) known += std::string(known.empty() ? "" : ", ") + s.name;
            return std::string(plugin) + ": unknown field '" + f.name + "' (fields: " + known + ")";
        }
        if (spec->seen) return std::string(plugin) + ": field '" + f.name + "' given twice";
        if (f.type != spec->type)
            return std::string(plugin) + ": field '" + f.name + "' must be " + typeName(spec->type) + ", got " +
                   typeName(f.type) + " (PluginFieldType " + std::to_string(f.type) + ")";
        if (f.length != 1)
            return std::string(plugin) + ": field '" + f.name + "' must hold one value, got " + std::to_string(f.length);
        if (f.data == nullptr) return std::string(plugin) + ": field '" + f.name + "' has no data";
        std::memcpy(spec->dest, f.data, 4);  // int32 and float32 alike
        spec->seen = true;
    }
    for (auto const& s : specs)
        if (!s.seen) return std::string(plugin) + ": missing field '" + s.name + "' (" + typeName(s.type) + ")";
    return "";
}

// Shape helpers: rank and named dims, with messages naming the tensor.
std::string str(Shape const& s) {
    std::ostringstream o;
    o << "[";
    for (int32_t i = 0; i < s.nbDims; ++i) o << (i ? ", " : "") << s.d[i];
    o << "]";
    return o.str();
}

struct Checker {
    char const* plugin;
    PluginIo const& io;
    Shape const* in;
    std::string error;

    bool rank(int32_t i, int32_t r) {
        if (!error.empty()) return false;
        if (in[i].nbDims != r) {
            error = std::string(plugin) + ": " + io.inputs[i].name + " has shape " + str(in[i]) + ", expected rank " +
                    std::to_string(r);
            return false;
        }
        for (int32_t k = 0; k < r; ++k)
            if (in[i].d[k] < 0) {
                error = std::string(plugin) + ": " + io.inputs[i].name + " has unresolved shape " + str(in[i]);
                return false;
            }
        return true;
    }
    // Shape of input i must be `want` (as written in `what`, e.g. "[N, H, D]").
    void shape(int32_t i, std::vector<int64_t> const& want, char const* what) {
        if (!error.empty()) return;
        bool ok = in[i].nbDims == static_cast<int32_t>(want.size());
        for (size_t k = 0; ok && k < want.size(); ++k) ok = in[i].d[k] == want[k];
        if (!ok) {
            Shape w;
            w.nbDims = static_cast<int32_t>(want.size());
            std::copy(want.begin(), want.end(), w.d);
            error = std::string(plugin) + ": " + io.inputs[i].name + " has shape " + str(in[i]) + ", expected " + what +
                    " = " + str(w);
        }
    }
    void require(bool ok, std::string const& message) {
        if (error.empty() && !ok) error = std::string(plugin) + ": " + message;
    }
    void layerInRange(int32_t layer, int64_t L) {
        require(layer < L, "field 'layer' is " + std::to_string(layer) + " but the cache has L = " + std::to_string(L) +
                               " layers");
    }
};

// The inputs both plugins take, by their index in each plugin's input order.
struct CacheInputs {
    int32_t cuSeqlens, seqSlots, ctxLens, kPool, vPool, blockTable, keptLen, ringTable;
};

// The dims k_pool, block_table and seq_slots fix (ranks already checked): NB, BS, D, L, S, H, M and
// B; W is the `window` field and R = ceil(W / BS) (0 while BS is not > 0: that is refused first).
void readCacheDims(Shape const* in, CacheInputs const& i, int32_t window, CallDims& d) {
    d.NB = in[i.kPool].d[0];
    d.BS = in[i.kPool].d[1];
    d.D = in[i.kPool].d[2];
    d.L = in[i.blockTable].d[0];
    d.S = in[i.blockTable].d[1];
    d.H = in[i.blockTable].d[2];
    d.M = in[i.blockTable].d[3];
    d.B = in[i.seqSlots].d[0];
    d.W = window;
    d.R = d.BS > 0 ? (d.W + d.BS - 1) / d.BS : 0;
}

// The batch inputs and the pool against `d`. Two groups (this and checkLayerCache), so that each
// plugin keeps its order of checks: evict checks pos_pool between them.
void checkBatchAndPool(Checker& c, CacheInputs const& i, CallDims const& d) {
    c.shape(i.cuSeqlens, {d.B + 1}, "[B + 1]");
    c.shape(i.ctxLens, {d.B}, "[B]");
    c.shape(i.vPool, {d.NB, d.BS, d.D}, "[num_blocks, block_size, D]");
}

// The per-layer cache tensors kept_len and ring_table against `d`.
void checkLayerCache(Checker& c, CacheInputs const& i, CallDims const& d) {
    c.shape(i.keptLen, {d.L, d.S, d.H}, "[L, S, H]");
    std::string const ring = "[L, S, H, ceil(window / block_size)] (window " + std::to_string(d.W) +
                             ", block_size " + std::to_string(d.BS) + ")";
    c.shape(i.ringTable, {d.L, d.S, d.H, d.R}, ring.c_str());
}

// The fields both plugins have: layer is checked by each, window here.
std::string windowError(char const* plugin, int32_t window) {
    if (window >= 0) return "";
    return std::string(plugin) + ": field 'window' must be >= 0, got " + std::to_string(window);
}

bool fitsInt(CallDims const& d) {
    for (int64_t v : {d.N, d.Hq, d.H, d.D, d.B, d.L, d.S, d.M, d.NB, d.BS, d.W, d.R})
        if (v > INT_MAX) return false;
    return true;
}

}  // namespace

std::string parseAttentionFields(Field const* fields, int32_t nbFields, AttentionFields& out) {
    AttentionFields f;
    std::vector<ScalarSpec> specs{{kFIELD_LAYER, kFIELD_INT32, &f.layer},
                                  {kFIELD_WINDOW, kFIELD_INT32, &f.window},
                                  {kFIELD_SCALE, kFIELD_FLOAT32, &f.scale}};
    std::string error = parseScalars(kATTENTION_NAME, fields, nbFields, specs);
    if (!error.empty()) return error;
    if (f.layer < 0) return std::string(kATTENTION_NAME) + ": field 'layer' must be >= 0, got " + std::to_string(f.layer);
    error = windowError(kATTENTION_NAME, f.window);
    if (!error.empty()) return error;
    if (!(f.scale > 0.f) || !std::isfinite(f.scale))
        return std::string(kATTENTION_NAME) + ": field 'scale' must be finite and > 0, got " + std::to_string(f.scale);
    out = f;
    return "";
}

std::string parseEvictFields(Field const* fields, int32_t nbFields, EvictFields& out) {
    EvictFields f;
    std::vector<ScalarSpec> specs{{kFIELD_LAYER, kFIELD_INT32, &f.layer},
                                  {kFIELD_WINDOW, kFIELD_INT32, &f.window},
                                  {kFIELD_THRESHOLD, kFIELD_FLOAT32, &f.threshold}};
    std::string error = parseScalars(kEVICT_NAME, fields, nbFields, specs);
    if (!error.empty()) return error;
    if (f.layer < -1)
        return std::string(kEVICT_NAME) + ": field 'layer' must be >= 0, or -1 for all layers, got " +
               std::to_string(f.layer);
    error = windowError(kEVICT_NAME, f.window);
    if (!error.empty()) return error;
    if (std::isnan(f.threshold)) return std::string(kEVICT_NAME) + ": field 'threshold' is NaN";
    out = f;
    return "";
}

std::vector<Field> attentionFieldsOf(AttentionFields const& f) {
    return {{kFIELD_LAYER, &f.layer, kFIELD_INT32, 1},
            {kFIELD_WINDOW, &f.window, kFIELD_INT32, 1},
            {kFIELD_SCALE, &f.scale, kFIELD_FLOAT32, 1}};
}

std::vector<Field> evictFieldsOf(EvictFields const& f) {
    return {{kFIELD_LAYER, &f.layer, kFIELD_INT32, 1},
            {kFIELD_WINDOW, &f.window, kFIELD_INT32, 1},
            {kFIELD_THRESHOLD, &f.threshold, kFIELD_FLOAT32, 1}};
}

PluginIo const& attentionIo() {
    using namespace attn;
    static PluginIo const io{
        {{"q", Kind::kDATA, -1, -1},
         {"k_new", Kind::kDATA, -1, -1},
         {"v_new", Kind::kDATA, -1, -1},
         {"cu_seqlens", Kind::kINT32, -1, -1},
         {"seq_slots", Kind::kINT32, -1, -1},
         {"ctx_lens", Kind::kINT32, -1, -1},
         {"k_pool", Kind::kDATA, -1, -1},
         {"v_pool", Kind::kDATA, -1, -1},
         {"block_table", Kind::kINT32, -1, -1},
         {"kept_len", Kind::kINT32, -1, -1},
         {"ring_table", Kind::kINT32, -1, -1},
         {"error", Kind::kINT32, -1, -1},
         {"max_keys", Kind::kINT32, -1, -1}},
        {{"out", Kind::kDATA, -1, kQ},
         {"k_pool_out", Kind::kDATA, kK_POOL, kK_POOL},
         {"v_pool_out", Kind::kDATA, kV_POOL, kV_POOL},
         {"block_table_out", Kind::kINT32, kBLOCK_TABLE, kBLOCK_TABLE},
         {"kept_len_out", Kind::kINT32, kKEPT_LEN, kKEPT_LEN},
         {"ring_table_out", Kind::kINT32, kRING_TABLE, kRING_TABLE},
         {"error_out", Kind::kINT32, kERROR, kERROR}}};
    return io;
}

PluginIo const& evictIo() {
    using namespace evict;
    static PluginIo const io = [] {
        PluginIo io{{{"k_new", Kind::kDATA, -1, -1},
                     {"v_new", Kind::kDATA, -1, -1},
                     {"scores", Kind::kFLOAT32, -1, -1},
                     {"cu_seqlens", Kind::kINT32, -1, -1},
                     {"seq_slots", Kind::kINT32, -1, -1},
                     {"ctx_lens", Kind::kINT32, -1, -1},
                     {"k_pool", Kind::kDATA, -1, -1},
                     {"v_pool", Kind::kDATA, -1, -1},
                     {"pos_pool", Kind::kINT32, -1, -1},
                     {"score_pool", Kind::kFLOAT32, -1, -1},
                     {"block_table", Kind::kINT32, -1, -1},
                     {"kept_len", Kind::kINT32, -1, -1},
                     {"ring_table", Kind::kINT32, -1, -1},
                     {"free_stack", Kind::kINT32, -1, -1},
                     {"num_free", Kind::kINT32, -1, -1},
                     {"error", Kind::kINT32, -1, -1}},
                    {}};
        // Every cache tensor, in input order, comes back aliased: "<name>_out".
        static std::vector<std::string> names;
        names.reserve(kNB_INPUTS - kK_POOL);
        for (int32_t i = kK_POOL; i < kNB_INPUTS; ++i) names.push_back(std::string(io.inputs[i].name) + "_out");
        for (int32_t i = kK_POOL; i < kNB_INPUTS; ++i)
            io.outputs.push_back({names[i - kK_POOL].c_str(), io.inputs[i].kind, i, i});
        return io;
    }();
    return io;
}

int32_t dtypeBytes(int32_t dtype) {
    switch (dtype) {
        case kDTYPE_FLOAT: return 4;
        case kDTYPE_HALF:
        case kDTYPE_BF16: return 2;
        default: return 0;
    }
}

bool supportsDtype(PluginIo const& io, int32_t pos, int32_t dtype, int32_t dataDtype) {
    int32_t const nbIn = static_cast<int32_t>(io.inputs.size());
    if (pos < 0 || pos >= nbIn + static_cast<int32_t>(io.outputs.size())) return false;
    IoSpec const& spec = pos < nbIn ? io.inputs[pos] : io.outputs[pos - nbIn];
    switch (spec.kind) {
        case Kind::kINT32: return dtype == kDTYPE_INT32;
        case Kind::kFLOAT32: return dtype == kDTYPE_FLOAT;
        case Kind::kDATA: return dtypeBytes(dtype) > 0 && (pos == 0 || dtype == dataDtype);
    }
    return false;
}

// A tensor of this shape has no elements: its address means nothing.
static bool noElements(Shape const& s) {
    for (int32_t i = 0; i < s.nbDims; ++i)
        if (s.d[i] == 0) return true;
    return false;
}

std::string aliasingProblem(PluginIo const& io, Shape const* inputShapes, void const* const* inputs,
                            void* const* outputs) {
    for (size_t o = 0; o < io.outputs.size(); ++o) {
        int32_t const a = io.outputs[o].aliasedInput;
        if (a < 0 || outputs[o] == inputs[a] || noElements(inputShapes[a])) continue;
        return std::string("output ") + io.outputs[o].name + " is not the memory of its input " + io.inputs[a].name +
               ": aliased plugin I/O is off (build the engine with the ALIASED_PLUGIN_IO_10_03 preview feature), "
               "so the cache updates would be lost";
    }
    return "";
}

std::string alignmentProblem(PluginIo const& io, Shape const* inputShapes, void const* const* inputs,
                             void* const* outputs) {
    auto misaligned = [](void const* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 != 0; };
    auto message = [](char const* what, char const* name) {
        return std::string(what) + " " + name + " is not 16-byte aligned: the kernels move K/V-typed tensors 16 bytes at a time";
    };
    for (size_t i = 0; i < io.inputs.size(); ++i)
        if (io.inputs[i].kind == Kind::kDATA && !noElements(inputShapes[i]) && misaligned(inputs[i]))
            return message("input", io.inputs[i].name);
    for (size_t o = 0; o < io.outputs.size(); ++o)
        if (io.outputs[o].kind == Kind::kDATA && !noElements(inputShapes[io.outputs[o].followsInput]) &&
            misaligned(outputs[o]))
            return message("output", io.outputs[o].name);
    return "";
}

std::string checkAttentionShapes(Shape const* in, int32_t nbInputs, AttentionFields const& f, int32_t dtype,
                                 CallDims& dims) {
    using namespace attn;
    Checker c{kATTENTION_NAME, attentionIo(), in, ""};
    if (nbInputs != kNB_INPUTS)
        return std::string(kATTENTION_NAME) + ": expected " + std::to_string(kNB_INPUTS) + " inputs, got " +
               std::to_string(nbInputs);
    c.require(dtypeBytes(dtype) > 0, "q must be float32, float16 or bfloat16");
    if (!c.rank(kQ, 3) || !c.rank(kK_POOL, 3) || !c.rank(kBLOCK_TABLE, 4) || !c.rank(kSEQ_SLOTS, 1)) return c.error;
    CacheInputs const cache{kCU_SEQLENS, kSEQ_SLOTS,   kCTX_LENS, kK_POOL,
                            kV_POOL,     kBLOCK_TABLE, kKEPT_LEN, kRING_TABLE};
    CallDims d;
    readCacheDims(in, cache, f.window, d);
    c.require(d.BS > 0, "block_size (k_pool dim 1) must be > 0");
    d.N = in[kQ].d[0];
    d.Hq = in[kQ].d[1];
    c.shape(kQ, {d.N, d.Hq, d.D}, "[N, Hq, D] (D from k_pool)");
    c.shape(kK_NEW, {d.N, d.H, d.D}, "[N, H, D]");
    c.shape(kV_NEW, {d.N, d.H, d.D}, "[N, H, D]");
    checkBatchAndPool(c, cache, d);
    checkLayerCache(c, cache, d);
    c.shape(kERROR, {1}, "[1]");
    if (c.rank(kMAX_KEYS, 1)) d.K = in[kMAX_KEYS].d[0];
    // Every row sees at least itself: a zero-length bound bounds no row.
    c.require(d.K >= 1 || d.N == 0, "max_keys has length " + std::to_string(d.K) + " but q has " +
                                        std::to_string(d.N) + " rows: its length bounds every row's keys (>= 1)");
    // Every row belongs to a sequence: the kernel looks each row's up in cu_seqlens.
    c.require(d.B > 0 || d.N == 0, std::to_string(d.N) + " rows of q but no sequence in seq_slots");
    c.require(d.H > 0 && d.Hq % d.H == 0 && d.Hq / d.H <= 8,
              "q has " + std::to_string(d.Hq) + " heads for " + std::to_string(d.H) +
                  " kv heads: query heads per kv head must divide evenly and be at most 8");
    c.require(d.D == 64 || d.D == 128, "head_dim must be 64 or 128, got " + std::to_string(d.D));
    c.layerInRange(f.layer, d.L);
    c.require(fitsInt(d) && attentionMaxKeys(d) <= INT_MAX,
              "a dimension or the key bound M * block_size + W + N exceeds the kernels' int range");
    if (!c.error.empty()) return c.error;
    dims = d;
    return "";
}

std::string checkEvictShapes(Shape const* in, int32_t nbInputs, EvictFields const& f, int32_t dtype, CallDims& dims) {
    using namespace evict;
    Checker c{kEVICT_NAME, evictIo(), in, ""};
    if (nbInputs != kNB_INPUTS)
        return std::string(kEVICT_NAME) + ": expected " + std::to_string(kNB_INPUTS) + " inputs, got " +
               std::to_string(nbInputs);
    c.require(dtypeBytes(dtype) > 0, "k_new must be float32, float16 or bfloat16");
    bool const all = f.layer == -1;
    if (!c.rank(kK_NEW, all ? 4 : 3) || !c.rank(kK_POOL, 3) || !c.rank(kBLOCK_TABLE, 4) || !c.rank(kSEQ_SLOTS, 1)) {
        if (in[kK_NEW].nbDims != (all ? 4 : 3))
            c.error += all ? " (layer = -1: all layers, [L, N, H, D])" : " (layer >= 0: one layer, [N, H, D])";
        return c.error;
    }
    CacheInputs const cache{kCU_SEQLENS, kSEQ_SLOTS,   kCTX_LENS, kK_POOL,
                            kV_POOL,     kBLOCK_TABLE, kKEPT_LEN, kRING_TABLE};
    CallDims d;
    readCacheDims(in, cache, f.window, d);
    c.require(d.BS > 0, "block_size (k_pool dim 1) must be > 0");
    int32_t const off = all ? 1 : 0;
    d.N = in[kK_NEW].d[off];
    d.layers = all ? d.L : 1;
    auto perCall = [&](std::vector<int64_t> v) {
        if (all) v.insert(v.begin(), d.L);
        return v;
    };
    c.shape(kK_NEW, perCall({d.N, d.H, d.D}), all ? "[L, N, H, D]" : "[N, H, D]");
    c.shape(kV_NEW, perCall({d.N, d.H, d.D}), all ? "[L, N, H, D]" : "[N, H, D]");
    c.shape(kSCORES, perCall({d.N, d.H}), all ? "[L, N, H]" : "[N, H]");
    checkBatchAndPool(c, cache, d);
    c.shape(kPOS_POOL, {d.NB, d.BS}, "[num_blocks, block_size]");
    c.shape(kSCORE_POOL, {d.NB, d.BS}, "[num_blocks, block_size]");
    checkLayerCache(c, cache, d);
    c.shape(kFREE_STACK, {d.NB}, "[num_blocks]");
    c.shape(kNUM_FREE, {1}, "[1]");
    c.shape(kERROR, {1}, "[1]");
    int32_t const bytes = dtypeBytes(dtype);
    c.require(bytes == 0 || (d.D > 0 && d.D * bytes % 16 == 0),
              "head_dim " + std::to_string(d.D) + " x " + std::to_string(bytes) + " bytes must be a multiple of 16 bytes");
    c.layerInRange(f.layer, d.L);
    c.require(fitsInt(d), "a dimension exceeds the kernels' int range");
    if (!c.error.empty()) return c.error;
    dims = d;
    return "";
}

std::vector<Shape> outputShapes(PluginIo const& io, Shape const* inputs, int32_t nbInputs) {
    std::vector<Shape> out;
    for (auto const& o : io.outputs)
        out.push_back(o.followsInput < nbInputs ? inputs[o.followsInput] : Shape{});
    return out;
}

int64_t attentionMaxKeys(CallDims const& d) {
    int64_t const capacity = d.M * d.BS + d.W + d.N;
    return d.K < 0 ? capacity : std::min(d.K, capacity);
}

int64_t evictMaxNewTokens(CallDims const& d) { return d.B > 0 && d.N >= d.B ? d.N - d.B + 1 : d.N; }

int32_t attentionSplit(CallDims const& d, int32_t kernelDtype, int32_t numSms, int32_t sm) {
    return kvzapAttentionSplitSize(kernelDtype, static_cast<int>(d.N), static_cast<int>(d.B), static_cast<int>(d.Hq),
                                   static_cast<int>(d.H), static_cast<int>(attentionMaxKeys(d)),
                                   std::min(std::max(numSms, 1), kMAX_SMS), sm);
}

size_t attentionWorkspaceBytes(CallDims const& d, int32_t splitSize) {
    return kvzapAttentionWorkspaceBytes(static_cast<int>(d.N), static_cast<int>(d.Hq), static_cast<int>(d.D),
                                        static_cast<int>(attentionMaxKeys(d)), splitSize);
}

size_t attentionWorkspaceBound(CallDims const& d) {
    int64_t const keys = attentionMaxKeys(d);
    if (d.N <= 0 || keys <= 0 || d.H <= 0) return 0;
    // splits <= max(want, ceil(K / kMAX_SPLIT)), want = max(1, SMs * resident / (launch blocks * H)). A
    // launch of one block per row: N * Hq * want <= SMs * resident * G. A packed launch's blocks are
    // at least N / P with P * G <= 16: N * Hq * want <= SMs * resident * 16. G <= ceil(d.Hq / d.H).
    int64_t const group = std::max<int64_t>(16, (d.Hq + d.H - 1) / d.H);
    int64_t const wave = static_cast<int64_t>(kMAX_SMS) * kMAX_BLOCKS_PER_SM * group;
    int64_t const rowHeadSplits = std::max(wave, d.N * d.Hq * ((keys + kMAX_SPLIT - 1) / kMAX_SPLIT));
    return sizeof(float) * static_cast<size_t>(rowHeadSplits) * static_cast<size_t>(d.D + 1);
}

size_t attentionProfileWorkspace(Shape const* minInputs, Shape const* maxInputs, int32_t nbInputs,
                                 AttentionFields const& f) {
    using namespace attn;
    if (nbInputs != kNB_INPUTS) return 0;
    for (Shape const* s : {minInputs, maxInputs})
        if (s[kQ].nbDims != 3 || s[kK_POOL].nbDims != 3 || s[kBLOCK_TABLE].nbDims != 4) return 0;
    CallDims d;
    d.N = maxInputs[kQ].d[0];
    d.Hq = maxInputs[kQ].d[1];
    d.BS = maxInputs[kK_POOL].d[1];
    d.D = maxInputs[kK_POOL].d[2];
    d.M = maxInputs[kBLOCK_TABLE].d[3];
    d.W = f.window;
    d.H = minInputs[kBLOCK_TABLE].d[2];
    return attentionWorkspaceBound(d);
}

}  // namespace kvzap_trt
