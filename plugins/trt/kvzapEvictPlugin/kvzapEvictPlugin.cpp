// KvzapEvict: a thin shell over kvzapEvict. Shapes are checked by checkEvictShapes
// (common/kvzapPluginHost.cpp) in onShapeChange; enqueue fills kvzapEvictParams (layer `layer`
// of the [L, ...] cache tensors, or all of them when layer == -1; window and ring_pages from the
// `window` field) and launches. Every cache tensor is updated in place: each output is its input's
// memory (getAliasedInput).

#include "kvzapEvictPlugin.h"

#include <stdexcept>
#include <string>

#include "kvzapPluginConstants.h"
#include "kvzapPluginUtils.h"
#include "kvzap_kernels.h"

using namespace nvinfer1;

namespace kvzap_trt {

int32_t KvzapEvictPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                                  void const* const* inputs, void* const* outputs, void* /*workspace*/,
                                  cudaStream_t stream) noexcept {
    try {
        using namespace evict;
        if (!readyToLaunch(inputDesc, inputs, outputs)) return 0;
        CallDims const& d = mDims;
        // The aliased outputs are these inputs' memory (as in NVIDIA's aliased_io_plugin sample):
        // the kernels update them in place. One layer: pointers at layer `layer`; all: at layer 0.
        int64_t const layer = mFields.layer < 0 ? 0 : mFields.layer;
        auto rw = [](void const* p) { return const_cast<void*>(p); };
        auto at = [&](int32_t i, int64_t offsetBytes) { return static_cast<char*>(rw(inputs[i])) + offsetBytes; };
        int64_t const heads = d.S * d.H;  // per layer
        kvzapEvictParams p{};
        p.dtype = toKernelDtype(inputDesc[kK_NEW].type);
        p.num_layers = static_cast<int>(d.layers);
        setKernelDims(p, d);
        p.max_new_tokens = static_cast<int>(evictMaxNewTokens(d));
        p.threshold = mFields.threshold;
        p.k_new = inputs[kK_NEW];
        p.v_new = inputs[kV_NEW];
        p.scores = static_cast<float const*>(inputs[kSCORES]);
        p.cu_seqlens = static_cast<int32_t const*>(inputs[kCU_SEQLENS]);
        p.seq_slots = static_cast<int32_t const*>(inputs[kSEQ_SLOTS]);
        p.ctx_lens = static_cast<int32_t const*>(inputs[kCTX_LENS]);
        p.k_pool = rw(inputs[kK_POOL]);
        p.v_pool = rw(inputs[kV_POOL]);
        p.pos_pool = static_cast<int32_t*>(rw(inputs[kPOS_POOL]));
        p.score_pool = static_cast<float*>(rw(inputs[kSCORE_POOL]));
        p.block_table = reinterpret_cast<int32_t*>(at(kBLOCK_TABLE, layer * heads * d.M * 4));
        p.kept_len = reinterpret_cast<int32_t*>(at(kKEPT_LEN, layer * heads * 4));
        p.ring_table = reinterpret_cast<int32_t*>(at(kRING_TABLE, layer * heads * d.R * 4));
        p.free_stack = static_cast<int32_t*>(rw(inputs[kFREE_STACK]));
        p.num_free = static_cast<int32_t*>(rw(inputs[kNUM_FREE]));
        p.error = static_cast<int32_t*>(rw(inputs[kERROR]));
        cudaError_t const err = kvzapEvict(&p, stream);
        if (err != cudaSuccess) throw std::runtime_error(std::string("kvzapEvict: ") + cudaGetErrorString(err));
        return 0;
    } catch (std::exception const& e) {
        reportException(mRecorder, kEVICT_NAME, e);
    }
    return -1;
}

}  // namespace kvzap_trt
