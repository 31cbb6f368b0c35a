// Tensor-core pieces of the attention kernel's half-precision path: one mma.sync.m16n8k16 with
// fp32 accumulation, and the packing between 16-bit pairs and floats. sm_80 and newer.
//
// Fragment layout of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 g + t:
//   A [16 x 16] row-major: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B [16 x 8]  ("col"):   b0 = B[2t, 2t+1][g],  b1 = B[2t+8, 2t+9][g]
//   C [16 x 8]  fp32:      c0, c1 = C[g][2t, 2t+1],  c2, c3 = C[g+8][2t, 2t+1]
// The lower 16 bits of a register hold the element of the smaller column (A) or row (B) index.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kvzap-trt's attention kernel needs sm_80 or newer (bf16/fp16 tensor cores, mma.m16n8k16)"
#endif

namespace kvzap {

// c += A B for one m16n8k16 tile, fp32 accumulators.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          __nv_bfloat16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to one 16-bit pair (lo in the lower half), and the rounded values back.
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, float2& rounded, __nv_bfloat16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    rounded = __bfloat1622float2(h);
    return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi, float2& rounded, __half) {
    const __half2 h = __floats2half2_rn(lo, hi);
    rounded = __half22float2(h);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// The 16-bit element `half` (0: lower) of x and of y as one pair (x's in the lower half).
__device__ __forceinline__ uint32_t pair_of_halves(uint32_t x, uint32_t y, int half) {
    return __byte_perm(x, y, half ? 0x7632 : 0x5410);
}

// Word w (0-based 32-bit word) of an array of 16-byte vectors.
template <int N>
__device__ __forceinline__ uint32_t word(const uint4 (&v)[N], int w) {
    const uint4& x = v[w / 4];
    const int i = w % 4;
    return i == 0 ? x.x : i == 1 ? x.y : i == 2 ? x.z : x.w;
}

}  // namespace kvzap
