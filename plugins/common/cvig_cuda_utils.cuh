// Small device helpers shared by the kernels: FP16/FP32 loads and stores in float.
#ifndef CVIG_CUDA_UTILS_CUH
#define CVIG_CUDA_UTILS_CUH

#include <cuda_fp16.h>

#include "cvig_kernels.h"

namespace cvig {

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, size_t i, float v) { p[i] = __float2half(v); }

inline int launch_status() { return cudaGetLastError() == cudaSuccess ? CVIG_OK : CVIG_CUDA_ERROR; }

inline int blocks_for(long long n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

}  // namespace cvig

#endif  // CVIG_CUDA_UTILS_CUH
