// Building blocks shared by the GPU and host builds of the ClusterViG kernels.
//
// Every piece of per-element math is a CVIG_HD function: nvcc compiles it into
// the CUDA kernels, the host compiler into libcvig_kernels_host.so, and both
// builds perform the same float operations in the same order (no FMA
// contraction on either side: the device path uses the _rn intrinsics, the
// host build is compiled with -ffp-contract=off). A warp-cooperative step is
// written once against warp_sum / warp_ballot: on the GPU every lane of a warp
// calls it with its lane id; on the host it is called once (lane 0) and the
// collective evaluates all 32 lanes itself, so results are bit-identical.
#ifndef CVIG_HD_H
#define CVIG_HD_H

#include <stddef.h>
#include <stdint.h>

#include <cstring>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define CVIG_HD __host__ __device__ __forceinline__
#else
#define CVIG_HD inline
#endif

namespace cvig {

constexpr int kWarp = 32;

// IEEE binary16 as raw bits: the same 2-byte layout as CUDA's __half, usable
// where no CUDA header exists.
struct f16 {
    uint16_t bits;
};

CVIG_HD float half_to_float(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));
#else
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        // zero or subnormal: man * 2^-24 is exact in float
        const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
        return sign ? -v : v;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

// Round to nearest, ties to even (CUDA's __float2half_rn).
CVIG_HD uint16_t float_to_half(float f) {
#ifdef __CUDA_ARCH__
    return __half_as_ushort(__float2half_rn(f));
#else
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return static_cast<uint16_t>(0x7fffu);                 // NaN, as CUDA returns it
    if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);         // >= 65520 rounds to inf
    if (x < 0x38800000u) {                                                      // below 2^-14: subnormal
        if (x < 0x33000000u) return sign;                                       // < 2^-25 rounds to zero
        const uint32_t e = x >> 23;
        const uint32_t m = (x & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e;                                        // 14..24
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
        return static_cast<uint16_t>(sign | r);
    }
    const uint32_t m = x - 0x38000000u;  // rebias the exponent from 127 to 15
    uint32_t r = m >> 13;
    const uint32_t rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is correct rounding
    return static_cast<uint16_t>(sign | r);
#endif
}

CVIG_HD float load(const float* p, size_t i) { return p[i]; }
CVIG_HD float load(const f16* p, size_t i) { return half_to_float(p[i].bits); }
CVIG_HD void store(float* p, size_t i, float v) { p[i] = v; }
CVIG_HD void store(f16* p, size_t i, float v) { p[i].bits = float_to_half(v); }

// Separately rounded multiply and add: never contracted into an FMA, so the
// GPU and the host round identically.
CVIG_HD float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
CVIG_HD float fadd(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
CVIG_HD float fsub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

CVIG_HD int popcount(uint32_t m) {
#ifdef __CUDA_ARCH__
    return __popc(m);
#else
    return __builtin_popcount(m);
#endif
}

CVIG_HD int lowest_bit(uint32_t m) {  // m != 0
#ifdef __CUDA_ARCH__
    return __ffs(static_cast<int>(m)) - 1;
#else
    return __builtin_ctz(m);
#endif
}

// Stride of a lane-parallel loop `for (i = lane; i < n; i += lane_stride())`:
// 32 on the GPU, 1 on the host (where lane is 0), so the host covers every i.
CVIG_HD int lane_stride() {
#ifdef __CUDA_ARCH__
    return kWarp;
#else
    return 1;
#endif
}

CVIG_HD void warp_sync() {
#ifdef __CUDA_ARCH__
    __syncwarp();
#endif
}

// The dot product of two C-vectors as a warp computes it: lane l sums the
// products of channels l, l+32, l+64, ... in increasing order, then the 32
// partial sums are combined by a fixed tree (distance 16, 8, 4, 2, 1). Every
// lane of the warp receives the result.
template <typename A, typename B>
CVIG_HD float warp_dot(const A* a, const B* b, int C, int lane) {
#ifdef __CUDA_ARCH__
    float v = 0.f;
    for (int c = lane; c < C; c += kWarp) v = fadd(v, fmul(load(a, c), load(b, c)));
    for (int off = kWarp / 2; off > 0; off >>= 1) v = fadd(v, __shfl_down_sync(0xffffffffu, v, off));
    return __shfl_sync(0xffffffffu, v, 0);
#else
    (void)lane;
    float p[kWarp];
    for (int l = 0; l < kWarp; ++l) p[l] = 0.f;
    int c0 = 0;
    for (; c0 + kWarp <= C; c0 += kWarp) {  // whole rows of 32 lanes: a fixed-length loop the compiler vectorises
        for (int l = 0; l < kWarp; ++l) p[l] = fadd(p[l], fmul(load(a, c0 + l), load(b, c0 + l)));
    }
    for (int l = 0; c0 + l < C; ++l) p[l] = fadd(p[l], fmul(load(a, c0 + l), load(b, c0 + l)));
    for (int off = kWarp / 2; off > 0; off >>= 1)
        for (int l = 0; l < off; ++l) p[l] = fadd(p[l], p[l + off]);
    return p[0];
#endif
}

// Bit l set where pred(l) holds, for the 32 lanes of a warp (__ballot_sync).
template <typename Pred>
CVIG_HD uint32_t warp_ballot(Pred pred, int lane) {
#ifdef __CUDA_ARCH__
    return __ballot_sync(0xffffffffu, pred(lane));
#else
    (void)lane;
    uint32_t m = 0;
    for (int l = 0; l < kWarp; ++l) m |= pred(l) ? (1u << l) : 0u;
    return m;
#endif
}

}  // namespace cvig

#endif  // CVIG_HD_H
