// Partitioned k-NN on the host: knn_impl.h for every token, images spread over threads.
#include "../common/cvig_host.h"
#include "knn_impl.h"

namespace {

template <typename T>
void one_image(const cvig::KnnImage<T>& s) {
    float best[CVIG_MAX_K];
    int who[CVIG_MAX_K];
    for (int v = 0; v < s.N; ++v) cvig::knn_token(s, v, 0, best, who);
}

CVIG_HOST_SIMD void image(const cvig::KnnImage<float>& s) { one_image(s); }
CVIG_HOST_SIMD void image(const cvig::KnnImage<cvig::f16>& s) { one_image(s); }

template <typename T>
int run(const void* xn, const int32_t* labels, int B, int N, int C, int K, int32_t* idx, int32_t* valid) {
    cvig::parallel_for(B, [&](long long b) {
        const size_t img = static_cast<size_t>(b) * N;
        image(cvig::KnnImage<T>{static_cast<const T*>(xn) + img * C, labels + img, N, C, K, idx + img * K,
                                valid + img * K});
    });
    return CVIG_OK;
}

}  // namespace

extern "C" int cvig_partitioned_knn_launch(const void* xn, const int32_t* labels, int dtype, int B, int N, int C,
                                           int K, int32_t* idx, int32_t* valid, cudaStream_t) {
    const int st = cvig::check_knn(xn, labels, dtype, B, N, C, K, idx, valid);
    if (st != CVIG_OK) return st;
    try {
        if (dtype == CVIG_FP32) return run<float>(xn, labels, B, N, C, K, idx, valid);
        return run<cvig::f16>(xn, labels, B, N, C, K, idx, valid);
    } catch (...) {
        return CVIG_UNSUPPORTED_SIZE;
    }
}
