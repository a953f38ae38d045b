// Plain C ABI of the ClusterViG plugin kernels (docs/design.md section 2).
//
// Launchers take pointers, sizes, a dtype flag and a stream; they know nothing
// of TensorRT, so the same library serves the TensorRT wrappers, ctypes, the
// PyTorch custom ops and any other runtime. Label and index tensors are int32.
// Every launcher returns a CvigStatus.
//
// Two libraries implement this ABI from one source:
//   libcvig_kernels.so       CUDA: device pointers, asynchronous on `stream`
//                            (never synchronises it);
//   libcvig_kernels_host.so  host: host pointers, `stream` ignored, synchronous,
//                            built by the host compiler alone (CVIG_HOST_ONLY),
//                            bit-identical results.
#ifndef CVIG_KERNELS_H
#define CVIG_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef CVIG_HOST_ONLY
typedef struct CUstream_st* cudaStream_t;  // the CUDA runtime's own definition; never dereferenced
#else
#include <cuda_runtime_api.h>
#endif

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

#define CVIG_MAX_K 64  // neighbours per token kept by the k-NN kernel
// Shared-memory limit the host build applies to the k-means working set, so it
// refuses what a GPU refuses: 227 KiB, the opt-in maximum per block of
// sm_90/sm_100 (sm_87 Orin: 163 KiB, sm_86: 99 KiB; the CUDA build asks the device).
#define CVIG_HOST_SMEM_LIMIT (227 * 1024)

// "cuda" or "host": which implementation of this ABI the library holds.
const char* cvig_kernels_backend(void);

// k-means on normalised tokens xn [B, N, C]: deterministic init at tokens
// (2i+1)*N/(2k), exactly `iters` Lloyd updates, labels of the final assignment.
// Ties go to the lower cluster, empty clusters keep their centroid.
// Outputs: labels [B, N], counts [B, k] (members per cluster). Distances in
// FP32, centroid sums in FP64 (a mean of identical tokens is that token).
// k must be in 1..N; CVIG_UNSUPPORTED_SIZE when the working set exceeds the
// shared memory of one block.
int cvig_kmeans_launch(const void* xn, int dtype, int B, int N, int C, int k, int iters,
                       int32_t* labels, int32_t* counts, cudaStream_t stream);
// k-means as cvig_kmeans_launch on tokens x [B, N, C] (for numerics="authors": centred,
// not normalised) that also writes the centroids of the last update, [B, k, C]
// in x's type (FP32 values rounded once); the labels are the assignment to
// exactly these centroids. empty_zero = 1: a cluster left without members gets
// the zero vector (a mean over no member, as torch_kmeans computes it), which
// takes part in the next assignment; 0: it keeps its centroid. empty_zero must
// be 0 or 1, centroids non-null.
int cvig_kmeans_centroids_launch(const void* x, int dtype, int B, int N, int C, int k, int iters, int empty_zero,
                                 int32_t* labels, int32_t* counts, void* centroids, cudaStream_t stream);
// Dynamic shared memory one k-means block needs (centroids, their norms,
// counts, offsets, labels and the member order).
size_t cvig_kmeans_smem_bytes(int N, int C, int k);

// Partitioned k-NN: for each token its min(K, |partition|) most similar tokens
// of its own partition by xn_v . xn_u, self first, ties to the lower index;
// missing slots hold the token's own index with valid = 0. idx, valid: [B, N, K].
// K in 1..CVIG_MAX_K (larger: CVIG_UNSUPPORTED_SIZE); K = 1 gives self only.
int cvig_partitioned_knn_launch(const void* xn, const int32_t* labels, int dtype, int B, int N, int C, int K,
                                int32_t* idx, int32_t* valid, cudaStream_t stream);

// Per-partition mean z [B, k, C] of x [B, N, C] (0 for an empty partition) and counts [B, k].
// Sums in FP64, z rounded once to x's type. Labels outside 0..k-1 belong to no partition.
int cvig_segment_mean_launch(const void* x, const int32_t* labels, int dtype, int B, int N, int C, int k,
                             void* z, int32_t* counts, cudaStream_t stream);

// out[b, v, c] = max_k x[b, idx[b, v, k], c] - x[b, v, c]  (no [B, N, K, C] tensor).
// Every idx must be in 0..N-1 (not checked: the k-NN output always is).
int cvig_gather_max_rel_launch(const void* x, const int32_t* idx, int dtype, int B, int N, int C, int K,
                               void* out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // CVIG_KERNELS_H
