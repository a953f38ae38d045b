// k-means of DEGC on the host: the phases of kmeans_impl.h run in order, one
// image at a time per thread, with the same shared-memory limit as a GPU.
#include <new>
#include <vector>

#include "../common/cvig_host.h"
#include "kmeans_impl.h"

namespace {

template <typename T>
void one_image(const T* x, int N, int C, int k, int iters, void* ws, int32_t* labels, int32_t* counts) {
    const cvig::KMeansImage<T> s = cvig::kmeans_image(x, N, C, k, ws);
    cvig::SerialExec ex;
    cvig::kmeans_run(s, iters, ex);
    for (int v = 0; v < N; ++v) labels[v] = s.lab[v];
    for (int j = 0; j < k; ++j) counts[j] = s.cnt[j];
}

CVIG_HOST_SIMD void image_f32(const float* x, int N, int C, int k, int iters, void* ws, int32_t* l, int32_t* c) {
    one_image(x, N, C, k, iters, ws, l, c);
}
CVIG_HOST_SIMD void image_f16(const cvig::f16* x, int N, int C, int k, int iters, void* ws, int32_t* l, int32_t* c) {
    one_image(x, N, C, k, iters, ws, l, c);
}
void image(const float* x, int N, int C, int k, int iters, void* ws, int32_t* l, int32_t* c) {
    image_f32(x, N, C, k, iters, ws, l, c);
}
void image(const cvig::f16* x, int N, int C, int k, int iters, void* ws, int32_t* l, int32_t* c) {
    image_f16(x, N, C, k, iters, ws, l, c);
}

template <typename T>
int run(const void* xn, int B, int N, int C, int k, int iters, int32_t* labels, int32_t* counts) {
    const size_t ws_bytes = cvig::kmeans_smem_bytes(N, C, k);
    if (ws_bytes > static_cast<size_t>(CVIG_HOST_SMEM_LIMIT)) return CVIG_UNSUPPORTED_SIZE;
    cvig::parallel_for(B, [&](long long b) {
        std::vector<float> ws((ws_bytes + sizeof(float) - 1) / sizeof(float));
        image(static_cast<const T*>(xn) + static_cast<size_t>(b) * N * C, N, C, k, iters, ws.data(),
              labels + static_cast<size_t>(b) * N, counts + static_cast<size_t>(b) * k);
    });
    return CVIG_OK;
}

}  // namespace

extern "C" const char* cvig_kernels_backend(void) { return "host"; }

extern "C" size_t cvig_kmeans_smem_bytes(int N, int C, int k) { return cvig::kmeans_smem_bytes(N, C, k); }

extern "C" int cvig_kmeans_launch(const void* xn, int dtype, int B, int N, int C, int k, int iters,
                                  int32_t* labels, int32_t* counts, cudaStream_t) {
    const int st = cvig::check_kmeans(xn, dtype, B, N, C, k, iters, labels, counts);
    if (st != CVIG_OK) return st;
    try {
        if (dtype == CVIG_FP32) return run<float>(xn, B, N, C, k, iters, labels, counts);
        return run<cvig::f16>(xn, B, N, C, k, iters, labels, counts);
    } catch (...) {  // allocation or thread creation failed
        return CVIG_UNSUPPORTED_SIZE;
    }
}
