// CUDA side of the kernels: how a thread block executes the phases of the
// shared *_impl.h sources, and launch helpers. Host builds never include this.
#ifndef CVIG_CUDA_CUH
#define CVIG_CUDA_CUH

#include <cuda_runtime_api.h>

#include "cvig_hd.h"
#include "cvig_kernels.h"

// What cvig_kernels_backend() returns: "cuda", or "simt" when tests compile this device code for the
// CPU's SIMT test executor (plugins/tests/simt/).
#ifndef CVIG_BACKEND_NAME
#define CVIG_BACKEND_NAME "cuda"
#endif

namespace cvig {

// Runs a phase with the threads of one block, then a barrier. Methods are
// __host__ __device__ only so that the shared HD templates can name them; they
// do nothing outside device code.
struct BlockExec {
    static constexpr int kChannels = 1;  // per-channel items: consecutive threads read consecutive channels
    template <typename F>
    __host__ __device__ void items(int n, F f) {
#ifdef __CUDA_ARCH__
        for (int i = threadIdx.x; i < n; i += blockDim.x) f(i);
        __syncthreads();
#else
        (void)n;
        (void)f;
#endif
    }
    template <typename F>
    __host__ __device__ void warp_items(int n, F f) {
#ifdef __CUDA_ARCH__
        const int lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
        for (int i = threadIdx.x / kWarp; i < n; i += warps) f(i, lane);  // i is warp-uniform
        __syncthreads();
#else
        (void)n;
        (void)f;
#endif
    }
    template <typename F>
    __host__ __device__ void single(F f) {
#ifdef __CUDA_ARCH__
        if (threadIdx.x == 0) f();
        __syncthreads();
#else
        (void)f;
#endif
    }
};

inline int launch_status() { return cudaGetLastError() == cudaSuccess ? CVIG_OK : CVIG_CUDA_ERROR; }

inline int blocks_for(long long n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

// Opt-in shared memory per block and SM count of the current device.
inline int device_limits(int* max_smem, int* sms) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
        return CVIG_CUDA_ERROR;
    }
    return CVIG_OK;
}

}  // namespace cvig

#endif  // CVIG_CUDA_CUH
