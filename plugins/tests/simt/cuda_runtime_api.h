// The part of CUDA's runtime API and device built-ins that the kernels use, for the SIMT test
// executor (simt_runtime.cpp): the kernels' device code compiled by the host compiler, each CUDA
// thread a fiber. Test-only; never part of a library that ships.
//
// Built-ins are functions of the runtime (not inline), so the compiler cannot move a memory access
// across a barrier or a collective, and the runtime decides at each of them which thread runs next.
#ifndef CVIG_SIMT_CUDA_RUNTIME_API_H
#define CVIG_SIMT_CUDA_RUNTIME_API_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // static __shared__ arrays: blocks run one at a time, so one copy serves all

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorLaunchFailure = 719,
};
typedef enum cudaError_t cudaError;

enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

namespace cvig_simt {

// One CUDA thread as the runtime sees it.
struct ThreadState {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};
ThreadState* current();  // the fiber running now

// Warp collectives: every lane of `mask` posts its operand, the runtime resolves the collective once
// all of them have arrived (or reports a divergence or deadlock) and returns this lane's result.
enum CollectiveKind { kSyncThreads = 1, kSyncWarp, kShfl, kShflDown, kBallot };
uint64_t collective(CollectiveKind kind, unsigned mask, uint64_t value, int size, int arg, int width,
                    const char* file, int line);

void* dynamic_shared();  // the launch's dynamic shared memory (exactly its requested size)

// A launch: kernel(args...) on every thread of every block. The runtime runs the blocks one after
// another, each with one fiber per thread.
typedef void (*ThreadBody)(void* closure);
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, ThreadBody body,
                   void* closure);

template <typename... P>
struct Launcher {
    void (*kernel)(P...);
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    template <typename... A>
    void operator()(A... args) {
        auto packed = [this, &args...]() { kernel(static_cast<P>(args)...); };
        using Packed = decltype(packed);
        ThreadBody body = [](void* c) { (*static_cast<Packed*>(c))(); };
        launch(reinterpret_cast<const void*>(kernel), grid, block, smem, stream, body, &packed);
    }
};

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to cvig_simt::kernel_launch(kernel, grid, block,
// smem, stream)(args...) when the .cu sources are prepared for this executor.
template <typename... P>
Launcher<P...> kernel_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
    return Launcher<P...>{kernel, grid, block, smem, stream};
}

template <typename T>
uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof v);
    return b;
}
template <typename T>
T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof v);
    return v;
}

}  // namespace cvig_simt

#define threadIdx (::cvig_simt::current()->thread_idx)
#define blockIdx (::cvig_simt::current()->block_idx)
#define blockDim (::cvig_simt::current()->block_dim)
#define gridDim (::cvig_simt::current()->grid_dim)

// The call site (file, line) of a barrier or collective identifies it: lanes of one warp must meet at
// the same one. __builtin_FILE/__builtin_LINE in a default argument give the caller's position.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cvig_simt::collective(::cvig_simt::kSyncThreads, 0u, 0, 0, 0, 0, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cvig_simt::collective(::cvig_simt::kSyncWarp, mask, 0, 0, 0, 32, file, line);
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
    return ::cvig_simt::from_bits<T>(::cvig_simt::collective(::cvig_simt::kShfl, mask, ::cvig_simt::to_bits(var),
                                                             sizeof(T), src_lane, width, file, line));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
    return ::cvig_simt::from_bits<T>(::cvig_simt::collective(::cvig_simt::kShflDown, mask,
                                                             ::cvig_simt::to_bits(var), sizeof(T),
                                                             static_cast<int>(delta), width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    return static_cast<unsigned>(
        ::cvig_simt::collective(::cvig_simt::kBallot, mask, predicate != 0, 4, 0, 32, file, line));
}

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
// No FMA contraction: the executor is compiled with -ffp-contract=off, so these round once each.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

// Runtime API: errors are sticky per launch as cudaGetLastError reports them.
cudaError_t cudaGetLastError(void);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaFuncSetAttributeRaw(const void* func, cudaFuncAttribute attr, int value);
template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
    return cudaFuncSetAttributeRaw(reinterpret_cast<const void*>(func), attr, value);
}

#endif  // CVIG_SIMT_CUDA_RUNTIME_API_H
