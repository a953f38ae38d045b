// k-means of DEGC (DESIGN.md 2.2), one thread block per image.
//
// The whole working set (centroids, their sums and norms, counts, labels)
// lives in shared memory; sums are accumulated per channel in token order,
// without atomics, so a run is deterministic.
#include <cfloat>

#include "../common/cvig_cuda_utils.cuh"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void kmeans_kernel(const T* __restrict__ xn, int N, int C, int k, int iters,
                              int32_t* __restrict__ labels, int32_t* __restrict__ counts) {
    extern __shared__ float smem[];
    float* cent = smem;            // [k, C]
    float* sums = cent + k * C;    // [k, C]
    float* cnorm = sums + k * C;   // [k]
    int* cnt = reinterpret_cast<int*>(cnorm + k);  // [k]
    int* lab = cnt + k;            // [N]
    const T* x = xn + static_cast<size_t>(blockIdx.x) * N * C;

    for (int i = threadIdx.x; i < k * C; i += blockDim.x) {
        const int j = i / C, c = i % C;
        const int v = static_cast<int>((static_cast<long long>(2 * j + 1) * N) / (2 * k));
        cent[i] = cvig::load(x, static_cast<size_t>(v) * C + c);
    }
    __syncthreads();

    for (int t = 0;; ++t) {
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            float s = 0.f;
            for (int c = 0; c < C; ++c) s += cent[j * C + c] * cent[j * C + c];
            cnorm[j] = s;
        }
        __syncthreads();
        // assignment: argmin_j ||c_j||^2 - 2 x.c_j, strict < keeps the lower j on ties
        for (int v = threadIdx.x; v < N; v += blockDim.x) {
            float best = FLT_MAX;
            int best_j = 0;
            for (int j = 0; j < k; ++j) {
                float dot = 0.f;
                for (int c = 0; c < C; ++c) dot += cvig::load(x, static_cast<size_t>(v) * C + c) * cent[j * C + c];
                const float d = cnorm[j] - 2.f * dot;
                if (d < best) {
                    best = d;
                    best_j = j;
                }
            }
            lab[v] = best_j;
        }
        __syncthreads();
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            int n = 0;
            for (int v = 0; v < N; ++v) n += lab[v] == j;
            cnt[j] = n;
        }
        if (t == iters) break;  // T updates, T + 1 assignments
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            for (int j = 0; j < k; ++j) sums[j * C + c] = 0.f;
            for (int v = 0; v < N; ++v) sums[lab[v] * C + c] += cvig::load(x, static_cast<size_t>(v) * C + c);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < k * C; i += blockDim.x) {
            const int n = cnt[i / C];
            if (n > 0) cent[i] = sums[i] / static_cast<float>(n);  // an empty cluster keeps its centroid
        }
        __syncthreads();
    }
    __syncthreads();
    for (int v = threadIdx.x; v < N; v += blockDim.x) labels[static_cast<size_t>(blockIdx.x) * N + v] = lab[v];
    for (int j = threadIdx.x; j < k; j += blockDim.x) counts[static_cast<size_t>(blockIdx.x) * k + j] = cnt[j];
}

template <typename T>
int launch(const void* xn, int B, int N, int C, int k, int iters, int32_t* labels, int32_t* counts, cudaStream_t s) {
    const size_t smem = cvig_kmeans_smem_bytes(N, C, k);
    int dev = 0, max_smem = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
        return CVIG_CUDA_ERROR;
    }
    if (smem > static_cast<size_t>(max_smem)) return CVIG_UNSUPPORTED_SIZE;
    if (cudaFuncSetAttribute(kmeans_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess) {
        return CVIG_CUDA_ERROR;
    }
    kmeans_kernel<T><<<B, kThreads, smem, s>>>(static_cast<const T*>(xn), N, C, k, iters, labels, counts);
    return cvig::launch_status();
}

}  // namespace

extern "C" size_t cvig_kmeans_smem_bytes(int N, int C, int k) {
    return (2 * static_cast<size_t>(k) * C + k) * sizeof(float) + (static_cast<size_t>(k) + N) * sizeof(int);
}

extern "C" int cvig_kmeans_launch(const void* xn, int dtype, int B, int N, int C, int k, int iters,
                                  int32_t* labels, int32_t* counts, cudaStream_t stream) {
    if (!xn || !labels || !counts || B <= 0 || N <= 0 || C <= 0 || k <= 0 || k > N || iters < 0) {
        return CVIG_INVALID_ARGUMENT;
    }
    if (dtype == CVIG_FP32) return launch<float>(xn, B, N, C, k, iters, labels, counts, stream);
    if (dtype == CVIG_FP16) return launch<__half>(xn, B, N, C, k, iters, labels, counts, stream);
    return CVIG_INVALID_ARGUMENT;
}
