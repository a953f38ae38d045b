// Kernels with planted defects, and one without, for the SIMT executor's own tests
// (tests/test_kernels_simt.py). Never part of a kernel library.
//
// Each entry point launches one kernel and returns cudaGetLastError(); the executor's report says
// what it found. The defects are the classic ones the serial host build cannot show: a barrier
// inside divergent code, a warp collective some lanes skip, a shared-memory read before any write,
// an access past the launch's dynamic shared memory, a race between lanes, more than 48 KiB of
// dynamic shared memory without the opt-in; and the k-NN insertion as it was before the fix of
// knn_impl.h (lanes read best[K-1] while lane 0 may already be rewriting it).
#include "../../common/cvig_cuda.cuh"
#include "../../knn/knn_impl.h"

namespace {

// Correct use of every collective, so the executor's results can be checked against numpy:
// out[t*8 + 0] = __shfl_sync(full, v, (lane * 7 + 3) % 32)
// out[t*8 + 1] = __shfl_down_sync(full, v, 5)              (own value past the end)
// out[t*8 + 2] = __shfl_sync(full, v, 2, 8)                 (width 8: lane 2 of each group of 8)
// out[t*8 + 3] = __shfl_down_sync(full, v, 3, 16)           (width 16)
// out[t*8 + 4] = __ballot_sync(full, v > 0.5)               (as a float of its low 24 bits)
// out[t*8 + 5] = __ballot_sync(0x0000ffff, v > 0.5) on lanes 0-15, __shfl_sync(0xffff0000, v, 31) on 16-31
// out[t*8 + 6] = the block's shared-memory sum of v over the thread's warp (barrier, then a read)
// out[t*8 + 7] = the warp's sum of v*v by cvig::warp_dot (lane products, then a shuffle tree)
__global__ void collectives_kernel(const float* v_in, float* out) {
    extern __shared__ float sv[];
    const int t = threadIdx.x, lane = t % 32;
    const float v = v_in[blockIdx.x * blockDim.x + t];
    float* o = out + (static_cast<size_t>(blockIdx.x) * blockDim.x + t) * 8;
    o[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32);
    o[1] = __shfl_down_sync(0xffffffffu, v, 5);
    o[2] = __shfl_sync(0xffffffffu, v, 2, 8);
    o[3] = __shfl_down_sync(0xffffffffu, v, 3, 16);
    o[4] = static_cast<float>(__ballot_sync(0xffffffffu, v > 0.5f) & 0xffffffu);
    if (lane < 16) {
        o[5] = static_cast<float>(__ballot_sync(0x0000ffffu, v > 0.5f));
    } else {
        o[5] = __shfl_sync(0xffff0000u, v, 31);
    }
    sv[t] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < 32; ++i) s += sv[(t / 32) * 32 + i];
    o[6] = s;
    const float* mine = sv + (t / 32) * 32;
    o[7] = cvig::warp_dot(mine, mine, 32, lane);
}

// __syncthreads in divergent code: threads 0-39 wait at one barrier, 40-63 at another.
__global__ void divergent_syncthreads_kernel(int* out) {
    if (threadIdx.x < 40) __syncthreads();
    out[threadIdx.x] = 1;
    __syncthreads();
}

// Odd lanes skip a shuffle and meet the even lanes at the next one.
__global__ void skipped_collective_kernel(float* out) {
    float v = static_cast<float>(threadIdx.x);
    if (threadIdx.x % 2 == 0) v = __shfl_down_sync(0xffffffffu, v, 1);
    v += __shfl_sync(0xffffffffu, v, 0);
    out[threadIdx.x] = v;
}

// Lane 0 waits at a __syncwarp naming lanes that have exited: it can never complete.
__global__ void exited_partner_kernel(float* out) {
    if (threadIdx.x % 32 != 0) return;
    __syncwarp();
    out[threadIdx.x] = 1.f;
}

// Every thread writes s[t]; after the barrier, each reads s[n + t], which nobody wrote.
__global__ void read_before_write_kernel(float* out) {
    extern __shared__ float s[];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = static_cast<float>(t);
    __syncthreads();
    out[t] = s[n + t];
}

// n floats of shared memory; thread t reads s[t + 1]: the last thread reads one float past the end.
__global__ void out_of_bounds_kernel(float* out) {
    extern __shared__ float s[];
    const int t = threadIdx.x;
    s[t] = static_cast<float>(t);
    __syncthreads();
    out[t] = s[t + 1];
}

// Thread 0 rewrites s[1] while the others read it, with no barrier between: the result depends on
// the order of the threads.
__global__ void race_kernel(float* out) {
    extern __shared__ float s[];
    const int t = threadIdx.x;
    s[t] = static_cast<float>(t);
    __syncthreads();
    if (t == 0) s[1] = 100.f;
    out[t] = s[1];
}

// Uses whatever dynamic shared memory it is launched with.
__global__ void big_smem_kernel(float* out, int n) {
    extern __shared__ float s[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = static_cast<float>(i);
    __syncthreads();
    if (threadIdx.x == 0) out[0] = s[n - 1];
}

// knn_token as it was before the fix: a lane that reads best[K-1] after lane 0 inserted can skip
// the iteration's __syncwarp and run ahead into the next warp_dot.
template <typename T>
__device__ void knn_token_unfixed(const cvig::KnnImage<T>& s, int v, int lane, float* best, int* who) {
    const int mine = s.lab[v];
    const T* xv = s.x + static_cast<size_t>(v) * s.C;
    int filled = 1;
    if (lane == 0) who[0] = v;
    for (int u = 0; u < s.N && s.K > 1; ++u) {
        if (u == v || s.lab[u] != mine) continue;
        const float sim = cvig::warp_dot(xv, s.x + static_cast<size_t>(u) * s.C, s.C, lane);
        if (filled == s.K && !(sim > best[s.K - 1])) continue;
        if (lane == 0) cvig::knn_insert(best, who, filled, s.K, sim, u);
        if (filled < s.K) ++filled;
        cvig::warp_sync();
    }
    int32_t* oi = s.idx + static_cast<size_t>(v) * s.K;
    int32_t* ov = s.valid + static_cast<size_t>(v) * s.K;
    for (int j = lane; j < s.K; j += cvig::lane_stride()) {
        oi[j] = j < filled ? who[j] : v;
        ov[j] = j < filled ? 1 : 0;
    }
    cvig::warp_sync();
}

constexpr int kWarps = 4;

template <typename T>
__global__ void knn_unfixed_kernel(const T* xn, const int32_t* labels, int B, int N, int C, int K, int32_t* idx,
                                   int32_t* valid) {
    extern __shared__ float scratch[];
    const int warp = threadIdx.x / cvig::kWarp, lane = threadIdx.x % cvig::kWarp;
    const long long token = static_cast<long long>(blockIdx.x) * kWarps + warp;
    if (token >= static_cast<long long>(B) * N) return;
    const int b = static_cast<int>(token / N), v = static_cast<int>(token % N);
    float* best = scratch + warp * K;
    int* who = reinterpret_cast<int*>(scratch + kWarps * K) + warp * K;
    const size_t img = static_cast<size_t>(b) * N;
    const cvig::KnnImage<T> s{xn + img * C, labels + img, N, C, K, idx + img * K, valid + img * K};
    knn_token_unfixed(s, v, lane, best, who);
}

}  // namespace

extern "C" {

int planted_collectives(const float* v, float* out, int blocks, int threads) {
    collectives_kernel<<<blocks, threads, threads * sizeof(float)>>>(v, out);
    return cudaGetLastError();
}
int planted_divergent_syncthreads(int* out) {
    divergent_syncthreads_kernel<<<1, 64>>>(out);
    return cudaGetLastError();
}
int planted_skipped_collective(float* out) {
    skipped_collective_kernel<<<1, 32>>>(out);
    return cudaGetLastError();
}
int planted_exited_partner(float* out) {
    exited_partner_kernel<<<1, 64>>>(out);
    return cudaGetLastError();
}
int planted_read_before_write(float* out, int threads) {
    read_before_write_kernel<<<1, threads, 2 * threads * sizeof(float)>>>(out);
    return cudaGetLastError();
}
int planted_out_of_bounds(float* out, int threads) {
    out_of_bounds_kernel<<<1, threads, threads * sizeof(float)>>>(out);
    return cudaGetLastError();
}
int planted_race(float* out, int threads) {
    race_kernel<<<1, threads, threads * sizeof(float)>>>(out);
    return cudaGetLastError();
}
// opt_in: call cudaFuncSetAttribute first (as the k-means launcher does above 48 KiB)
int planted_big_smem(float* out, int n, int opt_in) {
    const size_t bytes = static_cast<size_t>(n) * sizeof(float);
    if (opt_in && cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)) != cudaSuccess) {
        return cudaGetLastError();
    }
    big_smem_kernel<<<1, 128, bytes>>>(out, n);
    return cudaGetLastError();
}
int planted_knn_unfixed(const void* xn, const int32_t* labels, int dtype, int B, int N, int C, int K, int32_t* idx,
                        int32_t* valid) {
    const long long tokens = static_cast<long long>(B) * N;
    const size_t smem = 2 * static_cast<size_t>(kWarps) * K * sizeof(float);
    const int blocks = static_cast<int>((tokens + kWarps - 1) / kWarps);
    if (dtype == CVIG_FP32) {
        knn_unfixed_kernel<float><<<blocks, kWarps * cvig::kWarp, smem>>>(static_cast<const float*>(xn), labels, B, N,
                                                                          C, K, idx, valid);
    } else {
        knn_unfixed_kernel<cvig::f16><<<blocks, kWarps * cvig::kWarp, smem>>>(static_cast<const cvig::f16*>(xn),
                                                                              labels, B, N, C, K, idx, valid);
    }
    return cudaGetLastError();
}

}  // extern "C"
