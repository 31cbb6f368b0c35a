// What the two kvzap-trt TensorRT plugins share: the IPluginV3 methods whose logic is the same for
// both (capabilities, clone, name / version / namespace, output types and shapes from the I/O
// table, formats, aliasing, shape checks in onShapeChange, attachToContext, serialization) and the
// creator. A plugin supplies a Traits struct (its name, fields, I/O table and host functions of
// kvzapPluginHost.h) and writes only what is its own: enqueue, and getWorkspaceSize where it
// needs one.
//
// Traits: Fields (the parsed fields struct), kName, kNbInputs, kNbOutputs, kDtypeInput (the input
// whose dtype is the call's K/V dtype) and the host functions io, parseFields, fieldsOf and
// checkShapes (see kvzapPluginHost.h).

#ifndef KVZAP_PLUGIN_BASE_H_
#define KVZAP_PLUGIN_BASE_H_

#include <NvInferRuntime.h>

#include <array>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "kvzapPluginConstants.h"
#include "kvzapPluginHost.h"
#include "kvzapPluginUtils.h"

namespace kvzap_trt {

// Derived: the plugin class (CRTP, for clone and attachToContext to copy it).
template <typename Derived, typename PluginTraits>
class KvzapPluginBase : public nvinfer1::IPluginV3,
                        public nvinfer1::IPluginV3OneCore,
                        public nvinfer1::IPluginV3OneBuildV2,
                        public nvinfer1::IPluginV3OneRuntime {
public:
    using Traits = PluginTraits;
    using Fields = typename Traits::Fields;

    explicit KvzapPluginBase(Fields const& fields, nvinfer1::TensorRTPhase phase = nvinfer1::TensorRTPhase::kRUNTIME)
        : mFields(fields), mPhase(phase) {}
    // A copy (clone, attachToContext) is fully initialised, as TensorRT requires of a clone: the
    // fields, the phase and what the last onShapeChange resolved (shapes and dtype only, so valid
    // for the copy too). The error recorder is attachToContext's to set.
    KvzapPluginBase(KvzapPluginBase const& other)
        : nvinfer1::IPluginV3(), nvinfer1::IPluginV3OneCore(), nvinfer1::IPluginV3OneBuildV2(),
          nvinfer1::IPluginV3OneRuntime(), mFields(other.mFields), mDims(other.mDims), mShapes(other.mShapes),
          mDtype(other.mDtype), mPhase(other.mPhase) {}
    KvzapPluginBase& operator=(KvzapPluginBase const&) = delete;
    ~KvzapPluginBase() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
        try {
            switch (type) {
                case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
                case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuildV2*>(this);
                case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
            }
            throw InvalidArgument("unknown plugin capability");
        } catch (std::exception const& e) {
            reportException(mRecorder, Traits::kName, e);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override {
        try {
            return std::make_unique<Derived>(self()).release();
        } catch (std::exception const& e) {
            reportException(mRecorder, Traits::kName, e);
        }
        return nullptr;
    }

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return Traits::kName; }
    char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }

    // IPluginV3OneBuildV2
    int32_t getNbOutputs() const noexcept override { return Traits::kNbOutputs; }

    // Each output has the dtype and shape of the input it follows (PluginIo::followsInput).
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override {
        try {
            followInputs(outputTypes, inputTypes, nbInputs, nbOutputs);
            return 0;
        } catch (std::exception const& e) {
            reportException(mRecorder, Traits::kName, e);
        }
        return -1;
    }

    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                            nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                            nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept override {
        try {
            followInputs(outputs, inputs, nbInputs, nbOutputs);
            return 0;
        } catch (std::exception const& e) {
            reportException(mRecorder, Traits::kName, e);
        }
        return -1;
    }

    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        try {
            if (inOut == nullptr || nbInputs != Traits::kNbInputs || nbOutputs != Traits::kNbOutputs) return false;
            return inOut[pos].desc.format == nvinfer1::TensorFormat::kLINEAR &&
                   supportsDtype(Traits::io(), pos, static_cast<int32_t>(inOut[pos].desc.type),
                                 static_cast<int32_t>(inOut[0].desc.type));
        } catch (std::exception const& e) {
            reportException(mRecorder, Traits::kName, e);
        }
        return false;
    }

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* /*in*/, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override {
        // Shapes may still hold wildcards here: they are checked for real in onShapeChange.
        try {
            requireIoCounts(nbInputs, nbOutputs);
            return 0;
        } catch (std::exception const& e) {
            reportException(mRecorder, Traits::kName, e);
        }
        return -1;
    }

    int32_t getAliasedInput(int32_t outputIndex) noexcept override {
        PluginIo const& io = Traits::io();
        if (outputIndex < 0 || outputIndex >= static_cast<int32_t>(io.outputs.size())) return -1;
        return io.outputs[outputIndex].aliasedInput;
    }

    // IPluginV3OneRuntime (enqueue: the plugin's own)
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::PluginTensorDesc const* /*out*/, int32_t /*nbOutputs*/) noexcept override {
        try {
            // TensorRT calls this whenever an input's shape or address changes, so every step (the
            // step's inputs are fresh tensors): shapes equal to the last accepted ones return at once.
            std::array<Shape, Traits::kNbInputs> shapes{};
            int32_t const dtype = nbInputs > 0 ? static_cast<int32_t>(in[Traits::kDtypeInput].type) : -1;
            if (nbInputs == Traits::kNbInputs) {
                for (int32_t i = 0; i < nbInputs; ++i) shapes[i] = toShape(in[i].dims);
                if (mDtype >= 0 && dtype == mDtype && sameShapes(shapes, mShapes)) return 0;
            }
            mDtype = -1;
            std::string const problem = Traits::checkShapes(shapes.data(), nbInputs, mFields, dtype, mDims);
            if (!problem.empty()) throw InvalidArgument(problem);
            onShapesAccepted();
            mShapes = shapes;
            mDtype = dtype;
            return 0;
        } catch (std::exception const& e) {
            reportException(mRecorder, Traits::kName, e);
        }
        return -1;
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override {
        try {
            auto plugin = std::make_unique<Derived>(self());
            plugin->mRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
            return plugin.release();
        } catch (std::exception const& e) {
            reportException(mRecorder, Traits::kName, e);
        }
        return nullptr;
    }

    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        try {
            mSerialized = toPluginFields(Traits::fieldsOf(mFields));
            mSerializedFC.nbFields = static_cast<int32_t>(mSerialized.size());
            mSerializedFC.fields = mSerialized.data();
            return &mSerializedFC;
        } catch (std::exception const& e) {
            reportException(mRecorder, Traits::kName, e);
        }
        return nullptr;
    }

protected:
    // Called by onShapeChange once the shapes are accepted, before the call counts as resolved;
    // may throw (the call then stays unresolved).
    virtual void onShapesAccepted() {}

    // For enqueue, before any launch: throws unless the last onShapeChange succeeded for this K/V
    // dtype; false when the call must do nothing: a plugin of the build phase, which TensorRT may
    // enqueue to time it on inputs of its own making, whose block ids and slots index nothing real
    // (the kernels would read and write wherever they point). Engines run plugins of the runtime
    // phase (createPlugin(kRUNTIME) at deserialization), and a single-tactic plugin has nothing
    // to tune. Then throws unless every aliased output is its input's memory: the kernels update
    // the cache through the inputs, so an output elsewhere (aliasing off: the engine was built
    // without the ALIASED_PLUGIN_IO_10_03 preview feature) would hand on a stale cache; and unless
    // every K/V-typed tensor is 16-byte aligned (the torch ops check the same).
    bool readyToLaunch(nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs,
                       void* const* outputs) const {
        if (mDtype < 0 || static_cast<int32_t>(inputDesc[Traits::kDtypeInput].type) != mDtype)
            throw InvalidArgument("enqueue before a successful onShapeChange");
        if (mPhase == nvinfer1::TensorRTPhase::kBUILD) return false;
        Shape shapes[Traits::kNbInputs];
        for (int32_t i = 0; i < Traits::kNbInputs; ++i) shapes[i] = toShape(inputDesc[i].dims);
        std::string problem = aliasingProblem(Traits::io(), shapes, inputs, outputs);
        if (problem.empty()) problem = alignmentProblem(Traits::io(), shapes, inputs, outputs);
        if (!problem.empty()) throw InvalidArgument(problem);
        return true;
    }

    Fields mFields;
    nvinfer1::IErrorRecorder* mRecorder = nullptr;  // the execution context's, from attachToContext
    CallDims mDims;                                 // from the last onShapeChange
    std::array<Shape, Traits::kNbInputs> mShapes{};  // the input shapes mDims was resolved from
    int32_t mDtype = -1;                            // K/V DataType of mDims, -1: not resolved
    nvinfer1::TensorRTPhase mPhase;                 // createPlugin's: kBUILD objects never launch

private:
    Derived const& self() const { return static_cast<Derived const&>(*this); }

    static bool sameShapes(std::array<Shape, Traits::kNbInputs> const& a, std::array<Shape, Traits::kNbInputs> const& b) {
        for (int32_t i = 0; i < Traits::kNbInputs; ++i) {
            if (a[i].nbDims != b[i].nbDims) return false;
            for (int32_t k = 0; k < a[i].nbDims; ++k)
                if (a[i].d[k] != b[i].d[k]) return false;
        }
        return true;
    }

    static void requireIoCounts(int32_t nbInputs, int32_t nbOutputs) {
        if (nbInputs != Traits::kNbInputs || nbOutputs != Traits::kNbOutputs)
            throw InvalidArgument("expected " + std::to_string(Traits::kNbInputs) + " inputs and " +
                                  std::to_string(Traits::kNbOutputs) + " outputs");
    }

    // outputs[i] = inputs[the input output i follows], for dtypes and shapes alike.
    template <typename T>
    static void followInputs(T* outputs, T const* inputs, int32_t nbInputs, int32_t nbOutputs) {
        requireIoCounts(nbInputs, nbOutputs);
        PluginIo const& io = Traits::io();
        for (int32_t i = 0; i < nbOutputs; ++i) outputs[i] = inputs[io.outputs[i].followsInput];
    }

    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mSerializedFC{};
};

// The creator of Plugin (a KvzapPluginBase): lists the fields, parses and validates them
// (Traits::parseFields) and makes the plugin.
template <typename Plugin>
class KvzapPluginCreator : public nvinfer1::IPluginCreatorV3One {
    using Traits = typename Plugin::Traits;

public:
    KvzapPluginCreator() {
        // Only the names, types and lengths are listed: data stays null.
        for (auto const& f : Traits::fieldsOf(typename Traits::Fields{}))
            mFields.emplace_back(f.name, nullptr, static_cast<nvinfer1::PluginFieldType>(f.type), f.length);
        mFC.nbFields = static_cast<int32_t>(mFields.size());
        mFC.fields = mFields.data();
    }
    ~KvzapPluginCreator() override = default;

    char const* getPluginName() const noexcept override { return Traits::kName; }
    char const* getPluginVersion() const noexcept override { return kPLUGIN_VERSION; }
    char const* getPluginNamespace() const noexcept override { return kPLUGIN_NAMESPACE; }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFC; }

    nvinfer1::IPluginV3* createPlugin(char const* /*name*/, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override {
        try {
            std::vector<Field> const fields = toFields(fc);
            typename Traits::Fields parsed;
            std::string const problem = Traits::parseFields(fields.data(), static_cast<int32_t>(fields.size()), parsed);
            if (!problem.empty()) throw InvalidArgument(problem);
            return std::make_unique<Plugin>(parsed, phase).release();
        } catch (std::exception const& e) {
            reportException(nullptr, mWhere.c_str(), e);
        }
        return nullptr;
    }

private:
    std::string const mWhere = std::string(Traits::kName) + " creator";  // in messages
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFC{};
};

}  // namespace kvzap_trt

#endif  // KVZAP_PLUGIN_BASE_H_
