// k-means of DEGC on the host: the phases of kmeans_impl.h run in order, one
// image at a time per thread, with the same shared-memory limit as a GPU.
#include <new>
#include <vector>

#include "../common/cvig_host.h"
#include "kmeans_impl.h"

namespace {

struct Outputs {
    int32_t* labels;
    int32_t* counts;
    void* centroids;  // [B, k, C] in x's type, or null
    int empty_zero;
};

template <typename T>
void one_image(const T* x, int N, int C, int k, int iters, void* ws, const Outputs& o, long long b) {
    const cvig::KMeansImage<T> s = cvig::kmeans_image(x, N, C, k, ws, o.empty_zero);
    cvig::SerialExec ex;
    cvig::kmeans_run(s, iters, ex);
    for (int v = 0; v < N; ++v) o.labels[b * N + v] = s.lab[v];
    for (int j = 0; j < k; ++j) o.counts[b * k + j] = s.cnt[j];
    if (o.centroids != nullptr) {
        T* cent = static_cast<T*>(o.centroids) + static_cast<size_t>(b) * k * C;
        for (int i = 0; i < k * C; ++i) cvig::km_store_centroid(s, cent, i);
    }
}

CVIG_HOST_SIMD void image_f32(const float* x, int N, int C, int k, int iters, void* ws, const Outputs& o, long long b) {
    one_image(x, N, C, k, iters, ws, o, b);
}
CVIG_HOST_SIMD void image_f16(const cvig::f16* x, int N, int C, int k, int iters, void* ws, const Outputs& o,
                              long long b) {
    one_image(x, N, C, k, iters, ws, o, b);
}
void image(const float* x, int N, int C, int k, int iters, void* ws, const Outputs& o, long long b) {
    image_f32(x, N, C, k, iters, ws, o, b);
}
void image(const cvig::f16* x, int N, int C, int k, int iters, void* ws, const Outputs& o, long long b) {
    image_f16(x, N, C, k, iters, ws, o, b);
}

template <typename T>
int run(const void* xn, int B, int N, int C, int k, int iters, const Outputs& o) {
    const size_t ws_bytes = cvig::kmeans_smem_bytes(N, C, k);
    if (ws_bytes > static_cast<size_t>(CVIG_HOST_SMEM_LIMIT)) return CVIG_UNSUPPORTED_SIZE;
    cvig::parallel_for(B, [&](long long b) {
        std::vector<float> ws((ws_bytes + sizeof(float) - 1) / sizeof(float));
        image(static_cast<const T*>(xn) + static_cast<size_t>(b) * N * C, N, C, k, iters, ws.data(), o, b);
    });
    return CVIG_OK;
}

int launch(const void* xn, int dtype, int B, int N, int C, int k, int iters, const Outputs& o) {
    try {
        if (dtype == CVIG_FP32) return run<float>(xn, B, N, C, k, iters, o);
        return run<cvig::f16>(xn, B, N, C, k, iters, o);
    } catch (...) {  // allocation or thread creation failed
        return CVIG_UNSUPPORTED_SIZE;
    }
}

}  // namespace

extern "C" const char* cvig_kernels_backend(void) { return "host"; }

extern "C" size_t cvig_kmeans_smem_bytes(int N, int C, int k) { return cvig::kmeans_smem_bytes(N, C, k); }

extern "C" int cvig_kmeans_launch(const void* xn, int dtype, int B, int N, int C, int k, int iters,
                                  int32_t* labels, int32_t* counts, cudaStream_t) {
    const int st = cvig::check_kmeans(xn, dtype, B, N, C, k, iters, labels, counts);
    if (st != CVIG_OK) return st;
    return launch(xn, dtype, B, N, C, k, iters, Outputs{labels, counts, nullptr, 0});
}

extern "C" int cvig_kmeans_centroids_launch(const void* x, int dtype, int B, int N, int C, int k, int iters,
                                            int empty_zero, int32_t* labels, int32_t* counts, void* centroids,
                                            cudaStream_t) {
    const int st = cvig::check_kmeans_centroids(x, dtype, B, N, C, k, iters, empty_zero, labels, counts, centroids);
    if (st != CVIG_OK) return st;
    return launch(x, dtype, B, N, C, k, iters, Outputs{labels, counts, centroids, empty_zero});
}
