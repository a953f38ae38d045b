// Argument checks of the C ABI, shared by the CUDA launchers and the host
// build so that both return the same status for the same call.
#ifndef CVIG_ARGS_H
#define CVIG_ARGS_H

#include <stddef.h>
#include <stdint.h>

#include "cvig_kernels.h"

namespace cvig {

inline bool known_dtype(int dtype) { return dtype == CVIG_FP32 || dtype == CVIG_FP16; }

// Indexing is size_t throughout; counts of work items must also fit the
// int-typed loops and grid sizes.
inline bool fits(long long a, long long b, long long c) {
    const long long lim = 0x7fffffffLL;
    return a <= lim && b <= lim && c <= lim && a * b <= lim && a * b * c <= lim * 64;
}

inline int check_kmeans(const void* xn, int dtype, int B, int N, int C, int k, int iters, const void* labels,
                        const void* counts) {
    if (!xn || !labels || !counts || B <= 0 || N <= 0 || C <= 0 || k <= 0 || k > N || iters < 0) {
        return CVIG_INVALID_ARGUMENT;
    }
    if (!known_dtype(dtype) || !fits(B, N, C)) return CVIG_INVALID_ARGUMENT;
    return CVIG_OK;
}

inline int check_kmeans_centroids(const void* x, int dtype, int B, int N, int C, int k, int iters, int empty_zero,
                                  const void* labels, const void* counts, const void* centroids) {
    const int st = check_kmeans(x, dtype, B, N, C, k, iters, labels, counts);
    if (st != CVIG_OK) return st;
    if (!centroids || (empty_zero != 0 && empty_zero != 1) || !fits(B, k, C)) return CVIG_INVALID_ARGUMENT;
    return CVIG_OK;
}

inline int check_knn(const void* xn, const void* labels, int dtype, int B, int N, int C, int K, const void* idx,
                     const void* valid) {
    if (!xn || !labels || !idx || !valid || B <= 0 || N <= 0 || C <= 0 || K <= 0) return CVIG_INVALID_ARGUMENT;
    if (!known_dtype(dtype) || !fits(B, N, C) || !fits(B, N, K)) return CVIG_INVALID_ARGUMENT;
    if (K > CVIG_MAX_K) return CVIG_UNSUPPORTED_SIZE;
    return CVIG_OK;
}

inline int check_segment_mean(const void* x, const void* labels, int dtype, int B, int N, int C, int k,
                              const void* z, const void* counts) {
    if (!x || !labels || !z || !counts || B <= 0 || N <= 0 || C <= 0 || k <= 0) return CVIG_INVALID_ARGUMENT;
    if (!known_dtype(dtype) || !fits(B, N, C) || !fits(B, k, C)) return CVIG_INVALID_ARGUMENT;
    return CVIG_OK;
}

inline int check_gather_max_rel(const void* x, const void* idx, int dtype, int B, int N, int C, int K,
                                const void* out) {
    if (!x || !idx || !out || B <= 0 || N <= 0 || C <= 0 || K <= 0) return CVIG_INVALID_ARGUMENT;
    if (!known_dtype(dtype) || !fits(B, N, C) || !fits(B, N, K)) return CVIG_INVALID_ARGUMENT;
    return CVIG_OK;
}

// Shared-memory layout of one k-means image: floats first, then ints.
inline size_t kmeans_smem_bytes(int N, int C, int k) {
    const size_t floats = static_cast<size_t>(k) * C + k;           // centroids, their squared norms
    const size_t ints = 2 * static_cast<size_t>(k) + 2 * static_cast<size_t>(N);  // counts, starts; labels, order
    return floats * sizeof(float) + ints * sizeof(int);
}

}  // namespace cvig

#endif  // CVIG_ARGS_H
