// KvzapVarlenPagedAttention: a thin shell over kvzapVarlenPagedAttention. Shapes are checked by
// checkAttentionShapes (common/kvzapPluginHost.cpp) in onShapeChange; enqueue fills
// kvzapAttentionParams (pointers of layer `layer` of the [L, ...] cache tensors; window and
// ring_pages from the `window` field) and launches.

#include "kvzapVarlenPagedAttentionPlugin.h"

#include <stdexcept>
#include <string>
#include <vector>

#include "kvzapPluginConstants.h"
#include "kvzapPluginUtils.h"
#include "kvzap_kernels.h"

using namespace nvinfer1;

namespace kvzap_trt {

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
        return attentionProfileWorkspace(lo.data(), hi.data(), nbInputs, mFields);
    } catch (std::exception const& e) {
        reportException(mRecorder, kATTENTION_NAME, e);
    }
    return 0;
}

void KvzapVarlenPagedAttentionPlugin::onShapesAccepted() {
    if (mNumSms == 0) currentDevice(mNumSms, mSm);
}

int32_t KvzapVarlenPagedAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                                                 void const* const* inputs, void* const* outputs, void* workspace,
                                                 cudaStream_t stream) noexcept {
    try {
        using namespace attn;
        if (!readyToLaunch(inputDesc, inputs, outputs)) return 0;
        CallDims const& d = mDims;
        kvzapDtype const dtype = toKernelDtype(inputDesc[kQ].type);
        int32_t const split = attentionSplit(d, dtype, mNumSms, mSm);
        size_t const need = attentionWorkspaceBytes(d, split);
        if (need > attentionWorkspaceBound(d))  // cannot happen (see attentionWorkspaceBound); never overrun
            throw std::runtime_error("workspace bound below the launch's need");
        if (need > 0 && workspace == nullptr) throw std::runtime_error("no workspace");

        // Layer `layer` of the [L, ...] cache tensors. The aliased outputs are these inputs' memory;
        // the only one written is the error flag (OR-ed, never cleared: the host zeroes it per step).
        int64_t const layer = mFields.layer;
        kvzapAttentionParams p{};
        p.dtype = dtype;
        setKernelDims(p, d);
        p.num_q_heads = static_cast<int>(d.Hq);
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
        p.ring_table = static_cast<int32_t const*>(inputs[kRING_TABLE]) + layer * d.S * d.H * d.R;
        p.out = outputs[kOUT];
        p.workspace = need > 0 ? static_cast<float*>(workspace) : nullptr;
        p.error = static_cast<int32_t*>(const_cast<void*>(inputs[kERROR]));
        cudaError_t const err = kvzapVarlenPagedAttention(&p, split, stream);
        if (err != cudaSuccess)
            throw std::runtime_error(std::string("kvzapVarlenPagedAttention: ") + cudaGetErrorString(err));
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kATTENTION_NAME, e);
    }
    return -1;
}

}  // namespace kvzap_trt
