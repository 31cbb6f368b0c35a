// TensorRT-side helpers shared by the kvzap-trt plugins: error reporting (the execution context's
// IErrorRecorder when the plugin has one, else the ILogger TensorRT hands the library through
// setLoggerFinder, as NVIDIA's dynamic plugin libraries do), and conversions to the framework-free
// types of kvzapPluginHost.h.

#ifndef KVZAP_PLUGIN_UTILS_H_
#define KVZAP_PLUGIN_UTILS_H_

#include <NvInferRuntime.h>

#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvzapPluginHost.h"
#include "kvzap_kernels.h"

namespace kvzap_trt {

static_assert(static_cast<int32_t>(nvinfer1::PluginFieldType::kFLOAT32) == kFIELD_FLOAT32, "PluginFieldType");
static_assert(static_cast<int32_t>(nvinfer1::PluginFieldType::kINT32) == kFIELD_INT32, "PluginFieldType");
static_assert(static_cast<int32_t>(nvinfer1::DataType::kFLOAT) == kDTYPE_FLOAT, "DataType");
static_assert(static_cast<int32_t>(nvinfer1::DataType::kHALF) == kDTYPE_HALF, "DataType");
static_assert(static_cast<int32_t>(nvinfer1::DataType::kINT32) == kDTYPE_INT32, "DataType");
static_assert(static_cast<int32_t>(nvinfer1::DataType::kBF16) == kDTYPE_BF16, "DataType");
static_assert(nvinfer1::Dims::MAX_DIMS <= kMAX_RANK, "Shape holds every Dims");

// The logger TensorRT gave the library (setLoggerFinder), or nullptr before it did.
nvinfer1::ILogger* pluginLogger() noexcept;
void setPluginLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

// Report `message` through `recorder` (if any) and the logger (if any). Never throws.
void reportError(nvinfer1::IErrorRecorder* recorder, nvinfer1::ErrorCode code, char const* message) noexcept;
// For a catch block: reports e.what() as an internal error.
void reportException(nvinfer1::IErrorRecorder* recorder, char const* where, std::exception const& e) noexcept;

// Thrown by the shells for a rejected argument, caught by the noexcept method that threw it.
struct InvalidArgument : std::exception {
    std::string message;
    explicit InvalidArgument(std::string m) : message(std::move(m)) {}
    char const* what() const noexcept override { return message.c_str(); }
};

std::vector<Field> toFields(nvinfer1::PluginFieldCollection const* fc);
std::vector<nvinfer1::PluginField> toPluginFields(std::vector<Field> const& fields);
Shape toShape(nvinfer1::Dims const& dims);
kvzapDtype toKernelDtype(nvinfer1::DataType type);

// The dimensions both kernels' params structs (kvzapAttentionParams, kvzapEvictParams) take, from `d`.
template <typename Params>
void setKernelDims(Params& p, CallDims const& d) {
    p.batch = static_cast<int>(d.B);
    p.num_slots = static_cast<int>(d.S);
    p.num_kv_heads = static_cast<int>(d.H);
    p.head_dim = static_cast<int>(d.D);
    p.window = static_cast<int>(d.W);
    p.block_size = static_cast<int>(d.BS);
    p.ring_pages = static_cast<int>(d.R);
    p.max_blocks_per_head = static_cast<int>(d.M);
    p.num_rows = static_cast<int>(d.N);
}

// The current device's SM count and compute capability (major * 10 + minor).
void currentDevice(int32_t& numSms, int32_t& sm);

}  // namespace kvzap_trt

#endif  // KVZAP_PLUGIN_UTILS_H_
