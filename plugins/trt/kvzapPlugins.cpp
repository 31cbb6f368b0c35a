// The entry points of libkvzap_trt_plugins.so that TensorRT looks up in a dynamic plugin library
// (trtexec --dynamicPlugins, IPluginRegistry::loadLibrary): getCreators and setLoggerFinder, as in
// TensorRT's plugin/vc/vfcCommon.cpp. exports.map keeps every other symbol local.

#include <NvInferRuntime.h>

#include "kvzapEvictPlugin/kvzapEvictPlugin.h"
#include "kvzapPluginUtils.h"
#include "kvzapVarlenPagedAttentionPlugin/kvzapVarlenPagedAttentionPlugin.h"

extern "C" TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static kvzap_trt::KvzapVarlenPagedAttentionPluginCreator sAttention;
    static kvzap_trt::KvzapEvictPluginCreator sEvict;
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&sAttention, &sEvict};
    nbCreators = 2;
    return kCreators;
}

extern "C" TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    kvzap_trt::setPluginLoggerFinder(finder);
}
