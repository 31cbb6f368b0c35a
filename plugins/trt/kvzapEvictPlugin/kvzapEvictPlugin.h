// KvzapEvict: kvzapEvict (include/kvzap_kernels.h) as a TensorRT
// IPluginV3 (IPluginV3OneCore + IPluginV3OneBuildV2 + IPluginV3OneRuntime). Inputs, outputs,
// fields and aliasing: README.md beside this file; the host logic is in common/kvzapPluginHost.h,
// the IPluginV3 methods both plugins share and the creator in common/kvzapPluginBase.h.

#ifndef KVZAP_EVICT_PLUGIN_H_
#define KVZAP_EVICT_PLUGIN_H_

#include <NvInferRuntime.h>

#include "kvzapPluginBase.h"
#include "kvzapPluginConstants.h"
#include "kvzapPluginHost.h"

namespace kvzap_trt {

struct KvzapEvictTraits {
    using Fields = EvictFields;
    static constexpr char const* kName = kEVICT_NAME;
    static constexpr int32_t kNbInputs = evict::kNB_INPUTS;
    static constexpr int32_t kNbOutputs = evict::kNB_OUTPUTS;
    static constexpr int32_t kDtypeInput = evict::kK_NEW;
    static constexpr auto io = &evictIo;
    static constexpr auto parseFields = &parseEvictFields;
    static constexpr auto fieldsOf = &evictFieldsOf;
    static constexpr auto checkShapes = &checkEvictShapes;
};

class KvzapEvictPlugin : public KvzapPluginBase<KvzapEvictPlugin, KvzapEvictTraits> {
public:
    using KvzapPluginBase::KvzapPluginBase;

    // IPluginV3OneRuntime
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
};

using KvzapEvictPluginCreator = KvzapPluginCreator<KvzapEvictPlugin>;

}  // namespace kvzap_trt

#endif  // KVZAP_EVICT_PLUGIN_H_
