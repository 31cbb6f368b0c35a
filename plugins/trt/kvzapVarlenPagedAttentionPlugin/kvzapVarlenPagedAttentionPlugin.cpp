// KvzapVarlenPagedAttention: a thin shell over kvzapVarlenPagedAttention. Shapes are checked by
// checkAttentionShapes (common/kvzapPluginHost.cpp) in onShapeChange; enqueue fills
// kvzapAttentionParams (pointers of layer `layer` of the [L, ...] cache tensors) and launches.

#include "kvzapVarlenPagedAttentionPlugin.h"

#include <memory>
#include <stdexcept>
#include <string>

#include "kvzapPluginConstants.h"
#include "kvzapPluginUtils.h"
#include "kvzap_kernels.h"

using namespace nvinfer1;

namespace kvzap_trt {
namespace {

constexpr char const* kWHERE = "KvzapVarlenPagedAttention";

std::vector<Shape> shapesOf(PluginTensorDesc const* desc, int32_t n) {
    std::vector<Shape> shapes;
    for (int32_t i = 0; i < n; ++i) shapes.push_back(toShape(desc[i].dims));
    return shapes;
}

}  // namespace

KvzapVarlenPagedAttentionPlugin::KvzapVarlenPagedAttentionPlugin(AttentionFields const& fields) : mFields(fields) {}

// A copy starts unattached and unresolved: attachToContext / onShapeChange fill those in.
KvzapVarlenPagedAttentionPlugin::KvzapVarlenPagedAttentionPlugin(KvzapVarlenPagedAttentionPlugin const& other)
    : IPluginV3(), IPluginV3OneCore(), IPluginV3OneBuildV2(), IPluginV3OneRuntime(), mFields(other.mFields) {}

void KvzapVarlenPagedAttentionPlugin::error(char const* message) const noexcept {
    reportError(mRecorder, ErrorCode::kINVALID_ARGUMENT, message);
}

IPluginCapability* KvzapVarlenPagedAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    error("KvzapVarlenPagedAttention: unknown plugin capability");
    return nullptr;
}

IPluginV3* KvzapVarlenPagedAttentionPlugin::clone() noexcept {
    try {
        return std::make_unique<KvzapVarlenPagedAttentionPlugin>(*this).release();
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return nullptr;
}

char const* KvzapVarlenPagedAttentionPlugin::getPluginName() const noexcept { return kATTENTION_NAME; }
char const* KvzapVarlenPagedAttentionPlugin::getPluginVersion() const noexcept { return kPLUGIN_VERSION; }
char const* KvzapVarlenPagedAttentionPlugin::getPluginNamespace() const noexcept { return kPLUGIN_NAMESPACE; }

int32_t KvzapVarlenPagedAttentionPlugin::getNbOutputs() const noexcept { return attn::kNB_OUTPUTS; }

int32_t KvzapVarlenPagedAttentionPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                                            DataType const* inputTypes, int32_t nbInputs) const noexcept {
    try {
        PluginIo const& io = attentionIo();
        if (nbInputs != attn::kNB_INPUTS || nbOutputs != attn::kNB_OUTPUTS)
            throw InvalidArgument("expected 13 inputs and 8 outputs");
        for (int32_t i = 0; i < nbOutputs; ++i) outputTypes[i] = inputTypes[io.outputs[i].followsInput];
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return -1;
}

int32_t KvzapVarlenPagedAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
                                                         DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                                                         DimsExprs* outputs, int32_t nbOutputs,
                                                         IExprBuilder& /*exprBuilder*/) noexcept {
    try {
        PluginIo const& io = attentionIo();
        if (nbInputs != attn::kNB_INPUTS || nbOutputs != attn::kNB_OUTPUTS)
            throw InvalidArgument("expected 13 inputs and 8 outputs");
        for (int32_t i = 0; i < nbOutputs; ++i) outputs[i] = inputs[io.outputs[i].followsInput];
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return -1;
}

bool KvzapVarlenPagedAttentionPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                                int32_t nbInputs, int32_t nbOutputs) noexcept {
    try {
        if (inOut == nullptr || nbInputs != attn::kNB_INPUTS || nbOutputs != attn::kNB_OUTPUTS) return false;
        return inOut[pos].desc.format == TensorFormat::kLINEAR &&
               supportsDtype(attentionIo(), pos, static_cast<int32_t>(inOut[pos].desc.type),
                             static_cast<int32_t>(inOut[0].desc.type));
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return false;
}

int32_t KvzapVarlenPagedAttentionPlugin::configurePlugin(DynamicPluginTensorDesc const* /*in*/, int32_t nbInputs,
                                                         DynamicPluginTensorDesc const* /*out*/,
                                                         int32_t nbOutputs) noexcept {
    // Shapes may still hold wildcards here: they are checked for real in onShapeChange.
    if (nbInputs == attn::kNB_INPUTS && nbOutputs == attn::kNB_OUTPUTS) return 0;
    error("KvzapVarlenPagedAttention: expected 13 inputs and 8 outputs");
    return -1;
}

size_t KvzapVarlenPagedAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                                         DynamicPluginTensorDesc const* /*outputs*/,
                                                         int32_t /*nbOutputs*/) const noexcept {
    try {
        if (nbInputs != attn::kNB_INPUTS) return 0;
        std::vector<Shape> lo, hi;
        for (int32_t i = 0; i < nbInputs; ++i) {
            lo.push_back(toShape(inputs[i].min));
            hi.push_back(toShape(inputs[i].max));
        }
        return attentionProfileWorkspace(lo.data(), hi.data(), nbInputs);
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return 0;
}

int32_t KvzapVarlenPagedAttentionPlugin::getAliasedInput(int32_t outputIndex) noexcept {
    PluginIo const& io = attentionIo();
    if (outputIndex < 0 || outputIndex >= static_cast<int32_t>(io.outputs.size())) return -1;
    return io.outputs[outputIndex].aliasedInput;
}

int32_t KvzapVarlenPagedAttentionPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs,
                                                       PluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept {
    try {
        mDtype = -1;
        std::vector<Shape> const shapes = shapesOf(in, nbInputs);
        int32_t const dtype = nbInputs > 0 ? static_cast<int32_t>(in[attn::kQ].type) : -1;
        std::string const problem = checkAttentionShapes(shapes.data(), nbInputs, mFields, dtype, mDims);
        if (!problem.empty()) throw InvalidArgument(problem);
        if (mNumSms == 0) currentDevice(mNumSms, mSm);
        mDtype = dtype;
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return -1;
}

int32_t KvzapVarlenPagedAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                                                 void const* const* inputs, void* const* outputs, void* workspace,
                                                 cudaStream_t stream) noexcept {
    try {
        using namespace attn;
        if (mDtype < 0 || static_cast<int32_t>(inputDesc[kQ].type) != mDtype)
            throw InvalidArgument("enqueue before a successful onShapeChange");
        CallDims const& d = mDims;
        int32_t const split = attentionSplit(d, mNumSms, mSm);
        size_t const need = attentionWorkspaceBytes(d, split);
        if (need > attentionWorkspaceBound(d))  // cannot happen (see attentionWorkspaceBound); never overrun
            throw std::runtime_error("workspace bound below the launch's need");
        if (need > 0 && workspace == nullptr) throw std::runtime_error("no workspace");

        // Layer `layer` of the [L, ...] cache tensors. The aliased outputs are these inputs' memory;
        // the only one written is the error flag (OR-ed, never cleared: the host zeroes it per step).
        size_t const elt = static_cast<size_t>(dtypeBytes(mDtype));
        int64_t const layer = mFields.layer;
        auto bytes = [](void const* p, int64_t offset) { return static_cast<char const*>(p) + offset; };
        kvzapAttentionParams p{};
        p.dtype = toKernelDtype(inputDesc[kQ].type);
        p.batch = static_cast<int>(d.B);
        p.num_slots = static_cast<int>(d.S);
        p.num_q_heads = static_cast<int>(d.Hq);
        p.num_kv_heads = static_cast<int>(d.H);
        p.head_dim = static_cast<int>(d.D);
        p.window = static_cast<int>(d.W);
        p.block_size = static_cast<int>(d.BS);
        p.max_blocks_per_head = static_cast<int>(d.M);
        p.num_rows = static_cast<int>(d.N);
        p.max_keys = static_cast<int>(attentionMaxKeys(d));
        p.scale = mFields.scale;
        p.q = inputs[kQ];
        p.k_new = inputs[kK_NEW];
        p.v_new = inputs[kV_NEW];
        p.cu_seqlens = static_cast<int32_t const*>(inputs[kCU_SEQLENS]);
        p.seq_slots = static_cast<int32_t const*>(inputs[kSEQ_SLOTS]);
        p.ctx_lens = static_cast<int32_t const*>(inputs[kCTX_LENS]);
        p.k_pool = inputs[kK_POOL];
        p.v_pool = inputs[kV_POOL];
        p.block_table = static_cast<int32_t const*>(inputs[kBLOCK_TABLE]) + layer * d.S * d.H * d.M;
        p.kept_len = static_cast<int32_t const*>(inputs[kKEPT_LEN]) + layer * d.S * d.H;
        p.ring_k = bytes(inputs[kRING_K], layer * d.S * d.H * d.W * d.D * static_cast<int64_t>(elt));
        p.ring_v = bytes(inputs[kRING_V], layer * d.S * d.H * d.W * d.D * static_cast<int64_t>(elt));
        p.out = outputs[kOUT];
        p.workspace = need > 0 ? static_cast<float*>(workspace) : nullptr;
        p.error = static_cast<int32_t*>(const_cast<void*>(inputs[kERROR]));
        cudaError_t const err = kvzapVarlenPagedAttention(&p, split, stream);
        if (err != cudaSuccess)
            throw std::runtime_error(std::string("kvzapVarlenPagedAttention: ") + cudaGetErrorString(err));
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return -1;
}

IPluginV3* KvzapVarlenPagedAttentionPlugin::attachToContext(IPluginResourceContext* context) noexcept {
    try {
        auto plugin = std::make_unique<KvzapVarlenPagedAttentionPlugin>(*this);
        plugin->mRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
        return plugin.release();
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return nullptr;
}

PluginFieldCollection const* KvzapVarlenPagedAttentionPlugin::getFieldsToSerialize() noexcept {
    try {
        mSerialized = toPluginFields(attentionFieldsOf(mFields));
        mSerializedFC.nbFields = static_cast<int32_t>(mSerialized.size());
        mSerializedFC.fields = mSerialized.data();
        return &mSerializedFC;
    } catch (std::exception const& e) {
        reportException(mRecorder, kWHERE, e);
    }
    return nullptr;
}

KvzapVarlenPagedAttentionPluginCreator::KvzapVarlenPagedAttentionPluginCreator() {
    for (auto const& f : attentionFieldsOf(AttentionFields{}))
        mFields.emplace_back(f.name, nullptr, static_cast<PluginFieldType>(f.type), f.length);
    mFC.nbFields = static_cast<int32_t>(mFields.size());
    mFC.fields = mFields.data();
}

char const* KvzapVarlenPagedAttentionPluginCreator::getPluginName() const noexcept { return kATTENTION_NAME; }
char const* KvzapVarlenPagedAttentionPluginCreator::getPluginVersion() const noexcept { return kPLUGIN_VERSION; }
char const* KvzapVarlenPagedAttentionPluginCreator::getPluginNamespace() const noexcept { return kPLUGIN_NAMESPACE; }
PluginFieldCollection const* KvzapVarlenPagedAttentionPluginCreator::getFieldNames() noexcept { return &mFC; }

IPluginV3* KvzapVarlenPagedAttentionPluginCreator::createPlugin(char const* /*name*/, PluginFieldCollection const* fc,
                                                                TensorRTPhase /*phase*/) noexcept {
    try {
        std::vector<Field> const fields = toFields(fc);
        AttentionFields parsed;
        std::string const problem = parseAttentionFields(fields.data(), static_cast<int32_t>(fields.size()), parsed);
        if (!problem.empty()) throw InvalidArgument(problem);
        return std::make_unique<KvzapVarlenPagedAttentionPlugin>(parsed).release();
    } catch (std::exception const& e) {
        reportException(nullptr, "KvzapVarlenPagedAttention creator", e);
    }
    return nullptr;
}

}  // namespace kvzap_trt
