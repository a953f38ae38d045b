// Segment ops on the GPU: one thread per output element of segment_impl.h.
#include "../common/cvig_cuda.cuh"
#include "segment_impl.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void segment_mean_kernel(const T* __restrict__ x, const int32_t* __restrict__ labels, int B, int N, int C,
                                    int k, T* __restrict__ z, int32_t* __restrict__ counts) {
    const long long item = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (item < static_cast<long long>(B) * k * C) cvig::segment_mean_item(x, labels, N, C, k, z, counts, item);
}

template <typename T>
__global__ void gather_max_rel_kernel(const T* __restrict__ x, const int32_t* __restrict__ idx, int B, int N, int C,
                                      int K, T* __restrict__ out) {
    const long long item = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (item < static_cast<long long>(B) * N * C) cvig::gather_max_rel_item(x, idx, N, C, K, out, item);
}

template <typename T>
int segment_mean(const void* x, const int32_t* labels, int B, int N, int C, int k, void* z, int32_t* counts,
                 cudaStream_t s) {
    const long long n = static_cast<long long>(B) * k * C;
    segment_mean_kernel<T><<<cvig::blocks_for(n, kThreads), kThreads, 0, s>>>(static_cast<const T*>(x), labels, B, N,
                                                                               C, k, static_cast<T*>(z), counts);
    return cvig::launch_status();
}

template <typename T>
int gather_max_rel(const void* x, const int32_t* idx, int B, int N, int C, int K, void* out, cudaStream_t s) {
    const long long n = static_cast<long long>(B) * N * C;
    gather_max_rel_kernel<T><<<cvig::blocks_for(n, kThreads), kThreads, 0, s>>>(static_cast<const T*>(x), idx, B, N,
                                                                                 C, K, static_cast<T*>(out));
    return cvig::launch_status();
}

}  // namespace

extern "C" int cvig_segment_mean_launch(const void* x, const int32_t* labels, int dtype, int B, int N, int C, int k,
                                        void* z, int32_t* counts, cudaStream_t stream) {
    const int st = cvig::check_segment_mean(x, labels, dtype, B, N, C, k, z, counts);
    if (st != CVIG_OK) return st;
    if (dtype == CVIG_FP32) return segment_mean<float>(x, labels, B, N, C, k, z, counts, stream);
    return segment_mean<cvig::f16>(x, labels, B, N, C, k, z, counts, stream);
}

extern "C" int cvig_gather_max_rel_launch(const void* x, const int32_t* idx, int dtype, int B, int N, int C, int K,
                                          void* out, cudaStream_t stream) {
    const int st = cvig::check_gather_max_rel(x, idx, dtype, B, N, C, K, out);
    if (st != CVIG_OK) return st;
    if (dtype == CVIG_FP32) return gather_max_rel<float>(x, idx, B, N, C, K, out, stream);
    return gather_max_rel<cvig::f16>(x, idx, B, N, C, K, out, stream);
}
