// KvzapVarlenPagedAttention: kvzapVarlenPagedAttention (include/kvzap_kernels.h) as a TensorRT
// IPluginV3 (IPluginV3OneCore + IPluginV3OneBuildV2 + IPluginV3OneRuntime). Inputs, outputs,
// fields and aliasing: README.md beside this file; the host logic is in common/kvzapPluginHost.h.

#ifndef KVZAP_VARLEN_PAGED_ATTENTION_PLUGIN_H_
#define KVZAP_VARLEN_PAGED_ATTENTION_PLUGIN_H_

#include <NvInferRuntime.h>

#include <vector>

#include "kvzapPluginHost.h"

namespace kvzap_trt {

class KvzapVarlenPagedAttentionPlugin : public nvinfer1::IPluginV3,
                                        public nvinfer1::IPluginV3OneCore,
                                        public nvinfer1::IPluginV3OneBuildV2,
                                        public nvinfer1::IPluginV3OneRuntime {
public:
    explicit KvzapVarlenPagedAttentionPlugin(AttentionFields const& fields);
    KvzapVarlenPagedAttentionPlugin(KvzapVarlenPagedAttentionPlugin const& other);
    KvzapVarlenPagedAttentionPlugin& operator=(KvzapVarlenPagedAttentionPlugin const&) = delete;
    ~KvzapVarlenPagedAttentionPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuildV2
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t getAliasedInput(int32_t outputIndex) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void error(char const* message) const noexcept;

    AttentionFields mFields;
    nvinfer1::IErrorRecorder* mRecorder = nullptr;  // the execution context's, from attachToContext
    CallDims mDims;                                 // from the last onShapeChange
    int32_t mDtype = -1;                            // K/V DataType of mDims, -1: not resolved
    int32_t mNumSms = 0, mSm = 0;                   // the device, queried in onShapeChange
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mSerializedFC{};
};

class KvzapVarlenPagedAttentionPluginCreator : public nvinfer1::IPluginCreatorV3One {
public:
    KvzapVarlenPagedAttentionPluginCreator();
    ~KvzapVarlenPagedAttentionPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFC{};
};

}  // namespace kvzap_trt

#endif  // KVZAP_VARLEN_PAGED_ATTENTION_PLUGIN_H_
