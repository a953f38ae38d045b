// Partitioned k-NN of DEGC on the GPU: one warp per token (knn_impl.h), the
// per-warp top-K lists in shared memory.
#include "../common/cvig_cuda.cuh"
#include "knn_impl.h"

namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T>
__global__ void knn_kernel(const T* __restrict__ xn, const int32_t* __restrict__ labels, int B, int N, int C, int K,
                           int32_t* __restrict__ idx, int32_t* __restrict__ valid) {
    extern __shared__ float scratch[];  // [warps][K] similarities, then [warps][K] indices
    const int warp = threadIdx.x / cvig::kWarp, lane = threadIdx.x % cvig::kWarp;
    const long long token = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + warp;
    if (token >= static_cast<long long>(B) * N) return;  // whole warps leave together
    const int b = static_cast<int>(token / N), v = static_cast<int>(token % N);
    float* best = scratch + warp * K;
    int* who = reinterpret_cast<int*>(scratch + kWarpsPerBlock * K) + warp * K;
    const size_t img = static_cast<size_t>(b) * N;
    const cvig::KnnImage<T> s{xn + img * C, labels + img, N, C, K, idx + img * K, valid + img * K};
    cvig::knn_token(s, v, lane, best, who);
}

template <typename T>
int launch(const void* xn, const int32_t* labels, int B, int N, int C, int K, int32_t* idx, int32_t* valid,
           cudaStream_t s) {
    const long long tokens = static_cast<long long>(B) * N;
    const size_t smem = 2 * static_cast<size_t>(kWarpsPerBlock) * K * sizeof(float);
    knn_kernel<T><<<cvig::blocks_for(tokens, kWarpsPerBlock), kWarpsPerBlock * cvig::kWarp, smem, s>>>(
        static_cast<const T*>(xn), labels, B, N, C, K, idx, valid);
    return cvig::launch_status();
}

}  // namespace

extern "C" int cvig_partitioned_knn_launch(const void* xn, const int32_t* labels, int dtype, int B, int N, int C,
                                           int K, int32_t* idx, int32_t* valid, cudaStream_t stream) {
    const int st = cvig::check_knn(xn, labels, dtype, B, N, C, K, idx, valid);
    if (st != CVIG_OK) return st;
    if (dtype == CVIG_FP32) return launch<float>(xn, labels, B, N, C, K, idx, valid, stream);
    return launch<cvig::f16>(xn, labels, B, N, C, K, idx, valid, stream);
}
