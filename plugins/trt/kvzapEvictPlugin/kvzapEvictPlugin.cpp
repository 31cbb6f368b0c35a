// KvzapEvict: a thin shell over kvzapEvict. Shapes are checked by checkEvictShapes
// (common/kvzapPluginHost.cpp) in onShapeChange; enqueue fills kvzapEvictParams (layer `layer`
// of the [L, ...] cache tensors, or all of them when layer == -1) and launches. Every cache tensor
// is updated in place: each output is its input's memory (getAliasedInput).

#include "kvzapEvictPlugin.h"

#include <memory>
#include <stdexcept>
#include <string>

#include "kvzapPluginConstants.h"
#include "kvzapPluginUtils.h"
#include "kvzap_kernels.h"

using namespace nvinfer1;

namespace kvzap_trt {
namespace {

constexpr char const* kWHERE = "KvzapEvict";

std::vector<Shape> shapesOf(PluginTensorDesc const* desc, int32_t n) {
    std::vector<Shape> shapes;
    for (int32_t i = 0; i < n; ++i) shapes.push_back(toShape(desc[i].dims));
    return shapes;
}

}  // namespace

KvzapEvictPlugin::KvzapEvictPlugin(EvictFields const& fields) : mFields(fields) {}

// A copy starts unattached and unresolved: attachToContext / onShapeChange fill those in.
KvzapEvictPlugin::KvzapEvictPlugin(KvzapEvictPlugin const& other)
    : IPluginV3(), IPluginV3OneCore(), IPluginV3OneBuildV2(), IPluginV3OneRuntime(), mFields(other.mFields) {}

void KvzapEvictPlugin::error(char const* message) const noexcept {
    reportError(mRecorder, ErrorCode::kINVALID_ARGUMENT, message);
}

IPluginCapability* KvzapEvictPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    error("KvzapEvict: unknown plugin capability");
    return nullptr;
}

IPluginV3* KvzapEvictPlugin::clone() noexcept {
    try {
        return std::make_unique<KvzapEvictPlugin>(*this).release();
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return nullptr;
}

char const* KvzapEvictPlugin::getPluginName() const noexcept { return kEVICT_NAME; }
char const* KvzapEvictPlugin::getPluginVersion() const noexcept { return kPLUGIN_VERSION; }
char const* KvzapEvictPlugin::getPluginNamespace() const noexcept { return kPLUGIN_NAMESPACE; }

int32_t KvzapEvictPlugin::getNbOutputs() const noexcept { return evict::kNB_OUTPUTS; }

int32_t KvzapEvictPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                             int32_t nbInputs) const noexcept {
    try {
        PluginIo const& io = evictIo();
        if (nbInputs != evict::kNB_INPUTS || nbOutputs != evict::kNB_OUTPUTS)
            throw InvalidArgument("expected 17 inputs and 11 outputs");
        for (int32_t i = 0; i < nbOutputs; ++i) outputTypes[i] = inputTypes[io.outputs[i].followsInput];
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return -1;
}

int32_t KvzapEvictPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                          int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                                          IExprBuilder& /*exprBuilder*/) noexcept {
    try {
        PluginIo const& io = evictIo();
        if (nbInputs != evict::kNB_INPUTS || nbOutputs != evict::kNB_OUTPUTS)
            throw InvalidArgument("expected 17 inputs and 11 outputs");
        for (int32_t i = 0; i < nbOutputs; ++i) outputs[i] = inputs[io.outputs[i].followsInput];
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return -1;
}

bool KvzapEvictPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                                 int32_t nbOutputs) noexcept {
    try {
        if (inOut == nullptr || nbInputs != evict::kNB_INPUTS || nbOutputs != evict::kNB_OUTPUTS) return false;
        return inOut[pos].desc.format == TensorFormat::kLINEAR &&
               supportsDtype(evictIo(), pos, static_cast<int32_t>(inOut[pos].desc.type),
                             static_cast<int32_t>(inOut[0].desc.type));
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return false;
}

int32_t KvzapEvictPlugin::configurePlugin(DynamicPluginTensorDesc const* /*in*/, int32_t nbInputs,
                                          DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
    // Shapes may still hold wildcards here: they are checked for real in onShapeChange.
    if (nbInputs == evict::kNB_INPUTS && nbOutputs == evict::kNB_OUTPUTS) return 0;
    error("KvzapEvict: expected 17 inputs and 11 outputs");
    return -1;
}

int32_t KvzapEvictPlugin::getAliasedInput(int32_t outputIndex) noexcept {
    PluginIo const& io = evictIo();
    if (outputIndex < 0 || outputIndex >= static_cast<int32_t>(io.outputs.size())) return -1;
    return io.outputs[outputIndex].aliasedInput;
}

int32_t KvzapEvictPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/,
                                        int32_t /*nbOutputs*/) noexcept {
    try {
        mDtype = -1;
        std::vector<Shape> const shapes = shapesOf(in, nbInputs);
        int32_t const dtype = nbInputs > 0 ? static_cast<int32_t>(in[evict::kK_NEW].type) : -1;
        std::string const problem = checkEvictShapes(shapes.data(), nbInputs, mFields, dtype, mDims);
        if (!problem.empty()) throw InvalidArgument(problem);
        mDtype = dtype;
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return -1;
}

int32_t KvzapEvictPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                                  void const* const* inputs, void* const* /*outputs*/, void* /*workspace*/,
                                  cudaStream_t stream) noexcept {
    try {
        using namespace evict;
        if (mDtype < 0 || static_cast<int32_t>(inputDesc[kK_NEW].type) != mDtype)
            throw InvalidArgument("enqueue before a successful onShapeChange");
        CallDims const& d = mDims;
        // The aliased outputs are these inputs' memory (as in NVIDIA's aliased_io_plugin sample):
        // the kernels update them in place. One layer: pointers at layer `layer`; all: at layer 0.
        int64_t const layer = mFields.layer < 0 ? 0 : mFields.layer;
        int64_t const elt = dtypeBytes(mDtype);
        auto rw = [](void const* p) { return const_cast<void*>(p); };
        auto at = [&](int32_t i, int64_t offsetBytes) { return static_cast<char*>(rw(inputs[i])) + offsetBytes; };
        int64_t const heads = d.S * d.H;  // per layer
        kvzapEvictParams p{};
        p.dtype = toKernelDtype(inputDesc[kK_NEW].type);
        p.num_layers = static_cast<int>(d.layers);
        p.batch = static_cast<int>(d.B);
        p.num_slots = static_cast<int>(d.S);
        p.num_kv_heads = static_cast<int>(d.H);
        p.head_dim = static_cast<int>(d.D);
        p.window = static_cast<int>(d.W);
        p.block_size = static_cast<int>(d.BS);
        p.max_blocks_per_head = static_cast<int>(d.M);
        p.num_rows = static_cast<int>(d.N);
        p.max_new_tokens = static_cast<int>(evictMaxNewTokens(d));
        p.threshold = mFields.threshold;
        p.k_new = inputs[kK_NEW];
        p.v_new = inputs[kV_NEW];
        p.scores = static_cast<float const*>(inputs[kSCORES]);
        p.cu_seqlens = static_cast<int32_t const*>(inputs[kCU_SEQLENS]);
        p.seq_slots = static_cast<int32_t const*>(inputs[kSEQ_SLOTS]);
        p.ctx_lens = static_cast<int32_t const*>(inputs[kCTX_LENS]);
        p.k_pool = rw(inputs[kK_POOL]);
        p.v_pool = rw(inputs[kV_POOL]);
        p.pos_pool = static_cast<int32_t*>(rw(inputs[kPOS_POOL]));
        p.block_table = reinterpret_cast<int32_t*>(at(kBLOCK_TABLE, layer * heads * d.M * 4));
        p.kept_len = reinterpret_cast<int32_t*>(at(kKEPT_LEN, layer * heads * 4));
        p.ring_k = at(kRING_K, layer * heads * d.W * d.D * elt);
        p.ring_v = at(kRING_V, layer * heads * d.W * d.D * elt);
        p.ring_score = reinterpret_cast<float*>(at(kRING_SCORE, layer * heads * d.W * 4));
        p.free_stack = static_cast<int32_t*>(rw(inputs[kFREE_STACK]));
        p.num_free = static_cast<int32_t*>(rw(inputs[kNUM_FREE]));
        p.error = static_cast<int32_t*>(rw(inputs[kERROR]));
        cudaError_t const err = kvzapEvict(&p, stream);
        if (err != cudaSuccess) throw std::runtime_error(std::string("kvzapEvict: ") + cudaGetErrorString(err));
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return -1;
}

IPluginV3* KvzapEvictPlugin::attachToContext(IPluginResourceContext* context) noexcept {
    try {
        auto plugin = std::make_unique<KvzapEvictPlugin>(*this);
        plugin->mRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
        return plugin.release();
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return nullptr;
}

PluginFieldCollection const* KvzapEvictPlugin::getFieldsToSerialize() noexcept {
    try {
        mSerialized = toPluginFields(evictFieldsOf(mFields));
        mSerializedFC.nbFields = static_cast<int32_t>(mSerialized.size());
        mSerializedFC.fields = mSerialized.data();
        return &mSerializedFC;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return nullptr;
}

KvzapEvictPluginCreator::KvzapEvictPluginCreator() {
    for (auto const& f : evictFieldsOf(EvictFields{}))
        mFields.emplace_back(f.name, nullptr, static_cast<PluginFieldType>(f.type), f.length);
    mFC.nbFields = static_cast<int32_t>(mFields.size());
    mFC.fields = mFields.data();
}

char const* KvzapEvictPluginCreator::getPluginName() const noexcept { return kEVICT_NAME; }
char const* KvzapEvictPluginCreator::getPluginVersion() const noexcept { return kPLUGIN_VERSION; }
char const* KvzapEvictPluginCreator::getPluginNamespace() const noexcept { return kPLUGIN_NAMESPACE; }
PluginFieldCollection const* KvzapEvictPluginCreator::getFieldNames() noexcept { return &mFC; }

IPluginV3* KvzapEvictPluginCreator::createPlugin(char const* /*name*/, PluginFieldCollection const* fc,
                                                 TensorRTPhase /*phase*/) noexcept {
    try {
        std::vector<Field> const fields = toFields(fc);
        EvictFields parsed;
        std::string const problem = parseEvictFields(fields.data(), static_cast<int32_t>(fields.size()), parsed);
        if (!problem.empty()) throw InvalidArgument(problem);
        return std::make_unique<KvzapEvictPlugin>(parsed).release();
    } catch (std::exception const& e) {
        reportException(nullptr, "KvzapEvict creator", e);
    }
    return nullptr;
}

}  // namespace kvzap_trt
