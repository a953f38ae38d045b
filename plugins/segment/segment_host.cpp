// Segment ops on the host: the items of segment_impl.h, one image per thread.
#include "../common/cvig_host.h"
#include "segment_impl.h"

namespace {

template <typename T>
int segment_mean(const void* x, const int32_t* labels, int B, int N, int C, int k, void* z, int32_t* counts) {
    const long long per_image = static_cast<long long>(k) * C;
    cvig::parallel_for(B, [&](long long b) {
        for (long long i = b * per_image; i < (b + 1) * per_image; ++i) {
            cvig::segment_mean_item(static_cast<const T*>(x), labels, N, C, k, static_cast<T*>(z), counts, i);
        }
    });
    return CVIG_OK;
}

template <typename T>
int gather_max_rel(const void* x, const int32_t* idx, int B, int N, int C, int K, void* out) {
    const long long per_image = static_cast<long long>(N) * C;
    cvig::parallel_for(B, [&](long long b) {
        for (long long i = b * per_image; i < (b + 1) * per_image; ++i) {
            cvig::gather_max_rel_item(static_cast<const T*>(x), idx, N, C, K, static_cast<T*>(out), i);
        }
    });
    return CVIG_OK;
}

}  // namespace

extern "C" int cvig_segment_mean_launch(const void* x, const int32_t* labels, int dtype, int B, int N, int C, int k,
                                        void* z, int32_t* counts, cudaStream_t) {
    const int st = cvig::check_segment_mean(x, labels, dtype, B, N, C, k, z, counts);
    if (st != CVIG_OK) return st;
    try {
        if (dtype == CVIG_FP32) return segment_mean<float>(x, labels, B, N, C, k, z, counts);
        return segment_mean<cvig::f16>(x, labels, B, N, C, k, z, counts);
    } catch (...) {
        return CVIG_UNSUPPORTED_SIZE;
    }
}

extern "C" int cvig_gather_max_rel_launch(const void* x, const int32_t* idx, int dtype, int B, int N, int C, int K,
                                          void* out, cudaStream_t) {
    const int st = cvig::check_gather_max_rel(x, idx, dtype, B, N, C, K, out);
    if (st != CVIG_OK) return st;
    try {
        if (dtype == CVIG_FP32) return gather_max_rel<float>(x, idx, B, N, C, K, out);
        return gather_max_rel<cvig::f16>(x, idx, B, N, C, K, out);
    } catch (...) {
        return CVIG_UNSUPPORTED_SIZE;
    }
}
