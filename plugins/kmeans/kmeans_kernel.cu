// k-means of DEGC on the GPU: one thread block per image runs the phases of
// kmeans_impl.h with its threads (coalesced, lane-parallel dot products) and a
// barrier between phases. The working set lives in shared memory.
#include "../common/cvig_cuda.cuh"
#include "kmeans_impl.h"

namespace {

constexpr int kMaxThreads = 1024;

// centroids: [B, k, C] in x's type, or null (labels and counts only). One 1024-thread block per SM: without
// the ', 1', ptxas aims at two per SM, caps the kernel at 32 registers and spills on sm_90/sm_100
// (tests/test_plugins_build.py::test_cuda_resources_of_every_kernel).
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, 1) kmeans_kernel(const T* __restrict__ xn, int N, int C, int k, int iters,
                                                             int empty_zero, int32_t* __restrict__ labels,
                                                             int32_t* __restrict__ counts, T* __restrict__ centroids) {
    extern __shared__ float smem[];
    const cvig::KMeansImage<T> s =
        cvig::kmeans_image(xn + static_cast<size_t>(blockIdx.x) * N * C, N, C, k, smem, empty_zero);
    cvig::BlockExec ex;
    cvig::kmeans_run(s, iters, ex);
    for (int v = threadIdx.x; v < N; v += blockDim.x) labels[static_cast<size_t>(blockIdx.x) * N + v] = s.lab[v];
    for (int j = threadIdx.x; j < k; j += blockDim.x) counts[static_cast<size_t>(blockIdx.x) * k + j] = s.cnt[j];
    if (centroids != nullptr) {
        T* cent = centroids + static_cast<size_t>(blockIdx.x) * k * C;
        for (int i = threadIdx.x; i < k * C; i += blockDim.x) cvig::km_store_centroid(s, cent, i);
    }
}

template <typename T>
int launch(const void* xn, int B, int N, int C, int k, int iters, int empty_zero, int32_t* labels, int32_t* counts,
           void* centroids, cudaStream_t s) {
    const size_t smem = cvig::kmeans_smem_bytes(N, C, k);
    int max_smem = 0, sms = 0;
    if (cvig::device_limits(&max_smem, &sms) != CVIG_OK) return CVIG_CUDA_ERROR;
    if (smem > static_cast<size_t>(max_smem)) return CVIG_UNSUPPORTED_SIZE;
    if (smem > 48 * 1024 && cudaFuncSetAttribute(kmeans_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem)) != cudaSuccess) {
        return CVIG_CUDA_ERROR;
    }
    // Few images: wide blocks so one image uses a whole SM; many: narrower blocks, several per SM.
    const int threads = B < sms ? kMaxThreads : 256;
    kmeans_kernel<T><<<B, threads, smem, s>>>(static_cast<const T*>(xn), N, C, k, iters, empty_zero, labels, counts,
                                              static_cast<T*>(centroids));
    return cvig::launch_status();
}

int launch_any(const void* xn, int dtype, int B, int N, int C, int k, int iters, int empty_zero, int32_t* labels,
               int32_t* counts, void* centroids, cudaStream_t stream) {
    if (dtype == CVIG_FP32) return launch<float>(xn, B, N, C, k, iters, empty_zero, labels, counts, centroids, stream);
    return launch<cvig::f16>(xn, B, N, C, k, iters, empty_zero, labels, counts, centroids, stream);
}

}  // namespace

extern "C" const char* cvig_kernels_backend(void) { return CVIG_BACKEND_NAME; }

extern "C" size_t cvig_kmeans_smem_bytes(int N, int C, int k) { return cvig::kmeans_smem_bytes(N, C, k); }

extern "C" int cvig_kmeans_launch(const void* xn, int dtype, int B, int N, int C, int k, int iters,
                                  int32_t* labels, int32_t* counts, cudaStream_t stream) {
    const int st = cvig::check_kmeans(xn, dtype, B, N, C, k, iters, labels, counts);
    if (st != CVIG_OK) return st;
    return launch_any(xn, dtype, B, N, C, k, iters, 0, labels, counts, nullptr, stream);
}

extern "C" int cvig_kmeans_centroids_launch(const void* x, int dtype, int B, int N, int C, int k, int iters,
                                            int empty_zero, int32_t* labels, int32_t* counts, void* centroids,
                                            cudaStream_t stream) {
    const int st = cvig::check_kmeans_centroids(x, dtype, B, N, C, k, iters, empty_zero, labels, counts, centroids);
    if (st != CVIG_OK) return st;
    return launch_any(x, dtype, B, N, C, k, iters, empty_zero, labels, counts, centroids, stream);
}
