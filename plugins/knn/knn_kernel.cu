// Partitioned k-NN of DEGC (DESIGN.md 2.3): one thread per token.
//
// Each thread scans the tokens of its own partition in index order and keeps
// a sorted top-K list in registers: O(N * K) output memory, no N x N matrix.
// A later token only displaces an earlier one if strictly more similar, which
// gives the "ties to the lower index" rule; self is slot 0.
#include "../common/cvig_cuda_utils.cuh"

namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void knn_kernel(const T* __restrict__ xn, const int32_t* __restrict__ labels, int B, int N, int C, int K,
                           int32_t* __restrict__ idx, int32_t* __restrict__ valid) {
    const long long gid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (gid >= static_cast<long long>(B) * N) return;
    const int b = static_cast<int>(gid / N), v = static_cast<int>(gid % N);
    const T* x = xn + static_cast<size_t>(b) * N * C;
    const int32_t* lab = labels + static_cast<size_t>(b) * N;
    const int mine = lab[v];
    float best[CVIG_MAX_K];
    int who[CVIG_MAX_K];
    int filled = 1;
    who[0] = v;  // self first, whatever its similarity
    for (int u = 0; u < N; ++u) {
        if (u == v || lab[u] != mine) continue;
        float s = 0.f;
        for (int c = 0; c < C; ++c)
            s += cvig::load(x, static_cast<size_t>(v) * C + c) * cvig::load(x, static_cast<size_t>(u) * C + c);
        if (filled == K && !(s > best[K - 1])) continue;
        int p = filled < K ? filled : K - 1;
        while (p > 1 && s > best[p - 1]) {  // strict: equal similarity keeps the lower index first
            best[p] = best[p - 1];
            who[p] = who[p - 1];
            --p;
        }
        best[p] = s;
        who[p] = u;
        if (filled < K) ++filled;
    }
    int32_t* out_i = idx + static_cast<size_t>(gid) * K;
    int32_t* out_v = valid + static_cast<size_t>(gid) * K;
    for (int j = 0; j < K; ++j) {
        out_i[j] = j < filled ? who[j] : v;
        out_v[j] = j < filled ? 1 : 0;
    }
}

template <typename T>
int launch(const void* xn, const int32_t* labels, int B, int N, int C, int K, int32_t* idx, int32_t* valid,
           cudaStream_t s) {
    const long long n = static_cast<long long>(B) * N;
    knn_kernel<T><<<cvig::blocks_for(n, kThreads), kThreads, 0, s>>>(static_cast<const T*>(xn), labels, B, N, C, K,
                                                                      idx, valid);
    return cvig::launch_status();
}

}  // namespace

extern "C" int cvig_partitioned_knn_launch(const void* xn, const int32_t* labels, int dtype, int B, int N, int C,
                                           int K, int32_t* idx, int32_t* valid, cudaStream_t stream) {
    if (!xn || !labels || !idx || !valid || B <= 0 || N <= 0 || C <= 0 || K <= 0) return CVIG_INVALID_ARGUMENT;
    if (K > CVIG_MAX_K) return CVIG_UNSUPPORTED_SIZE;
    if (dtype == CVIG_FP32) return launch<float>(xn, labels, B, N, C, K, idx, valid, stream);
    if (dtype == CVIG_FP16) return launch<__half>(xn, labels, B, N, C, K, idx, valid, stream);
    return CVIG_INVALID_ARGUMENT;
}
