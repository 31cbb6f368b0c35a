// Drives libkvzap_trt_plugins.so through TensorRT's own interface classes (NvInferRuntime.h), as
// TensorRT's plugin registry, ONNX parser and builder call it, without TensorRT's libraries: the
// library is dlopen-ed, its creators come from getCreators, and every call goes through the
// IPluginV3 capability interfaces. Nothing here launches a kernel: no GPU is needed. Run by
// tests/test_trt_plugins.py:
//   testPluginInterfaces <libkvzap_trt_plugins.so>
// prints each failed check and exits 1 if any failed.

#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "testCheck.h"

using namespace nvinfer1;

namespace {

// What the plugins report through the logger TensorRT hands the library (setLoggerFinder).
struct Logger : ILogger {
    std::string last;
    void log(Severity, AsciiChar const* msg) noexcept override { last = msg; }
} gLogger;
struct Finder : ILoggerFinder {
    ILogger* findLogger() override { return &gLogger; }
} gFinder;

bool logged(char const* part) { return gLogger.last.find(part) != std::string::npos; }

Dims dims(std::vector<int64_t> const& d) {
    Dims r{};
    r.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i) r.d[i] = d[i];
    return r;
}

// One call of KvzapEvict at layer 0: N = 2 rows of B = 2 sequences, H = 2 kv heads, D = 8 (bf16),
// a pool of 10 blocks of 4, S = 2 slots, M = 3 columns, window 4 (R = 1), one layer.
std::vector<PluginTensorDesc> evictInputs(int64_t numBlocks = 10) {
    DataType const bf16 = DataType::kBF16, i32 = DataType::kINT32, f32 = DataType::kFLOAT;
    std::vector<std::pair<std::vector<int64_t>, DataType>> const spec{
        {{2, 2, 8}, bf16}, {{2, 2, 8}, bf16}, {{2, 2}, f32},  // k_new, v_new, scores
        {{3}, i32},        {{2}, i32},        {{2}, i32},     // cu_seqlens, seq_slots, ctx_lens
        {{numBlocks, 4, 8}, bf16}, {{numBlocks, 4, 8}, bf16}, {{numBlocks, 4}, i32}, {{numBlocks, 4}, f32},
        {{1, 2, 2, 3}, i32}, {{1, 2, 2}, i32}, {{1, 2, 2, 1}, i32},  // block_table, kept_len, ring_table
        {{numBlocks}, i32},  {{1}, i32},       {{1}, i32}};         // free_stack, num_free, error
    std::vector<PluginTensorDesc> in;
    for (auto const& [d, t] : spec) {
        PluginTensorDesc desc{};
        desc.dims = dims(d);
        desc.type = t;
        desc.format = TensorFormat::kLINEAR;
        desc.scale = -1.f;
        in.push_back(desc);
    }
    return in;
}

IPluginCreatorV3One* findCreator(IPluginCreatorInterface* const* creators, int32_t n, char const* name) {
    for (int32_t i = 0; i < n; ++i) {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(c->getPluginName(), name) == 0) return c;
    }
    return nullptr;
}

// createPlugin with the fields as TensorRT's ONNX parser hands them (INT -> kINT32, FLOAT -> kFLOAT32).
IPluginV3* makeEvict(IPluginCreatorV3One* creator, TensorRTPhase phase, PluginFieldType layerType = PluginFieldType::kINT32) {
    static int32_t layer = 0, window = 4;
    static int64_t layer64 = 0;
    static float threshold = -1.f;
    std::vector<PluginField> fields{
        {"layer", layerType == PluginFieldType::kINT64 ? static_cast<void const*>(&layer64) : &layer, layerType, 1},
        {"window", &window, PluginFieldType::kINT32, 1},
        {"threshold", &threshold, PluginFieldType::kFLOAT32, 1}};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    return creator->createPlugin("evict_0", &fc, phase);
}

IPluginV3OneRuntime* runtimeOf(IPluginV3* p) {
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}

// enqueue with every output elsewhere than its input's memory: a runtime plugin stops at its
// aliasing check and a build-phase one before it, so nothing launches (the pointers are host memory).
int32_t enqueue(IPluginV3* p, std::vector<PluginTensorDesc> const& in) {
    static char memory[16], elsewhere[16];
    std::vector<void const*> inputs(in.size());
    for (size_t i = 0; i < in.size(); ++i) inputs[i] = &memory[i];
    std::vector<void*> outputs(10);
    for (int32_t o = 0; o < 10; ++o) outputs[o] = &elsewhere[o];
    std::vector<PluginTensorDesc> out(in.begin() + 6, in.end());
    return runtimeOf(p)->enqueue(in.data(), out.data(), inputs.data(), outputs.data(), nullptr, nullptr);
}

int32_t shapeChange(IPluginV3* p, std::vector<PluginTensorDesc> const& in) {
    std::vector<PluginTensorDesc> out(in.begin() + 6, in.end());
    return runtimeOf(p)->onShapeChange(in.data(), static_cast<int32_t>(in.size()), out.data(),
                                       static_cast<int32_t>(out.size()));
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::printf("usage: %s libkvzap_trt_plugins.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
        std::printf("dlopen: %s\n", dlerror());
        return 2;
    }
    using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    CHECK(getCreators != nullptr && setLoggerFinder != nullptr, "entry points");
    if (getCreators == nullptr || setLoggerFinder == nullptr) return 1;
    setLoggerFinder(&gFinder);
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    CHECK(n == 2, "%d creators", n);
    for (int32_t i = 0; i < n; ++i) {
        InterfaceInfo const info = creators[i]->getInterfaceInfo();
        CHECK(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1, "creator kind %s", info.kind);
    }
    IPluginCreatorV3One* evict = findCreator(creators, n, "KvzapEvict");
    IPluginCreatorV3One* attention = findCreator(creators, n, "KvzapVarlenPagedAttention");
    CHECK(evict != nullptr && attention != nullptr, "both creators");
    if (evict == nullptr || attention == nullptr) return 1;
    CHECK(std::strcmp(evict->getPluginVersion(), "1") == 0 && std::strcmp(evict->getPluginNamespace(), "kvzap_trt") == 0,
          "version / namespace");
    PluginFieldCollection const* names = evict->getFieldNames();
    CHECK(names->nbFields == 3 && std::strcmp(names->fields[0].name, "layer") == 0 &&
              names->fields[0].type == PluginFieldType::kINT32 && names->fields[2].type == PluginFieldType::kFLOAT32,
          "evict field names");

    // Fields of another type than the creator lists are refused, saying so.
    CHECK(makeEvict(evict, TensorRTPhase::kBUILD, PluginFieldType::kINT64) == nullptr, "kINT64 layer accepted");
    CHECK(logged("field 'layer' must be int32"), "message: %s", gLogger.last.c_str());

    // The builder's view: capabilities, aliasing.
    IPluginV3* built = makeEvict(evict, TensorRTPhase::kBUILD);
    CHECK(built != nullptr, "createPlugin(kBUILD): %s", gLogger.last.c_str());
    if (built == nullptr) return 1;
    auto* build = static_cast<IPluginV3OneBuildV2*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
    CHECK(build != nullptr && build->getNbOutputs() == 10 && build->getAliasedInput(0) == 6 &&
              build->getAliasedInput(9) == 15 && build->getAliasedInput(10) == -1,
          "aliasing");

    std::vector<PluginTensorDesc> const in = evictInputs();
    // enqueue before any onShapeChange: refused.
    IPluginV3* fresh = makeEvict(evict, TensorRTPhase::kRUNTIME);
    CHECK(enqueue(fresh, in) != 0 && logged("enqueue before a successful onShapeChange"), "%s",
          gLogger.last.c_str());

    // onShapeChange: accepted, accepted again unchanged (the per-step path), and a changed shape
    // is checked again (refused here: ring_table without its column), then accepted again.
    CHECK(shapeChange(fresh, in) == 0, "valid shapes refused: %s", gLogger.last.c_str());
    CHECK(shapeChange(fresh, in) == 0, "the same shapes refused the second time");
    std::vector<PluginTensorDesc> bad = in;
    bad[12].dims = dims({1, 2, 2, 2});
    CHECK(shapeChange(fresh, bad) != 0 && logged("ring_table"), "a wrong ring_table passed: %s", gLogger.last.c_str());
    CHECK(enqueue(fresh, in) != 0 && logged("enqueue before a successful onShapeChange"),
          "enqueue after refused shapes: %s", gLogger.last.c_str());
    CHECK(shapeChange(fresh, in) == 0, "valid shapes refused after a refusal");
    CHECK(shapeChange(fresh, evictInputs(12)) == 0, "another pool size refused");

    // A runtime plugin refuses to run with an aliased output elsewhere than its input (the engine
    // was built without aliased plugin I/O): before any launch, naming the output.
    gLogger.last.clear();
    CHECK(enqueue(fresh, evictInputs(12)) != 0 && logged("output k_pool_out is not the memory of its input k_pool"),
          "non-aliased outputs accepted: %s", gLogger.last.c_str());

    // A clone, and an attached copy, keep what their original resolved: they get past the
    // resolution check to the aliasing one.
    IPluginV3* clone = fresh->clone();
    IPluginV3* attached = runtimeOf(fresh)->attachToContext(nullptr);
    for (IPluginV3* copy : {clone, attached}) {
        gLogger.last.clear();
        CHECK(copy != nullptr && enqueue(copy, evictInputs(12)) != 0 && logged("is not the memory of its input"),
              "a copy lost its resolved shapes: %s", gLogger.last.c_str());
    }

    // A plugin of the build phase never launches: its enqueue returns 0 whatever the pointers
    // (TensorRT may time it on inputs of its own making), once its shapes are resolved.
    CHECK(shapeChange(built, in) == 0, "build plugin's shapes refused");
    gLogger.last.clear();
    CHECK(enqueue(built, in) == 0 && gLogger.last.empty(), "build-phase enqueue did something: %s",
          gLogger.last.c_str());
    IPluginV3* builtClone = built->clone();
    CHECK(builtClone != nullptr && enqueue(builtClone, in) == 0, "a build-phase clone launched");

    // Fields survive serialization into a runtime plugin.
    IPluginV3* reborn = evict->createPlugin("evict_0", runtimeOf(built)->getFieldsToSerialize(), TensorRTPhase::kRUNTIME);
    CHECK(reborn != nullptr && shapeChange(reborn, in) == 0, "serialized fields: %s", gLogger.last.c_str());

    for (IPluginV3* p : {built, fresh, clone, attached, builtClone, reborn}) delete p;
    std::printf("interfaces: %d checks, %d failed\n", gChecks, gFailures);
    return gFailures ? 1 : 0;
}
