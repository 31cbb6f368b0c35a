// Helpers shared by the kvzap-trt kernels: 16-byte vectors of any element type, conversions, and
// block-wide integer reductions and scans.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace kvzap {

// A launch grid's y and z dimensions hold at most this many blocks; the launchers refuse more.
constexpr int kMaxGridYZ = 65535;

// VEC elements of T in one 16-byte access.
template <typename T>
struct Vec16 {
    static constexpr int VEC = 16 / sizeof(T);
};

__device__ __forceinline__ void to_float(const uint4& raw, float (&out)[4], float) {
    const float* f = reinterpret_cast<const float*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = f[i];
}

__device__ __forceinline__ float2 pair_to_float2(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 pair_to_float2(__nv_bfloat162 h) { return __bfloat1622float2(h); }

// 8 half-precision values (Pair: __half2 or __nv_bfloat162) to float.
template <typename Pair>
__device__ __forceinline__ void pairs_to_float(const uint4& raw, float (&out)[8]) {
    const Pair* h = reinterpret_cast<const Pair*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = pair_to_float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ void to_float(const uint4& raw, float (&out)[8], __half) { pairs_to_float<__half2>(raw, out); }
__device__ __forceinline__ void to_float(const uint4& raw, float (&out)[8], __nv_bfloat16) {
    pairs_to_float<__nv_bfloat162>(raw, out);
}

__device__ __forceinline__ float from_float(float x, float) { return x; }
__device__ __forceinline__ __half from_float(float x, __half) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 from_float(float x, __nv_bfloat16) { return __float2bfloat16_rn(x); }

// Streaming 16-byte load: read once, do not keep in L1.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
}

// Block-wide sum of one int per thread; every thread gets the total. `scratch` holds 32 ints.
__device__ __forceinline__ int block_sum(int x, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    int total = 0;
    for (int w = 0; w < nwarps; ++w) total += scratch[w];
    return total;
}

// Block-wide exclusive scan of one int per thread; `*total` gets the sum. `scratch` holds 32 ints.
__device__ __forceinline__ int block_exclusive_scan(int x, int* scratch, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    int inclusive = x;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, inclusive, o);
        if (lane >= o) inclusive += y;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    int before = 0, sum = 0;
    for (int w = 0; w < nwarps; ++w) {
        if (w < warp) before += scratch[w];
        sum += scratch[w];
    }
    *total = sum;
    return before + inclusive - x;
}

}  // namespace kvzap
