// KvzapVarlenPagedAttention: kvzapVarlenPagedAttention (include/kvzap_kernels.h) as a TensorRT
// IPluginV3 (IPluginV3OneCore + IPluginV3OneBuildV2 + IPluginV3OneRuntime). Inputs, outputs,
// fields and aliasing: README.md beside this file; the host logic is in common/kvzapPluginHost.h,
// the IPluginV3 methods both plugins share and the creator in common/kvzapPluginBase.h.

#ifndef KVZAP_VARLEN_PAGED_ATTENTION_PLUGIN_H_
#define KVZAP_VARLEN_PAGED_ATTENTION_PLUGIN_H_

#include <NvInferRuntime.h>

#include "kvzapPluginBase.h"
#include "kvzapPluginConstants.h"
#include "kvzapPluginHost.h"

namespace kvzap_trt {

struct KvzapVarlenPagedAttentionTraits {
    using Fields = AttentionFields;
    static constexpr char const* kName = kATTENTION_NAME;
    static constexpr int32_t kNbInputs = attn::kNB_INPUTS;
    static constexpr int32_t kNbOutputs = attn::kNB_OUTPUTS;
    static constexpr int32_t kDtypeInput = attn::kQ;
    static constexpr auto io = &attentionIo;
    static constexpr auto parseFields = &parseAttentionFields;
    static constexpr auto fieldsOf = &attentionFieldsOf;
    static constexpr auto checkShapes = &checkAttentionShapes;
};

class KvzapVarlenPagedAttentionPlugin
    : public KvzapPluginBase<KvzapVarlenPagedAttentionPlugin, KvzapVarlenPagedAttentionTraits> {
public:
    using KvzapPluginBase::KvzapPluginBase;
    // A copy keeps what its original resolved (KvzapPluginBase), the device's SMs included.
    KvzapVarlenPagedAttentionPlugin(KvzapVarlenPagedAttentionPlugin const& other)
        : KvzapPluginBase(other), mNumSms(other.mNumSms), mSm(other.mSm) {}

    // IPluginV3OneBuildV2
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;

protected:
    void onShapesAccepted() override;  // queries the device once (mNumSms, mSm)

private:
    int32_t mNumSms = 0, mSm = 0;  // the device, queried in the first accepted onShapeChange
};

using KvzapVarlenPagedAttentionPluginCreator = KvzapPluginCreator<KvzapVarlenPagedAttentionPlugin>;

}  // namespace kvzap_trt

#endif  // KVZAP_VARLEN_PAGED_ATTENTION_PLUGIN_H_
