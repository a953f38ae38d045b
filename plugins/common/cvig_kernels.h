// Plain C ABI of the ClusterViG plugin kernels (DESIGN.md section 2).
//
// Launchers take device pointers, sizes, a dtype flag and a stream; they know
// nothing of TensorRT, so the same library serves the TensorRT wrappers, the
// ctypes tests and any other runtime. Label and index tensors are int32.
// Every launcher returns a CvigStatus; it never synchronises the stream.
#ifndef CVIG_KERNELS_H
#define CVIG_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    CVIG_OK = 0,
    CVIG_INVALID_ARGUMENT = 1,  // null pointer, non-positive size, unknown dtype
    CVIG_UNSUPPORTED_SIZE = 2,  // e.g. k-means working set larger than shared memory
    CVIG_CUDA_ERROR = 3         // the launch failed (cudaGetLastError)
} CvigStatus;

typedef enum { CVIG_FP32 = 0, CVIG_FP16 = 1 } CvigDtype;

#define CVIG_MAX_K 64  // neighbours per token kept in registers by the k-NN kernel

// k-means on normalised tokens xn [B, N, C]: deterministic init at tokens
// (2i+1)*N/(2k), exactly `iters` Lloyd updates, labels of the final assignment.
// Ties go to the lower cluster, empty clusters keep their centroid.
// Outputs: labels [B, N], counts [B, k] (members per cluster). FP32 accumulation.
int cvig_kmeans_launch(const void* xn, int dtype, int B, int N, int C, int k, int iters,
                       int32_t* labels, int32_t* counts, cudaStream_t stream);
// Dynamic shared memory one k-means block needs (centroids, sums, norms, counts, labels).
size_t cvig_kmeans_smem_bytes(int N, int C, int k);

// Partitioned k-NN: for each token its min(K, |partition|) most similar tokens
// of its own partition by xn_v . xn_u, self first, ties to the lower index;
// missing slots hold the token's own index with valid = 0. idx, valid: [B, N, K].
int cvig_partitioned_knn_launch(const void* xn, const int32_t* labels, int dtype, int B, int N, int C, int K,
                                int32_t* idx, int32_t* valid, cudaStream_t stream);

// Per-partition mean z [B, k, C] of x [B, N, C] (0 for an empty partition) and counts [B, k].
int cvig_segment_mean_launch(const void* x, const int32_t* labels, int dtype, int B, int N, int C, int k,
                             void* z, int32_t* counts, cudaStream_t stream);

// out[b, v, c] = max_k x[b, idx[b, v, k], c] - x[b, v, c]  (no [B, N, K, C] tensor).
int cvig_gather_max_rel_launch(const void* x, const int32_t* idx, int dtype, int B, int N, int C, int K,
                               void* out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // CVIG_KERNELS_H
