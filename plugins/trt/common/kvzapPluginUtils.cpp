#include "kvzapPluginUtils.h"

#include <cuda_runtime.h>

#include <mutex>
#include <stdexcept>

namespace kvzap_trt {
namespace {

std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;

}  // namespace

nvinfer1::ILogger* pluginLogger() noexcept {
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    return gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
}

void setPluginLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept {
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    if (gLoggerFinder == nullptr && finder != nullptr) gLoggerFinder = finder;
}

void reportError(nvinfer1::IErrorRecorder* recorder, nvinfer1::ErrorCode code, char const* message) noexcept {
    if (recorder != nullptr) recorder->reportError(code, message);
    if (nvinfer1::ILogger* logger = pluginLogger()) logger->log(nvinfer1::ILogger::Severity::kERROR, message);
}

void reportException(nvinfer1::IErrorRecorder* recorder, char const* where, std::exception const& e) noexcept {
    try {
        bool const invalid = dynamic_cast<InvalidArgument const*>(&e) != nullptr;
        std::string const message = std::string(where) + ": " + e.what();
        reportError(recorder, invalid ? nvinfer1::ErrorCode::kINVALID_ARGUMENT : nvinfer1::ErrorCode::kINTERNAL_ERROR,
                    message.c_str());
    } catch (...) {
        reportError(recorder, nvinfer1::ErrorCode::kINTERNAL_ERROR, where);
    }
}

std::vector<Field> toFields(nvinfer1::PluginFieldCollection const* fc) {
    if (fc == nullptr) throw InvalidArgument("no PluginFieldCollection");
    if (fc->nbFields > 0 && fc->fields == nullptr) throw InvalidArgument("PluginFieldCollection without fields");
    std::vector<Field> fields;
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        auto const& f = fc->fields[i];
        fields.push_back({f.name, f.data, static_cast<int32_t>(f.type), f.length});
    }
    return fields;
}

std::vector<nvinfer1::PluginField> toPluginFields(std::vector<Field> const& fields) {
    std::vector<nvinfer1::PluginField> out;
    for (auto const& f : fields)
        out.emplace_back(f.name, f.data, static_cast<nvinfer1::PluginFieldType>(f.type), f.length);
    return out;
}

Shape toShape(nvinfer1::Dims const& dims) {
    Shape s;
    if (dims.nbDims < 0 || dims.nbDims > kMAX_RANK) throw InvalidArgument("tensor rank out of range");
    s.nbDims = dims.nbDims;
    for (int32_t i = 0; i < dims.nbDims; ++i) s.d[i] = dims.d[i];
    return s;
}

kvzapDtype toKernelDtype(nvinfer1::DataType type) {
    switch (type) {
        case nvinfer1::DataType::kFLOAT: return KVZAP_FLOAT32;
        case nvinfer1::DataType::kHALF: return KVZAP_FLOAT16;
        case nvinfer1::DataType::kBF16: return KVZAP_BFLOAT16;
        default: throw InvalidArgument("K/V dtype must be float32, float16 or bfloat16");
    }
}

void currentDevice(int32_t& numSms, int32_t& sm) {
    int device = 0, count = 0, major = 0, minor = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (err != cudaSuccess) throw std::runtime_error(std::string("querying the CUDA device: ") + cudaGetErrorString(err));
    numSms = count;
    sm = major * 10 + minor;
}

}  // namespace kvzap_trt
