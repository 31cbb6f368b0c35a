// Names, version, namespace and attribute names of the kvzap-trt TensorRT plugins: the one place
// they are written in C++.
//
// Their Python twin will live in kvzap_trt/export/ (the ONNX custom-op schemas and translations,
// not written yet): an ONNX node of op type kATTENTION_NAME / kEVICT_NAME with attributes
// plugin_version = kPLUGIN_VERSION and plugin_namespace = kPLUGIN_NAMESPACE is mapped by
// TensorRT's ONNX parser to these plugins; its other attributes fill the fields below. Must match
// that module when it is written.

#ifndef KVZAP_PLUGIN_CONSTANTS_H_
#define KVZAP_PLUGIN_CONSTANTS_H_

namespace kvzap_trt {

constexpr char const* kPLUGIN_NAMESPACE = "kvzap_trt";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kATTENTION_NAME = "KvzapVarlenPagedAttention";
constexpr char const* kEVICT_NAME = "KvzapEvict";

// Fields (ONNX attributes). Both plugins: `layer` (int32, one value) picks the layer of the
// [L, ...] cache tensors the call works on; `window` (int32, >= 0) is W, the window's tokens per
// head, which no input's shape carries (ring_table has ceil(W / block_size) columns).
constexpr char const* kFIELD_LAYER = "layer";
constexpr char const* kFIELD_WINDOW = "window";
constexpr char const* kFIELD_SCALE = "scale";          // attention: float32, softmax scale (> 0, finite)
constexpr char const* kFIELD_THRESHOLD = "threshold";  // evict: float32, tau (kept iff score >= tau), not NaN

}  // namespace kvzap_trt

#endif  // KVZAP_PLUGIN_CONSTANTS_H_
