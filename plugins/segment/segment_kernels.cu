// Segment ops of DEGC: per-partition mean (DESIGN.md 2.4) and the fused
// gather-max-relative of G-MRGCN (max_u x_u - x_v) without a [B, N, K, C] tensor.
#include <cfloat>

#include "../common/cvig_cuda_utils.cuh"

namespace {

constexpr int kThreads = 256;

// one thread per (image, partition, channel); token order summation, deterministic
template <typename T>
__global__ void segment_mean_kernel(const T* __restrict__ x, const int32_t* __restrict__ labels, int B, int N, int C,
                                    int k, T* __restrict__ z, int32_t* __restrict__ counts) {
    const long long gid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (gid >= static_cast<long long>(B) * k * C) return;
    const int c = static_cast<int>(gid % C);
    const int j = static_cast<int>((gid / C) % k);
    const int b = static_cast<int>(gid / (static_cast<long long>(C) * k));
    const int32_t* lab = labels + static_cast<size_t>(b) * N;
    float s = 0.f;
    int n = 0;
    for (int v = 0; v < N; ++v) {
        if (lab[v] == j) {
            s += cvig::load(x, (static_cast<size_t>(b) * N + v) * C + c);
            ++n;
        }
    }
    cvig::store(z, static_cast<size_t>(gid), n > 0 ? s / static_cast<float>(n) : 0.f);
    if (c == 0) counts[static_cast<size_t>(b) * k + j] = n;
}

template <typename T>
__global__ void gather_max_rel_kernel(const T* __restrict__ x, const int32_t* __restrict__ idx, int B, int N, int C,
                                      int K, T* __restrict__ out) {
    const long long gid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (gid >= static_cast<long long>(B) * N * C) return;
    const int c = static_cast<int>(gid % C);
    const long long bv = gid / C;  // b * N + v
    const int b = static_cast<int>(bv / N);
    const int32_t* nb = idx + static_cast<size_t>(bv) * K;
    float m = -FLT_MAX;
    for (int j = 0; j < K; ++j) m = fmaxf(m, cvig::load(x, (static_cast<size_t>(b) * N + nb[j]) * C + c));
    cvig::store(out, static_cast<size_t>(gid), m - cvig::load(x, static_cast<size_t>(gid)));
}

}  // namespace

extern "C" int cvig_segment_mean_launch(const void* x, const int32_t* labels, int dtype, int B, int N, int C, int k,
                                        void* z, int32_t* counts, cudaStream_t stream) {
    if (!x || !labels || !z || !counts || B <= 0 || N <= 0 || C <= 0 || k <= 0) return CVIG_INVALID_ARGUMENT;
    const long long n = static_cast<long long>(B) * k * C;
    const int grid = cvig::blocks_for(n, kThreads);
    if (dtype == CVIG_FP32) {
        segment_mean_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), labels, B, N, C, k,
                                                                  static_cast<float*>(z), counts);
    } else if (dtype == CVIG_FP16) {
        segment_mean_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), labels, B, N, C, k,
                                                                   static_cast<__half*>(z), counts);
    } else {
        return CVIG_INVALID_ARGUMENT;
    }
    return cvig::launch_status();
}

extern "C" int cvig_gather_max_rel_launch(const void* x, const int32_t* idx, int dtype, int B, int N, int C, int K,
                                          void* out, cudaStream_t stream) {
    if (!x || !idx || !out || B <= 0 || N <= 0 || C <= 0 || K <= 0) return CVIG_INVALID_ARGUMENT;
    const long long n = static_cast<long long>(B) * N * C;
    const int grid = cvig::blocks_for(n, kThreads);
    if (dtype == CVIG_FP32) {
        gather_max_rel_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), idx, B, N, C, K,
                                                                    static_cast<float*>(out));
    } else if (dtype == CVIG_FP16) {
        gather_max_rel_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), idx, B, N, C, K,
                                                                     static_cast<__half*>(out));
    } else {
        return CVIG_INVALID_ARGUMENT;
    }
    return cvig::launch_status();
}
